"""Collecting what every clipper did from any (nested) optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _axes, _forms, _norms, _validate
from clipjax._base import (
    ClipState,
    PerLeaf,
    check_per_leaf,
    check_state,
    in_place,
    is_nnx_variable,
    key_str,
)
from clipjax._types import AxisSpec, Implementation, Ord, PyTree


class LeafNormsState(NamedTuple):
  """State of :func:`clipjax.record_leaf_norms`.

  Attributes:
    leaf_norms: each leaf's p-norm of the last updates it saw, as a
      :class:`clipjax.PerLeaf` (one float32 vector with the leaves' paths;
      ``state.leaf_norms.as_dict()`` gives ``{path: norm}``).
  """

  leaf_norms: PerLeaf


# Stat-bearing state types; the adaptive clippers register theirs here.
_STAT_TYPES: list[type] = [ClipState, LeafNormsState]
# Fields holding one scalar per leaf: clip_stats names them by the leaf's path.
# (A :class:`PerLeaf` field is named so whatever the type.)
_PER_LEAF_FIELDS: dict[type, tuple[str, ...]] = {}


def record_leaf_norms(
    ord: Ord = None,  # noqa: A002 - numpy/PyTorch name
    *,
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Records each leaf's norm of the updates in the state; passes the updates on unchanged.

  Per-layer norms are how gradient explosion is diagnosed (the book's SRN logs
  W, U and b separately). Put it before a clipper to record the pre-clip norms,
  after it for the post-clip ones; :func:`clipjax.clip_stats` reports them as
  ``leaf_norms/<path>`` (e.g. ``'leaf_norms/rnn/W'``). Nothing records them
  unless this transform is in the chain. Before a norm clipper of the same
  `ord` and `implementation`, XLA computes the shared per-leaf sums once (the
  clipper's global norm is made of them), so on the 2-core CPU the compiled
  step has no more reductions than the clipper alone; after a clipper it reads
  the clipped updates again.

  Args:
    ord: the norm's order, any p >= 1 or inf (None: 2).
    axis_name: mapped axes the updates are sharded over inside ``shard_map``, or
      a function of the updates giving them per leaf; see
      :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`LeafNormsState`.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> opt = optax.chain(clipjax.record_leaf_norms(), clipjax.clip_by_global_norm(1.0))
    >>> g = {'W': jnp.array([3.0, 4.0]), 'b': jnp.array([12.0])}
    >>> _, state = opt.update(g, opt.init(g))
    >>> {k: round(float(v), 4) for k, v in clipjax.clip_stats(state).items() if 'norm' in k}
    {'0/leaf_norms/W': 5.0, '0/leaf_norms/b': 12.0, '1/pre_clip_norm': 13.0}
  """
  p = _validate.norm_ord(2.0 if ord is None else ord, "ord")
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "record_leaf_norms")

  who = "record_leaf_norms"

  def init_fn(params: PyTree) -> LeafNormsState:
    return LeafNormsState(PerLeaf.zeros(params))

  def update_fn(
      updates: PyTree, state: LeafNormsState, params: PyTree | None = None, **extra: Any
  ) -> tuple[PyTree, LeafNormsState]:
    del params, extra
    check_state(state, LeafNormsState, who)
    _validate.check_gradient_leaves(updates, who)
    check_per_leaf(state.leaf_norms, updates, who)
    leaves = jax.tree.leaves(updates)
    axes = _axes.leaf_axes(axis_name, updates, who)
    forms = _forms.for_trace(impl)
    norms = _norms.flat_norms(leaves, p, jnp.float32, axes, [None] * len(leaves), forms)
    new = LeafNormsState(PerLeaf(norms.value(jnp.float32), state.leaf_norms.paths))
    return updates, in_place(state, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def register_stats_type(cls: type, per_leaf: tuple[str, ...] = ()) -> type:
  """Makes :func:`clip_stats` report the fields of NamedTuple `cls`.

  Scalar fields are reported by name. A :class:`clipjax.PerLeaf` field, and a
  field named in `per_leaf` that holds a pytree of scalars (one per leaf of the
  updates), is reported as ``<field>/<leaf path>``.
  """
  if cls not in _STAT_TYPES:
    _STAT_TYPES.append(cls)
  if per_leaf:
    _PER_LEAF_FIELDS[cls] = tuple(per_leaf)
  return cls


def _array(value: Any) -> Any:
  """The array in a Flax NNX variable (``nnx.Optimizer`` keeps its state in them), else `value`."""
  return value.get_value() if is_nnx_variable(value) else value


def _stat_nodes(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
  """(path, node) for every registered stats node, also inside another's subtrees."""
  types = tuple(_STAT_TYPES)
  found = []
  nodes, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, types))
  for sub_path, node in nodes:
    if isinstance(node, types):
      found.append((path + tuple(sub_path), node))
      # Every registered stats type is a NamedTuple.
      for field, value in node._asdict().items():  # type: ignore[attr-defined]
        if isinstance(value, PerLeaf):
          continue
        if not hasattr(value, "shape"):  # a nested state (e.g. skip_spikes' inner_state)
          found.extend(_stat_nodes(value, path + tuple(sub_path) + (field,)))
  return found


def clip_stats(opt_state: Any, prefix: str = "") -> dict[str, jax.Array]:
  """A flat ``{name: scalar}`` dict of every clipper's state, ready for logging.

  With a single clipper in `opt_state` the names are its scalar field names
  (``pre_clip_norm``, ``clip_scale``, ``clipped``, ``num_clipped``, ...;
  buffers such as AutoClip's norm history are left out). With several, each
  name is prefixed by the path to its clipper in the state, e.g.
  ``'0/pre_clip_norm'`` and ``'2/inner_state/pre_clip_norm'``, so none
  collide (a clipper at the root of the state, e.g. :func:`clipjax.skip_spikes`
  wrapping another, keeps plain names). Works inside ``jit`` (values are arrays) and on host states.

  Args:
    opt_state: any optimizer state (chains, ``inject_hyperparams``,
      ``MultiSteps``, ``masked``, :func:`clipjax.skip_spikes` ... wrapping
      clipjax clippers), including a Flax NNX optimizer's ``opt_state``, whose
      values are read out of their ``nnx`` variables.
    prefix: prepended to every name (e.g. ``'clip/'``).

  Returns:
    A dict from names to the fields' values.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {'w': jnp.array([3.0, 4.0])}
    >>> _, state = opt.update(g, opt.init(g))
    >>> stats = clipjax.clip_stats(state)
    >>> float(stats['pre_clip_norm']), int(stats['num_clipped'])
    (5.0, 1)
  """
  found = _stat_nodes(opt_state)
  out: dict[str, jax.Array] = {}
  for path, node in found:
    where = "".join(key_str(k) + "/" for k in path) if len(found) > 1 else ""
    per_leaf = _PER_LEAF_FIELDS.get(type(node), ())
    for field, value in node._asdict().items():
      if isinstance(value, PerLeaf):
        values = _array(value.values)
        for i, name in enumerate(value.paths):
          out[f"{prefix}{where}{field}/{name}"] = values[..., i]
        continue
      if field in per_leaf:
        leaves = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_nnx_variable)[0]
        for leaf_path, leaf in leaves:
          name = "/".join(key_str(k) for k in leaf_path)
          out[f"{prefix}{where}{field}/{name}"] = _array(leaf)
        continue
      value = _array(value)
      if getattr(value, "ndim", None) == 0:
        out[f"{prefix}{where}{field}"] = value
  return out
