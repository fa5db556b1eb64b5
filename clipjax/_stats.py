"""Collecting what every clipper did from any (nested) optimizer state."""

from __future__ import annotations

from typing import Any

import jax

from clipjax._base import (
    ClipState,
    PerLeaf,
    is_nnx_variable,
    key_str,
    unique_names,
)

# Stat-bearing state types; the adaptive clippers register theirs here.
_STAT_TYPES: list[type] = [ClipState]
# Fields holding one scalar per leaf: clip_stats names them by the leaf's path.
# (A :class:`PerLeaf` field is named so whatever the type.)
_PER_LEAF_FIELDS: dict[type, tuple[str, ...]] = {}


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
        names = unique_names([[p] for p in value.paths], f"the leaves of {field!r}")
        for i, name in enumerate(names):
          out[f"{prefix}{where}{field}/{name}"] = values[..., i]
        continue
      if field in per_leaf:
        leaves = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_nnx_variable)[0]
        names = unique_names(
            [[key_str(k) for k in leaf_path] for leaf_path, _ in leaves], f"the leaves of {field!r}"
        )
        for name, (_, leaf) in zip(names, leaves):
          out[f"{prefix}{where}{field}/{name}"] = _array(leaf)
        continue
      value = _array(value)
      if getattr(value, "ndim", None) == 0:
        out[f"{prefix}{where}{field}"] = value
  return out
