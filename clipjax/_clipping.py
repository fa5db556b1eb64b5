"""The fixed-threshold clippers: value, per-leaf norm, global norm, block RMS, AGC."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipjax import _axes, _base, _forms, _numerics, _shaping, _validate
from clipjax._types import AxisSpec, DTypeLike, Implementation, NonFinite, Ord, PyTree, Scalar

# ------------------------------------------------------------ value
# Element-wise clipping (PyTorch ``clip_grad_value_``, Keras ``clipvalue``).


def clip_by_value(
    max_delta: Scalar,
    *,
    nonfinite: NonFinite = "propagate",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips every element of the updates to :math:`[-\text{max\_delta}, \text{max\_delta}]`.

  This changes the update's direction; prefer a norm-based clipper unless you
  want exactly this. NaN entries stay NaN under ``'propagate'``.

  Args:
    max_delta: the largest allowed absolute value, >= 0.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    axis_name: inside ``shard_map``, the mapped axes the leaves are sharded
      over, as in :func:`clipjax.clip_by_global_norm` (``'auto'``, names, or
      the gradients' PartitionSpecs). The clipped values are the same either
      way; with it, the stats (and the non-finite decision) are the whole
      model's on every device instead of each shard's own.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs``; its :class:`clipjax.ClipState`
    holds the global L2 norm before clipping, ``clip_scale`` = post-clip norm
    / pre-clip norm, and whether any element was clipped.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_value(1.0)
    >>> g = {'w': jnp.array([-3.0, 0.5, 2.0])}
    >>> tx.update(g, tx.init(g))[0]['w']
    Array([-1. ,  0.5,  1. ], dtype=float32)

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012.
  """
  _validate.scalar(max_delta, "max_delta", low=0.0)
  policy = _validate.nonfinite_policy(nonfinite)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "clip_by_value")

  def clip_fn(
      updates: PyTree, params: PyTree
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _axes.leaf_axes(axis_name, updates, "clip_by_value")
    mapped = any(a is not None for a in axes)
    # (one copy of the small leaves' rows for the norm and for packed_rows)
    blocks = _shaping.Blocks()
    forms = _forms.for_trace(impl)
    if mapped:  # (packed rows would mix leaves whose sums are reduced over other axes)
      forms = dataclasses.replace(
          forms,
          packed=False,
          value_stats="siblings" if forms.value_stats == "output" else forms.value_stats,
      )
    delta = _base.hyper(max_delta, jnp.float32)
    if (
        forms.value_stats == "rows"
        and leaves
        and _numerics.accumulation_dtype(jnp.float32, leaves).itemsize < 8
    ):
      bounds = [_bound(max_delta, u.dtype) for u in leaves]
      new = [jnp.clip(u, -b, b) for u, b in zip(leaves, bounds)]
      norm, clipped, ratio = _numerics.value_stats(leaves, bounds, axes)
      scale = _base.poison(jnp.where(clipped, ratio, 1.0), delta)
      return jax.tree.unflatten(treedef, new), norm, scale, clipped
    norm = _numerics.tree_norms(leaves, 2.0, jnp.float32, axes, forms, blocks)
    pre = norm.value(jnp.float32)
    safe_delta = jnp.where(delta > 0, delta, 1)

    def capped_squares(u: jax.Array, dtype: Any) -> jax.Array:
      """(clip(u)/delta)^2 from the gradients alone: min((u/delta)^2, (bound/delta)^2).

      (Squaring is monotone in |u|; NaN stays NaN.) The sum in units of delta is
      at most the count of entries, so a plain float32 sum cannot overflow, and
      when something was clipped it is about 1 or more: it cannot underflow.
      """
      cap = _bound(max_delta, dtype).astype(jnp.float32) / safe_delta
      return jnp.minimum(jnp.square(u.astype(jnp.float32) / safe_delta), cap * cap)

    def packed_rows(us: list[jax.Array], dt: Any) -> tuple[tuple[jax.Array, ...] | None, list[int]]:
      """On CPU, the small leaves' (maxima, clipped sums), from packed rows (see _shaping.packing).

      One copy of the rows for both, in the accumulation dtype (the norm's,
      unless a float64 leaf widens it): float32 holds every bfloat16 or
      float16 value and float64 stays float64, so the maxima are exact.
      """
      rows_dtype = _numerics.accumulation_dtype(jnp.float32, us)
      return _shaping.packed_values(
          us,
          rows_dtype,
          lambda rows: (_numerics.abs_max(rows, axis=1), jnp.sum(capped_squares(rows, dt), 1)),
          forms,
          blocks,
      )

    # Whether an entry exceeds max_delta is decided in the leaf's own dtype: a
    # float64 entry of 1 + 1e-10 is above 1 although its float32 rounding is not.
    # (Leaves of one dtype share a bound: one comparison per dtype. Their maxima
    # are concatenated with _shaping.flatten: a jnp.stack of 500 per-leaf values
    # fused into its consumer took 139 s to compile.)
    by_dtype: dict = {}
    for i, u in enumerate(leaves):
      by_dtype.setdefault(jnp.dtype(u.dtype), []).append(i)
    rows = {dt: packed_rows([leaves[i] for i in members], dt) for dt, members in by_dtype.items()}
    over = []
    for dt, members in by_dtype.items():
      packed, alone = rows[dt]
      maxima = [_numerics.abs_max(leaves[members[i]]) for i in alone]
      if mapped:  # (never packed then)
        maxima = _axes.psum_grouped(maxima, [axes[i] for i in members], lax.pmax)
      # (a maximum of values of dtype dt: exact in it)
      maxima += [] if packed is None else [packed[0].astype(dt)]
      over.append(jnp.max(_shaping.flatten(maxima, 1)[0]) > _bound(max_delta, dt))
    clipped = jnp.any(jnp.stack(over)) if over else jnp.zeros([], jnp.bool_)

    def clip_all(leaves: list[jax.Array], go: jax.Array) -> list[jax.Array]:
      """Every leaf clipped to its dtype's bound where `go`, else to inf.

      The values are those of clipping to the bound (without `go` no entry
      exceeds it). But the limit depends on `go`, so on every reduction, and it
      is one scalar per dtype computed once: as `jnp.where(go, clip(u), u)`, the
      dozen scalar operations behind `go` were fused into every leaf's loop
      (compile time).
      """
      limits = {}
      for dt in by_dtype:
        hi = _shaping.computed_once(jnp.where(go, _bound(max_delta, dt), jnp.inf))
        limits[dt] = (-hi, hi)
      return [jnp.clip(u, *limits[jnp.dtype(u.dtype)]) for u in leaves]

    # The post-clip norm is only used when something was clipped (the scale is 1
    # otherwise). Off the CPU it is summed from the gradients as if every leaf
    # were clipped: a sibling of the norm's and the maxima's reductions, which
    # XLA's GPU backend computes in the same pass over the gradients (summed over
    # the clipped output, it would be a second pass there, as the clipped values
    # fuse into the optimizer's loops). XLA's CPU backend does not fuse
    # siblings, but does fuse a sum over the output into the loop that writes
    # it: there it is summed over the output (the sibling form measured 1.5x
    # slower for clip_by_value alone, 8M parameters), except for the small
    # leaves, whose sums come from their packed rows like their maxima (a
    # reduction per leaf is a kernel and a buffer: compile time). The values
    # are the same, so a program lowered for one backend on another is only
    # slower.
    # Either way the output depends on every reduction (the norm and maxima
    # through `go`), so XLA reads the inputs for them before writing the
    # clipped values in place; without that, XLA CPU copies every donated input
    # first (measured: 16.6 ms instead of 7 ms for 8M parameters).
    if not leaves:
      post_sq = jnp.zeros([], jnp.float32)
      new = []
    elif forms.value_stats == "output":
      go = clipped | jnp.isnan(norm.r) | jnp.isnan(delta)
      new = clip_all(leaves, go)
      sums = []
      for dt, members in by_dtype.items():
        packed, alone = rows[dt]
        # (concatenated, not a chain of adds: faster to compile)
        sums += [
            jnp.sum(jnp.square(new[members[i]].astype(jnp.float32) / safe_delta)) for i in alone
        ]
        sums += [] if packed is None else [packed[1]]
      post_sq = jnp.sum(_shaping.flatten(sums, 1))
    else:
      post_sums = [jnp.sum(capped_squares(u, u.dtype)) for u in leaves]
      post_sq = jnp.sum(_shaping.flatten(_axes.psum_grouped(post_sums, axes), 1))
      # post_sq is NaN only when the norm is: read for the ordering above.
      go = clipped | jnp.isnan(norm.r) | jnp.isnan(delta) | jnp.isnan(post_sq)
      new = clip_all(leaves, go)
    post = safe_delta * jnp.sqrt(post_sq)
    scale = _base.poison(_base.safe_ratio(post, pre, clipped), delta)
    return jax.tree.unflatten(treedef, new), norm, scale, clipped

  return _base.make_clipper("clip_by_value", clip_fn, policy)


def _bound(max_delta: Scalar, dtype: DTypeLike) -> jax.Array:
  """max_delta in the leaf's `dtype` (as optax.clip): what entries are compared and clipped to."""
  return jnp.maximum(jnp.asarray(max_delta).astype(dtype), 0)


# ------------------------------------------------------------ leaf_norm
# Clipping each leaf by its own norm (Keras ``clipnorm``, ``tf.clip_by_norm``).


def clip_by_norm(
    max_norm: Scalar,
    *,
    ord: Ord = None,  # noqa: A002
    nonfinite: NonFinite = "propagate",
    norm_dtype: DTypeLike = "float32",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each leaf separately so that its norm is at most `max_norm`.

  .. math::
    g_i \leftarrow g_i \cdot \min\left(1, \frac{\text{max\_norm}}{\|g_i\|_p}\right)

  Norms are float32-accumulated and overflow-safe (see
  :func:`clipjax.clip_by_global_norm`).

  Args:
    max_norm: the largest allowed norm of each leaf, >= 0.
    ord: the norm's order: any p >= 1, or ``inf``; None means 2. Static.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    norm_dtype: accumulation dtype (float32 default).
    axis_name: mapped axes the leaves are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs``; its :class:`clipjax.ClipState`
    holds the global p-norm before clipping and the smallest per-leaf scale.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_norm(1.0)
    >>> g = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.5])}
    >>> u, s = tx.update(g, tx.init(g))
    >>> u['a'], u['b']
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    >>> round(float(s.clip_scale), 6)
    0.2

  References:
    Chollet et al., Keras ``Optimizer(clipnorm=...)``;
    ``tf.clip_by_norm``.
  """
  _validate.scalar(max_norm, "max_norm", low=0.0)
  p = _validate.norm_ord(ord)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "clip_by_norm")

  def clip_fn(
      updates: PyTree, params: PyTree
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _axes.leaf_axes(axis_name, updates, "clip_by_norm")
    limit = _base.hyper(max_norm, _numerics.accumulation_dtype(dtype, leaves))
    forms = _forms.for_trace(impl)
    norms = _numerics.flat_norms(leaves, p, dtype, axes, [None] * len(leaves), forms, floor=limit)
    return _base.clip_each_leaf(leaves, treedef, norms, norms, limit, p, forms)

  return _base.make_clipper("clip_by_norm", clip_fn, policy)


# ------------------------------------------------------------ global_norm
# Clipping by the global norm of all leaves (PyTorch ``clip_grad_norm_``).


def clip_by_global_norm(
    max_norm: Scalar,
    *,
    ord: Ord = None,  # noqa: A002 - numpy/PyTorch name
    nonfinite: NonFinite = "propagate",
    norm_dtype: DTypeLike = "float32",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales all updates together when their global norm exceeds `max_norm`.

  .. math::
    g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\|g\|_p}\right)

  The updates are left untouched when the norm is at most `max_norm`, as in
  PyTorch's ``clip_grad_norm_`` (which adds 1e-6 to the norm; we divide
  exactly). Unlike optax and PyTorch, the norm is accumulated in float32 (or
  `norm_dtype`) whatever the gradient dtype and is overflow-safe: fp16
  gradients of 300 or fp32 gradients of 1e20 are clipped to the right norm and
  direction instead of being zeroed. Each leaf keeps its dtype.

  Args:
    max_norm: the largest allowed global norm, >= 0 (0 zeroes every update).
      May be scheduled with ``optax.inject_hyperparams``.
    ord: the norm's order: any p >= 1, or ``inf`` (max-abs); None means 2.
      Static: with ``optax.inject_hyperparams`` list it in ``static_args``.
    nonfinite: what to do when the gradients hold inf/NaN: ``'propagate'``,
      ``'zero'``, ``'skip'`` or ``'raise'`` (see :func:`clipjax.chain`).
    norm_dtype: accumulation dtype, float32 (default) or float64 under x64.
    axis_name: inside ``shard_map``, the mapped axes each leaf is split over,
      so that the norm is that of the whole arrays (its pieces are
      ``psum``-reduced). ``'auto'`` reads them from each leaf's type: the
      axes it varies over, none for a replicated leaf (a replicated
      parameter's gradient comes back already summed) and none outside
      ``shard_map``. Or give them: an axis name or tuple of names for every
      leaf, a PartitionSpec prefix tree of the updates (e.g. the gradients'
      ``in_specs``), or a function of the updates returning names or specs
      per leaf (None: replicated), e.g. ``lambda g: {'w': 'model', 'b':
      None}``. With ``check_vma=True`` (shard_map's default) a leaf whose type
      does not vary over an axis named for it is refused with a ValueError,
      never summed once per device. Leave it ``None`` under plain ``jit``
      with sharded arrays (XLA reduces). See docs/sharding.md.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`clipjax.ClipState` (pre-clip norm, scale, clipped flag, counts).

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> tx = clipjax.clip_by_global_norm(1.0)
    >>> grads = {'w': jnp.array([3.0, 4.0])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates['w']
    Array([0.6, 0.8], dtype=float32)
    >>> float(state.pre_clip_norm), bool(state.clipped)
    (5.0, True)
    >>> huge = {'w': jnp.array([3e20, 4e20], jnp.float32)}  # optax: zeros
    >>> tx.update(huge, tx.init(huge))[0]['w'].round(6)
    Array([0.6, 0.8], dtype=float32)
    >>> opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3))

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  _validate.scalar(max_norm, "max_norm", low=0.0)
  p = _validate.norm_ord(ord)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "clip_by_global_norm")

  def clip_fn(
      updates: PyTree, params: PyTree
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    del params
    forms = _forms.for_trace(impl)
    leaves, treedef, norm = _numerics.tree_global_norm(
        updates, "clip_by_global_norm", axis_name, p, dtype, forms=forms
    )
    new, scale, clipped = _base.scale_to_threshold(
        leaves, norm, _base.hyper(max_norm, norm.r.dtype), forms
    )
    return jax.tree.unflatten(treedef, new), norm, scale, clipped

  return _base.make_clipper("clip_by_global_norm", clip_fn, policy)


def clip_by_given_norm(
    max_norm: Scalar,
    *,
    norm_arg: str = "grad_norm",
    nonfinite: NonFinite = "propagate",
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales all updates by :math:`\min(1, \text{max\_norm} / n)` for a norm `n` given to update.

  The counterpart of PyTorch's ``clip_grads_with_norm_``: the norm is passed to
  ``update`` as the keyword `norm_arg` (``update(updates, state, params,
  grad_norm=n)``; an ``optax.chain`` and ``nnx.Optimizer.update`` pass extra
  keywords on to every link). Use it when the norm comes from a previous stage
  (:func:`clipjax.global_norm` of the raw gradients, before an accumulation or a
  cast), from another set of leaves (clip everything by the encoder's norm), or
  was reduced by you across hosts. The rule is that of
  :func:`clipjax.clip_by_global_norm`, and so are the state and the non-finite
  handling: an inf, NaN or negative norm is a non-finite step (under
  ``'propagate'`` an inf norm zeroes the update, as inf gradients do in
  :func:`clipjax.clip_by_global_norm`, and a NaN or negative one makes it NaN).
  Nothing is read to find the norm: the cost is the scaling alone.

  Args:
    max_norm: the largest allowed norm, >= 0. May be scheduled with
      ``optax.inject_hyperparams``.
    norm_arg: the name of the ``update`` keyword that carries the norm.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`clipjax.ClipState` (its ``pre_clip_norm`` is the norm given).

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> grads = {'encoder': jnp.array([3.0, 4.0]), 'head': jnp.array([100.0])}
    >>> tx = clipjax.clip_by_given_norm(1.0)
    >>> n = clipjax.global_norm(grads['encoder'])  # the encoder's norm clips everything
    >>> updates, state = tx.update(grads, tx.init(grads), grad_norm=n)
    >>> updates['encoder'], updates['head'], float(state.pre_clip_norm)
    (Array([0.6, 0.8], dtype=float32), Array([20.], dtype=float32), 5.0)
  """
  _validate.scalar(max_norm, "max_norm", low=0.0)
  if not isinstance(norm_arg, str) or not norm_arg.isidentifier():
    raise ValueError(f"norm_arg must be a keyword name, got {norm_arg!r}")
  policy = _validate.nonfinite_policy(nonfinite)
  impl = _validate.implementation(implementation, "clip_by_given_norm")
  who = "clip_by_given_norm"

  def clip_fn(
      updates: PyTree, params: PyTree, **extra_args: Any
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    del params
    if norm_arg not in extra_args:
      raise ValueError(
          f"{who} needs the norm: call update(updates, state, params, {norm_arg}=norm)."
      )
    given = jnp.asarray(extra_args[norm_arg])
    if given.shape != ():
      raise ValueError(f"{who}: {norm_arg} must be a scalar, got shape {given.shape}.")
    dtype = jnp.float64 if given.dtype == jnp.float64 else jnp.float32
    given = given.astype(dtype)
    given = jnp.where(given < 0, jnp.asarray(jnp.nan, dtype), given)  # not a norm
    norm = _numerics.Split(given, jnp.zeros([], jnp.int32))
    leaves, treedef = jax.tree.flatten(updates)
    forms = _forms.for_trace(impl)
    new, scale, clipped = _base.scale_to_threshold(
        leaves, norm, _base.hyper(max_norm, dtype), forms
    )
    return jax.tree.unflatten(treedef, new), norm, scale, clipped

  return _base.make_clipper(who, clip_fn, policy, takes_extra_args=True)


@dataclasses.dataclass(frozen=True)
class _Labels:
  """A group label and the number of leaves it stands for.

  Not a pytree node, so a label tree shaped like list-structured updates
  (``[w, b]``) flattens to one of these per label, not to the labels' lists.
  """

  label: Hashable
  count: int


def clip_by_group_norm(
    max_norm: Scalar | Mapping[Hashable, Scalar],
    labels: PyTree | Callable[[PyTree], PyTree],
    *,
    ord: Ord = None,  # noqa: A002 - numpy/PyTorch name
    nonfinite: NonFinite = "propagate",
    norm_dtype: DTypeLike = "float32",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each group of leaves by the group's own global norm, all groups in one transform.

  .. math::
    g_G \leftarrow g_G \cdot \min\left(1, \frac{\tau_G}{\|g_G\|_p}\right)
    \quad \text{for each group } G

  Groups are given as in ``optax.partition``: `labels` is a pytree of hashable
  labels with the structure of the updates, or a function of the updates that
  returns one (e.g. ``lambda g: {'encoder': 'body', 'decoder': 'body', 'head':
  'head'}``). One label for every leaf is :func:`clipjax.clip_by_global_norm`;
  one label per leaf is :func:`clipjax.clip_by_norm`. All leaves are reduced
  together (one read of the gradients), and the group norms are combined from
  the per-leaf ones, overflow-safe as everywhere in clipjax. The state is a
  :class:`clipjax.ClipState`: ``pre_clip_norm`` is the global norm over all
  groups, ``clip_scale`` the smallest group scale, ``clipped`` whether any group
  was clipped; for each group's norm, put :func:`clipjax.record_leaf_norms`
  before it.

  Args:
    max_norm: the largest allowed norm of every group, >= 0, or a mapping from
      each label to its group's (a missing label is an error at the first
      update). A single value may be scheduled with ``optax.inject_hyperparams``.
    labels: the leaves' group labels, or a function of the updates giving them.
    ord: the norm's order: any p >= 1, or ``inf``; None means 2.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``. Under
      ``'propagate'`` a NaN gradient makes its group's update NaN.
    norm_dtype: accumulation dtype, float32 (default) or float64 under x64.
    axis_name: as in :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`clipjax.ClipState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> g = {'body': {'w': jnp.array([3.0, 4.0]), 'b': jnp.array([0.0])}, 'head': jnp.array([0.5])}
    >>> labels = {'body': 'body', 'head': 'head'}  # 'body' labels the whole subtree
    >>> tx = clipjax.clip_by_group_norm({'body': 1.0, 'head': 1.0}, labels)
    >>> out, state = tx.update(g, tx.init(g))
    >>> out['body']['w'], out['head'], round(float(state.clip_scale), 6)
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32), 0.2)
  """
  # One threshold for every group, or one per label.
  group_limits: dict[Hashable, Scalar] | None = None
  single: Scalar = 0.0
  if isinstance(max_norm, Mapping):
    group_limits = dict(max_norm)
    if not group_limits:
      raise ValueError("max_norm must be a number or a non-empty mapping from labels to numbers")
    for label, value in group_limits.items():
      _validate.scalar(value, f"max_norm[{label!r}]", low=0.0)
  else:
    _validate.scalar(max_norm, "max_norm", low=0.0)
    single = max_norm
  if labels is None:
    raise ValueError("labels must be a pytree of group labels or a function of the updates")
  p = _validate.norm_ord(ord)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "clip_by_group_norm")
  who = "clip_by_group_norm"

  def leaf_labels(updates: PyTree, n: int) -> list[Hashable]:
    tree = labels(updates) if callable(labels) else labels
    # A label may stand for a whole subtree (a prefix of the updates' structure).
    try:
      chunks = jax.tree.map(lambda lab, sub: _Labels(lab, len(jax.tree.leaves(sub))), tree, updates)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"{who}: labels must have the structure of the updates, or a prefix of it ({e})"
      ) from e
    out = [c.label for c in jax.tree.leaves(chunks) for _ in range(c.count)]
    if len(out) != n:
      raise ValueError(f"{who}: {len(out)} labels for {n} leaves (a None label is no label)")
    if group_limits is not None:
      missing = sorted({repr(x) for x in out if x not in group_limits})
      if missing:
        raise ValueError(f"{who}: max_norm has no entry for the labels {', '.join(missing)}")
    return out

  def clip_fn(
      updates: PyTree, params: PyTree
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    del params
    leaves, treedef = jax.tree.flatten(updates)
    names = leaf_labels(updates, len(leaves))
    axes = _axes.leaf_axes(axis_name, updates, who)
    groups = list(dict.fromkeys(names))  # in order of first appearance
    index = np.asarray([groups.index(n) for n in names], np.int32)
    members = [np.flatnonzero(index == k) for k in range(len(groups))]
    ft = _numerics.accumulation_dtype(dtype, leaves)
    if group_limits is not None:
      limits = jnp.stack([_base.hyper(group_limits[g], ft) for g in groups])[index]
    else:
      limits = _base.hyper(single, ft)
    # A group of k leaves has a norm at most k^(1/p) times its largest leaf's.
    sizes = np.asarray([len(m) for m in members], np.float64)[index]
    floor = limits / jnp.asarray(sizes ** (1.0 / p), ft)
    forms = _forms.for_trace(impl)
    norms = _numerics.flat_norms(leaves, p, dtype, axes, [None] * len(leaves), forms, floor=floor)
    group_norms = [_numerics.combine(_numerics.Split(norms.r[m], norms.e[m]), p) for m in members]
    measure = _numerics.Split(
        jnp.stack([g.r for g in group_norms])[index], jnp.stack([g.e for g in group_norms])[index]
    )
    return _base.clip_each_leaf(leaves, treedef, norms, measure, limits, p, forms)

  return _base.make_clipper(who, clip_fn, policy)


# ------------------------------------------------------------ block_rms
# Clipping each leaf (block) by its root-mean-square value.


def clip_by_block_rms(
    threshold: Scalar,
    *,
    nonfinite: NonFinite = "propagate",
    norm_dtype: DTypeLike = "float32",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each leaf so that its RMS, :math:`\|g_i\|_2/\sqrt{n_i}`, is at most `threshold`.

  Scale-free across layer sizes, unlike :func:`clipjax.clip_by_norm`. The RMS
  of a zero-size leaf is 0.

  Args:
    threshold: the largest allowed RMS of each leaf, >= 0.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    norm_dtype: accumulation dtype (float32 default).
    axis_name: mapped axes the leaves are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs``; its :class:`clipjax.ClipState`
    holds the global L2 norm before clipping and the smallest per-leaf scale.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_block_rms(1.0)
    >>> g = {'w': jnp.array([2.0, -2.0, 2.0, -2.0])}  # RMS 2
    >>> tx.update(g, tx.init(g))[0]['w']
    Array([ 1., -1.,  1., -1.], dtype=float32)

  References:
    ``optax.clip_by_block_rms``; Shazeer & Stern, `Adafactor
    <https://arxiv.org/abs/1804.04235>`_, 2018 (update clipping by RMS).
  """
  _validate.scalar(threshold, "threshold", low=0.0)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "clip_by_block_rms")

  def clip_fn(
      updates: PyTree, params: PyTree
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _axes.leaf_axes(axis_name, updates, "clip_by_block_rms")
    limit = _base.hyper(threshold, _numerics.accumulation_dtype(dtype, leaves))
    # A leaf's norm is its RMS times sqrt(size) >= 1: `limit` bounds the norm it may have.
    forms = _forms.for_trace(impl)
    norms = _numerics.flat_norms(leaves, 2.0, dtype, axes, [None] * len(leaves), forms, floor=limit)
    sizes = [u.size if a is None else jax.lax.psum(u.size, a) for u, a in zip(leaves, axes)]
    # The RMS of a zero-size leaf is 0 (its norm is 0): divide by 1 there.
    acc = norms.r.dtype
    roots = (
        jnp.sqrt(jnp.maximum(_shaping.stack([jnp.asarray(n, acc) for n in sizes]), 1))
        if sizes
        else jnp.ones((0,), acc)
    )
    rms = _numerics.Split(norms.r / roots, norms.e)
    return _base.clip_each_leaf(leaves, treedef, norms, rms, limit, 2.0, forms)

  return _base.make_clipper("clip_by_block_rms", clip_fn, policy)


# ------------------------------------------------------------ agc
# Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021).


def _unit_axes(
    x: jax.Array, axis: Any, path: str, shape: tuple[int, ...] | None = None
) -> tuple[int, ...] | None:
  """The axes AGC reduces over for a leaf; None means the whole leaf.

  `shape` is the whole array's, where x is a shard of it (inside shard_map a
  (8, 16) kernel split 8 ways is a (1, 16) shard, which is no vector).
  """
  shape = x.shape if shape is None else shape
  if axis is not None and x.ndim >= 2:
    # An explicit axis is taken as given, as optax does: a (1, 8) kernel has 8
    # units when axis=0, not one (squeezing first would merge them).
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
      if not -x.ndim <= a < x.ndim:
        raise ValueError(
            f"adaptive_grad_clip: axis={axis} is out of range for leaf {path} of shape {x.shape}."
        )
    return tuple(a % x.ndim for a in axes)
  if sum(d != 1 for d in shape) <= 1:  # scalars, vectors (biases, gains)
    return None
  if x.ndim in (2, 3):  # dense (in, out) or multi-head (in, heads, out): per output unit
    return (0,)
  if x.ndim == 4:  # conv kernels HWIO: per output channel
    return (0, 1, 2)
  raise ValueError(
      f"adaptive_grad_clip: leaf {path} has rank {x.ndim} (shape {x.shape}); the default "
      "units are defined for ranks 0-4. Pass axis= to say which axes form a unit."
  )


def _reduced_dims(x: jax.Array, unit: tuple[int, ...] | None) -> tuple[int, ...]:
  return tuple(range(x.ndim)) if unit is None else unit


def adaptive_grad_clip(
    clipping: Scalar,
    *,
    eps: Scalar = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    nonfinite: NonFinite = "propagate",
    norm_dtype: DTypeLike = "float32",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each unit's gradient relative to the norm of its parameters.

  For every unit :math:`i` (an output neuron / channel; a whole vector or scalar
  leaf):

  .. math::
    g_i \leftarrow g_i \cdot \min\left(1, \lambda\,
      \frac{\max(\|W_i\|, \epsilon)}{\|g_i\|}\right)

  Units follow optax/NFNets: rank <= 1 (after squeezing) is one unit; rank 2
  and 3 reduce over axis 0 (dense ``(in, out)`` and multi-head kernels); rank 4
  over ``(0, 1, 2)`` (HWIO conv). Other ranks need `axis`. An explicit `axis`
  applies to every leaf of rank >= 2 as it is, without squeezing (a ``(1, 8)``
  kernel with ``axis=0`` has 8 units).

  Args:
    clipping: the ratio :math:`\lambda` > 0 (NFNets use 0.01 to 0.16).
    eps: floor on the parameter norm, > 0, so zero-initialised units can move.
    axis: int or tuple of ints: the axes that are reduced for rank >= 2 leaves,
      overriding the defaults above.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    norm_dtype: accumulation dtype (float32 default).
    axis_name: inside ``shard_map``, the mapped axes that each leaf's *reduced*
      axes (the ones forming a unit) are sharded over, so that unit norms of
      gradients and parameters are all-reduced. The gradients' PartitionSpecs
      (a prefix tree of the updates, e.g. the ``in_specs``) say it best: only
      the mesh axes that split a leaf's reduced dimensions are taken. Or axis
      names, or a function of the updates giving them per leaf (None: the
      leaf's units are whole on every shard, e.g. replicated, or sharded along
      the output axis). ``'auto'`` is refused: a type does not say which
      dimension is split. The stats are the whole model's on every device,
      also for leaves split along the output axis (from the PartitionSpecs,
      or from the types under ``check_vma=True``).
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` that needs ``params`` in ``update``;
    its :class:`clipjax.ClipState` holds the global L2 norm before clipping and
    the smallest unit scale.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.adaptive_grad_clip(0.1)
    >>> params = {'w': jnp.ones((2, 2))}            # unit (column) norms sqrt(2)
    >>> grads = {'w': jnp.array([[3.0, 0.0], [4.0, 0.1]])}
    >>> u, _ = tx.update(grads, tx.init(params), params)
    >>> [round(float(v), 4) for v in jnp.linalg.norm(u['w'], axis=0)]
    [0.1414, 0.1]

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
  """
  _validate.scalar(clipping, "clipping", low=0.0, low_inclusive=False)
  _validate.scalar(eps, "eps", low=0.0, low_inclusive=False)
  if axis is not None and not (
      isinstance(axis, int) or (isinstance(axis, tuple) and all(isinstance(a, int) for a in axis))
  ):
    raise TypeError(
        f"axis must be None, an int or a tuple of ints, got {axis!r} (with "
        "optax.inject_hyperparams, list 'axis' in static_args)."
    )
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "adaptive_grad_clip")

  def clip_fn(
      updates: PyTree, params: PyTree
  ) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
    g_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
    g_leaves = [g for _, g in g_paths]
    # (jaxlib's PyTreeDef has no type stubs)
    try:
      w_leaves = treedef.flatten_up_to(params)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as e:
      raise ValueError(
          "adaptive_grad_clip: params must have the updates' structure "
          f"({treedef}); got {jax.tree.structure(params)}."
      ) from e
    units: list[tuple[int, ...] | None] = []
    whole = dict(enumerate(_axes.global_shapes(axis_name, updates)))
    for (path, g), w in zip(g_paths, w_leaves):
      if w.shape != g.shape:
        raise ValueError(
            f"adaptive_grad_clip: params and updates differ at {jax.tree_util.keystr(path)}: "
            f"{w.shape} vs {g.shape}."
        )
      units.append(_unit_axes(g, axis, jax.tree_util.keystr(path), whole.get(len(units))))
    mapped = _axes.leaf_axes(
        axis_name,
        updates,
        "adaptive_grad_clip",
        [_reduced_dims(g, u) for g, u in zip(g_leaves, units)],
    )
    kept = _axes.kept_axes(
        axis_name,
        updates,
        [
            [d for d in range(g.ndim) if d not in _reduced_dims(g, u)]
            for g, u in zip(g_leaves, units)
        ],
        mapped,
    )
    # Leaves split along a kept axis hold other units on each device: they are
    # clipped apart from the rest (inside shard_map a vector mixing them would
    # type every leaf's scales as varying), and their stats combined over the
    # devices, so that every device reports and decides on the whole model's.
    forms = _forms.for_trace(impl)
    groups: dict[Any, list[int]] = {}
    for i, a in enumerate(kept):
      groups.setdefault(a, []).append(i)
    new: list[Any] = [None] * len(g_leaves)
    parts = []
    for a, idx in groups.items():
      out, total, least, any_clipped = _agc_units(
          [g_leaves[i] for i in idx],
          [w_leaves[i] for i in idx],
          [units[i] for i in idx],
          [mapped[i] for i in idx],
          forms,
      )
      if a is not None:
        total = _numerics.psum_norm(total, a)
        least = lax.pmin(least, a)
        any_clipped = lax.pmax(any_clipped.astype(jnp.int32), a) > 0
      for i, x in zip(idx, out):
        new[i] = x
      parts.append((total, least, any_clipped))
    if len(parts) == 1:
      total, least, any_clipped = parts[0]
    else:
      total = _numerics.combine(
          _numerics.Split(
              jnp.stack([t.r for t, _, _ in parts]), jnp.stack([t.e for t, _, _ in parts])
          ),
          2.0,
      )
      least = jnp.min(jnp.stack([m for _, m, _ in parts]))
      any_clipped = jnp.any(jnp.stack([c for _, _, c in parts]))
    return jax.tree.unflatten(treedef, new), total, least, any_clipped

  def _agc_units(
      g_leaves: list[jax.Array],
      w_leaves: list[jax.Array],
      units: list[tuple[int, ...] | None],
      mapped: list[Any],
      forms: _forms.Forms,
  ) -> tuple[list[jax.Array], _numerics.Split, jax.Array, jax.Array]:
    """The leaves clipped unit by unit, their global norm, least scale and whether any was."""
    # The unit norms of every gradient and parameter leaf as one flat vector (one
    # branch on CPU), and the scales computed on it in one go: a few operations
    # for the whole tree, not a few per leaf (XLA's compile time counts them).
    acc = _numerics.accumulation_dtype(dtype, g_leaves + w_leaves)
    lam, eps_v = _base.hyper(clipping, acc), _base.hyper(eps, acc)
    if _numerics.wide(2.0, acc, forms) and g_leaves:
      # Each leaf scaled by factors from its own norms (`unitwise_clip`).
      return _numerics.unitwise_clip(g_leaves, w_leaves, lam, eps_v, mapped, units, forms)
    half = sum(math.prod(_shaping.reduced_shape(g.shape, u, True)) for g, u in zip(g_leaves, units))
    # A gradient unit's limit is at least clipping * eps; a parameter unit's norm
    # counts only above eps.
    floors = jnp.concatenate([jnp.full((half,), lam * eps_v, acc), jnp.full((half,), eps_v, acc)])
    flat = _numerics.flat_norms(
        g_leaves + w_leaves,
        2.0,
        dtype,
        mapped + mapped,
        units + units,
        forms,
        floor=floors,
        reported=half,
    )
    g_norm = _numerics.Split(flat.r[:half], flat.e[:half])
    w_norm = _numerics.Split(flat.r[half:], flat.e[half:]).value()
    limit = lam * jnp.maximum(w_norm, eps_v)
    f1, f2, clipped = _numerics.clip_factors(limit, g_norm, forms)
    shapes = [_shaping.reduced_shape(g.shape, u, True) for g, u in zip(g_leaves, units)]
    new = _base.scale_each_leaf(g_leaves, f1, f2, shapes, forms)
    total = _numerics.combine(g_norm, 2.0)
    return new, total, jnp.min(f1 * f2, initial=1.0), jnp.any(clipped)

  return _base.make_clipper("adaptive_grad_clip", clip_fn, policy, needs_params=True)
