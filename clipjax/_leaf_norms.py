"""`record_leaf_norms`: each leaf's norm of the updates, recorded in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _axes, _forms, _numerics, _validate
from clipjax._base import PerLeaf, check_per_leaf, check_state, in_place
from clipjax._stats import register_stats_type
from clipjax._types import AxisSpec, Implementation, Ord, PyTree


@register_stats_type
class LeafNormsState(NamedTuple):
  """State of :func:`clipjax.record_leaf_norms`.

  Attributes:
    leaf_norms: each leaf's p-norm of the last updates it saw, as a
      :class:`clipjax.PerLeaf` (one float32 vector with the leaves' paths;
      ``state.leaf_norms.as_dict()`` gives ``{path: norm}``).
  """

  leaf_norms: PerLeaf


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
    norms = _numerics.flat_norms(leaves, p, jnp.float32, axes, [None] * len(leaves), forms)
    new = LeafNormsState(PerLeaf(norms.value(jnp.float32), state.leaf_norms.paths))
    return updates, in_place(state, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
