"""Per-example clipping (DP-SGD): each example's gradient clipped, summed or averaged, noised."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipjax import _axes, _base, _forms, _numerics, _shaping, _validate
from clipjax._stats import register_stats_type
from clipjax._types import AxisName, AxisSpec, Implementation, NonFinite, PyTree, Scalar

Reduction = Literal["sum", "mean"]
LayerBudget = Literal["uniform", "proportional"]


@register_stats_type
class PerExampleClipState(NamedTuple):
  """State of :func:`clipjax.per_example_clip`.

  Attributes:
    examples_clipped: how many examples of the last batch were clipped (in
      per-layer mode: had at least one layer clipped), over all devices.
    batch_examples: the number of examples in the last batch, over all devices.
    mean_example_norm: float32 mean of the examples' global L2 norms (before
      clipping) in the last batch.
    max_example_norm: float32 largest of them.
    skipped: whether the last step was skipped (``nonfinite='skip'``).
    num_steps: steps taken so far.
    num_nonfinite: steps whose gradients held inf/NaN.
    noise_key: the PRNG key the next step's noise is drawn from.
  """

  examples_clipped: jax.Array
  batch_examples: jax.Array
  mean_example_norm: jax.Array
  max_example_norm: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_nonfinite: jax.Array
  noise_key: jax.Array


def _layer_budgets(
    leaves: list[jax.Array], clip: jax.Array, per_layer: LayerBudget | None
) -> jax.Array:
  """Each layer's share of the clip norm, as optax.per_example_layer_norm_clip."""
  if per_layer == "uniform":
    return jnp.full((len(leaves),), 1.0 / math.sqrt(len(leaves)), clip.dtype) * clip
  sizes = [math.prod(x.shape[1:]) for x in leaves]
  total = max(sum(sizes), 1)
  return jnp.asarray([math.sqrt(s / total) for s in sizes], clip.dtype) * clip


def per_example_clip(
    l2_norm_clip: Scalar,
    *,
    reduction: Reduction,
    per_layer: LayerBudget | None = None,
    noise_multiplier: Scalar = 0.0,
    seed: int | None = None,
    nonfinite: NonFinite = "propagate",
    axis_name: AxisName = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each example's gradient to `l2_norm_clip`, then sums or averages them (DP-SGD).

  The updates carry a leading batch axis on every leaf (per-example gradients,
  e.g. from ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``); the output has
  the parameters' shapes:

  .. math::
    \tilde g = \sum_b g_b \min\left(1, \frac{C}{\|g_b\|_2}\right)
      + \mathcal N(0, \sigma^2 C^2 I), \qquad
    \text{then } \tilde g / B \text{ if } \texttt{reduction='mean'}

  with :math:`C` = `l2_norm_clip` and :math:`\sigma` = `noise_multiplier`
  (no noise when 0). With `per_layer`, each leaf is clipped by its own norm to
  its share of :math:`C` (``'uniform'``: :math:`C/\sqrt{L}` for L leaves;
  ``'proportional'``: :math:`C\sqrt{D_i/D}` by parameter count), as
  ``optax.per_example_layer_norm_clip``; the noise standard deviation stays
  :math:`\sigma C`. The sum is optax's ``per_example_global_norm_clip``;
  the mean divides by the whole batch (over all devices), after the noise, as
  DP-SGD does. Norms are overflow-safe (float32 accumulation, exact for
  gradients of any finite size) and the sum accumulates in float32 for
  low-precision gradients. The noise key lives in the state: a run restored
  from a checkpoint draws the same noise it would have drawn.

  This transform only clips and adds noise; the privacy accounting
  (:math:`\epsilon, \delta` from :math:`\sigma`, the sampling rate and the
  number of steps) is not part of clipjax.

  Args:
    l2_norm_clip: C, the largest allowed L2 norm of one example's gradient,
      >= 0. May be scheduled with ``optax.inject_hyperparams``.
    reduction: required: ``'sum'`` (optax's ``per_example_global_norm_clip``)
      or ``'mean'`` (divided by the number of examples in the batch, over all
      devices, as ``optax.contrib.dpsgd`` and Opacus do). Required because the
      two conventions differ by the batch size, silently, in the learning rate.
    per_layer: None (each example's global norm), ``'uniform'`` or
      ``'proportional'`` (each leaf its own budget).
    noise_multiplier: sigma >= 0; the noise's standard deviation is
      ``noise_multiplier * l2_norm_clip``. May be scheduled. With virtual
      batches (gradients accumulated over micro-batches, e.g. by
      ``optax.MultiSteps``) leave it 0 here and add the noise once, after the
      accumulation, with :func:`clipjax.dp_noise`: noise drawn for every
      micro-batch is more noise than the privacy accounting assumes
      (:math:`\sqrt{K}` times it for K micro-batches with ``'mean'``).
    seed: the seed of the noise key kept in the state (static int); None
      means 0 (a None default is never injected by ``optax.inject_hyperparams``).
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``: what a
      batch with a non-finite example gradient does (see :func:`clipjax.chain`).
    axis_name: inside ``shard_map``/``pmap`` (or ``vmap`` with a named axis),
      the mapped axis the batch is split over: the clipped sums, counts and
      norms are reduced across it and every device gets the same result (and
      the same noise). Each device holds whole examples, and their gradients
      must be its own: with replicated parameters and ``check_vma=True`` cast
      them first, ``params = jax.lax.pcast(params, 'data', to='varying')``
      (otherwise JAX sums each example's gradient over the devices; such
      gradients are refused with a ValueError). ``'auto'`` reads the axis from
      the gradients' types. See docs/sharding.md.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`PerExampleClipState`.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> per_example = [jnp.array([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> tx = clipjax.per_example_clip(1.25, reduction="sum")
    >>> summed, state = tx.update(per_example, tx.init([jnp.zeros(3)]))
    >>> summed[0], int(state.examples_clipped), float(state.max_example_norm)
    (Array([1.75, 1.75, 1.75], dtype=float32), 3, 5.0)
    >>> dp_sgd = clipjax.chain(  # DP-SGD: clip, average with noise, then SGD
    ...     clipjax.per_example_clip(1.0, reduction='mean', noise_multiplier=1.1), optax.sgd(0.1))

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016; McMahan et al., `Learning
    Differentially Private Recurrent Language Models
    <https://arxiv.org/abs/1710.06963>`_, 2018 (per-layer clipping).
  """
  _validate.scalar(l2_norm_clip, "l2_norm_clip", low=0.0)
  _validate.scalar(noise_multiplier, "noise_multiplier", low=0.0)
  if reduction not in get_args(Reduction):
    raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}.")
  if per_layer is not None and per_layer not in get_args(LayerBudget):
    raise ValueError(
        f"per_layer must be None or one of {get_args(LayerBudget)}, got {per_layer!r}."
    )
  seed = _validate.integer(0 if seed is None else seed, "seed", low=0)
  policy = _validate.nonfinite_policy(nonfinite)
  _validate.axis_name(axis_name)
  if not _axes.is_axis_name(axis_name):  # ('auto' is a name here too)
    raise ValueError(
        "axis_name must name the mapped batch axis (a name or a tuple of names) or be "
        f"'auto'; got {axis_name!r}."
    )
  impl = _validate.implementation(implementation, "per_example_clip")
  who = "per_example_clip"
  # A Python 0 draws no noise (and costs nothing); a scheduled value always does.
  with_noise = _validate.is_traced(noise_multiplier) or float(np.asarray(noise_multiplier)) > 0

  def init_fn(params: PyTree) -> PerExampleClipState:
    del params
    # One array per field: every field is an input of a jitted step (see
    # _base.in_place), and a buffer donated twice is an error.
    return PerExampleClipState(
        examples_clipped=jnp.zeros([], jnp.int32),
        batch_examples=jnp.zeros([], jnp.int32),
        mean_example_norm=jnp.zeros([], jnp.float32),
        max_example_norm=jnp.zeros([], jnp.float32),
        skipped=jnp.zeros([], jnp.bool_),
        num_steps=jnp.zeros([], jnp.int32),
        num_nonfinite=jnp.zeros([], jnp.int32),
        noise_key=jax.random.key_data(jax.random.key(seed)),
    )

  def update_fn(
      updates: PyTree, state: PerExampleClipState, params: PyTree | None = None, **extra: Any
  ) -> tuple[PyTree, PerExampleClipState]:
    del extra
    _base.check_state(state, PerExampleClipState, who)
    _validate.check_gradient_leaves(updates, who)
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
      return updates, state
    _check_batch(leaves, updates, params)
    batch = leaves[0].shape[0]
    batch_axes = _axes.batch_axes(axis_name, leaves, who)
    forms = _forms.for_trace(impl)

    def reduce(x: jax.Array, op: Any = lax.psum) -> jax.Array:
      return x if batch_axes is None else op(x, batch_axes)

    # Each example's per-leaf norms, all leaves reduced together over every axis
    # but the batch one (as AGC's unit norms): (leaves * batch,) -> (batch, leaves);
    # then each example's global norm (batch,).
    red = [tuple(range(1, x.ndim)) for x in leaves]
    clip = _base.hyper(l2_norm_clip, _numerics.accumulation_dtype(jnp.float32, leaves))
    budgets = None if per_layer is None else _layer_budgets(leaves, clip, per_layer)
    # The least limit of each (leaf, example) norm: an example's norm is at most
    # sqrt(leaves) times its largest leaf norm. (A padded example's zero
    # gradient then costs no second read.)
    unit_limit = clip / math.sqrt(len(leaves)) if budgets is None else budgets
    floor = jnp.repeat(jnp.broadcast_to(unit_limit, (len(leaves),)), batch)
    flat = _numerics.flat_norms(leaves, 2.0, jnp.float32, None, red, forms, floor=floor)
    # A few floats: replicated, so that the reshape below needs no sharding rule
    # (under an Explicit mesh the batch axis is split over the devices).
    flat = _numerics.Split(*(_axes.replicated(v) for v in flat))
    per_leaf = _numerics.Split(
        flat.r.reshape(len(leaves), batch).T, flat.e.reshape(len(leaves), batch).T
    )
    per_example = jax.vmap(lambda r, e: _numerics.combine(_numerics.Split(r, e), 2.0))(
        per_leaf.r, per_leaf.e
    )
    if budgets is None:
      f1, f2, clipped = _numerics.clip_factors(clip, per_example, forms)
      factors: list[tuple[jax.Array, ...]] = [(f1, f2)] * len(leaves)
      example_clipped = clipped
    else:
      f1, f2, clipped = _numerics.clip_factors(budgets, per_leaf, forms)  # (batch, leaves)
      # Leaf i's column, as a buffer of its own on CPU (see split_per_array).
      factors = _shaping.split_per_array(
          [f1.T.reshape(-1), f2.T.reshape(-1)],
          [(batch,)] * len(leaves),
          [(x.shape, x.dtype) for x in leaves],
          forms,
      )
      example_clipped = jnp.any(clipped, axis=1)

    accs = [jnp.promote_types(x.dtype, jnp.float32) for x in leaves]  # summed in these

    def contracted(xs: tuple[jax.Array, ...]) -> list[jax.Array]:
      # Every factor is one float (f2 == 1): the clipped sum is a contraction
      # over the batch axis, as in optax, which XLA compiles to a
      # matrix-vector product (on CPU up to 14x faster than scaling every entry and
      # summing over axis 0). HIGHEST: float32 products even where a GPU would
      # take TF32 (a 10-bit mantissa) for float32 matrices.
      return [
          jnp.tensordot(f[0].astype(acc), x.astype(acc), axes=1, precision=lax.Precision.HIGHEST)
          for x, f, acc in zip(xs, factors, accs)
      ]

    def exact(xs: tuple[jax.Array, ...]) -> list[jax.Array]:
      # Some factor is below the normal range (an example's norm above the clip
      # norm by a factor of about 2^100 or more): every entry scaled by f2, then
      # by f1, then summed.
      def clipped_sum(x: jax.Array, f: tuple[jax.Array, ...], acc: Any) -> jax.Array:
        shape = (batch,) + (1,) * (x.ndim - 1)
        scaled = _base.scale_leaf(x.astype(acc), f[0].reshape(shape), f[1].reshape(shape))
        return jnp.sum(scaled, axis=0)

      return [clipped_sum(x, f, acc) for x, f, acc in zip(xs, factors, accs)]

    sums = [reduce(s) for s in lax.cond(jnp.all(f2 == 1), contracted, exact, tuple(leaves))]
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state.noise_key))
    sigma = _noise_std(noise_multiplier, clip)
    if with_noise:  # drawing the noise is a full write of the update: only when asked
      sums = _noised(sums, noise_key, sigma, [None] * len(sums))
    total = reduce(jnp.asarray(batch, jnp.int32))
    if reduction == "mean":
      sums = [s / total.astype(s.dtype) for s in sums]
    out = jax.tree.unflatten(treedef, [s.astype(x.dtype) for s, x in zip(sums, leaves)])

    norms = per_example.value(jnp.float32)
    finite = reduce(jnp.all(per_example.finite()).astype(jnp.int32), lax.pmin) > 0
    finite = finite & ~jnp.isnan(sigma) & ~jnp.isnan(clip)
    out, skipped = _base.apply_policy(policy, out, finite, who)
    new_state = PerExampleClipState(
        examples_clipped=reduce(jnp.sum(example_clipped).astype(jnp.int32)),
        batch_examples=total,
        mean_example_norm=reduce(jnp.sum(norms)) / total.astype(jnp.float32),
        max_example_norm=reduce(jnp.max(norms), lax.pmax),
        skipped=skipped,
        num_steps=state.num_steps + 1,
        num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
        noise_key=jax.random.key_data(key),
    )
    return out, _base.in_place(state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_batch(leaves: list[jax.Array], updates: PyTree, params: PyTree | None) -> None:
  """One clear error for updates that are not per-example gradients of one batch."""
  who = "per_example_clip"
  if params is not None:
    # (params of another structure are the caller's business, e.g. a wrapper's)
    p_leaves, p_def = jax.tree.flatten(params)
    same_structure: bool = p_def == jax.tree.structure(updates)  # type: ignore[operator]
    if same_structure and all(
        hasattr(p, "shape") and tuple(p.shape) == tuple(x.shape) for p, x in zip(p_leaves, leaves)
    ):
      raise ValueError(
          f"{who}: the updates have the parameters' shapes (no leading batch axis): "
          "pass per-example gradients, e.g. jax.vmap(jax.grad(loss), in_axes=(None, 0))."
      )
  if any(x.ndim == 0 for x in leaves) or len({x.shape[0] for x in leaves}) > 1:
    raise ValueError(
        f"{who}: every leaf needs the same leading batch axis (per-example gradients); "
        f"got shapes {[x.shape for x in leaves]}."
    )
  if leaves[0].shape[0] == 0:
    raise ValueError(f"{who}: the batch is empty (leading axis of size 0).")


def _noise_std(noise_multiplier: Scalar, clip: jax.Array) -> jax.Array:
  """sigma * C, and 0 without noise whatever C (no clipping, C = inf, included)."""
  sigma = _base.hyper(noise_multiplier, jnp.float32)
  return jnp.where(sigma == 0, 0.0, sigma * clip.astype(jnp.float32))


def _noised(
    xs: list[jax.Array], key: jax.Array, std: jax.Array, axes: list[AxisName]
) -> list[jax.Array]:
  """Each x plus independent N(0, std^2) noise, a key per leaf.

  A leaf split over mapped axes (inside shard_map) draws its shard's noise from
  its key folded with the device's index along them: the pieces are independent
  and the whole is one draw's worth. Under an Explicit mesh the noise takes the
  leaf's sharding (each device draws only its part).
  """
  out = []
  for x, k, a in zip(xs, jax.random.split(key, len(xs)), axes):
    for name in _axes.names(a):
      k = jax.random.fold_in(k, lax.axis_index(name))
    sharding = jax.typeof(x).sharding if _axes.is_sharded(x) else None
    z = jax.random.normal(k, x.shape, x.dtype, out_sharding=sharding)
    out.append(x + std.astype(x.dtype) * z)
  return out


@register_stats_type
class DPNoiseState(NamedTuple):
  """State of :func:`clipjax.dp_noise`.

  Attributes:
    noise_stddev: float32 standard deviation of the noise added at the last
      step (per entry of the update).
    num_steps: steps taken so far.
    noise_key: the PRNG key the next step's noise is drawn from.
  """

  noise_stddev: jax.Array
  num_steps: jax.Array
  noise_key: jax.Array


def dp_noise(
    l2_norm_clip: Scalar,
    noise_multiplier: Scalar,
    *,
    batch_size: Scalar | None,
    seed: int | None = None,
    axis_name: AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds DP-SGD's Gaussian noise to an update of clipped per-example gradients.

  The noise of :func:`clipjax.per_example_clip` as a transform of its own, to
  put after gradient accumulation (virtual batches): clip each micro-batch
  with ``per_example_clip(C, reduction='mean')`` (no noise), let
  ``optax.MultiSteps`` average them, and add the noise once per real step
  inside it:

  .. math::
    \tilde g = g + \mathcal N\left(0, \left(\frac{\sigma C}{B}\right)^2 I\right)

  with :math:`C` = `l2_norm_clip`, :math:`\sigma` = `noise_multiplier` and
  :math:`B` = `batch_size` (the whole batch over its micro-batches); without
  `batch_size` the update is a sum of clipped gradients and the standard
  deviation is :math:`\sigma C`. Drawn for every micro-batch instead, the
  noise of the average would be :math:`\sqrt{K}` times this for K
  micro-batches, and the accounting that assumes :math:`\sigma` wrong. The key
  lives in the state: a restored run draws the noise it would have drawn.

  Args:
    l2_norm_clip: C, the clip norm the per-example gradients were clipped to,
      >= 0. May be scheduled.
    noise_multiplier: sigma >= 0. May be scheduled.
    batch_size: required: the number of examples the update averages (the
      whole batch, all micro-batches and devices), > 0, or None for an update
      that is their sum. May be scheduled (e.g. Poisson sampling's expected
      batch size).
    seed: the seed of the key in the state (static int); None means 0. Use
      another seed than the clipper's, or the two noises are one.
    axis_name: inside ``shard_map``, the mapped axes each leaf is split over
      (``'auto'``, names or the updates' PartitionSpecs, as in
      :func:`clipjax.clip_by_global_norm`): each shard then draws noise of its
      own. None: every leaf is whole (replicated) on each device, which draws
      the same noise.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`DPNoiseState`.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> K, micro = 4, 16   # a batch of 64 examples as 4 micro-batches of 16
    >>> dp_sgd = optax.chain(
    ...     clipjax.per_example_clip(1.0, reduction='mean'),
    ...     optax.MultiSteps(optax.chain(
    ...         clipjax.dp_noise(1.0, 1.1, batch_size=K * micro, seed=1), optax.sgd(0.1)),
    ...         every_k_schedule=K).gradient_transformation())
    >>> tx = clipjax.dp_noise(1.0, 2.0, batch_size=None)
    >>> out, state = tx.update({'w': jnp.zeros(3)}, tx.init(None))
    >>> float(state.noise_stddev), out['w'].shape
    (2.0, (3,))

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.
  """
  _validate.scalar(l2_norm_clip, "l2_norm_clip", low=0.0)
  _validate.scalar(noise_multiplier, "noise_multiplier", low=0.0)
  if batch_size is not None:
    _validate.scalar(batch_size, "batch_size", low=0.0, low_inclusive=False)
  seed = _validate.integer(0 if seed is None else seed, "seed", low=0)
  _validate.axis_name(axis_name)
  who = "dp_noise"

  def init_fn(params: PyTree) -> DPNoiseState:
    del params
    return DPNoiseState(
        noise_stddev=jnp.zeros([], jnp.float32),
        num_steps=jnp.zeros([], jnp.int32),
        noise_key=jax.random.key_data(jax.random.key(seed)),
    )

  def update_fn(
      updates: PyTree, state: DPNoiseState, params: PyTree | None = None, **extra: Any
  ) -> tuple[PyTree, DPNoiseState]:
    del params, extra
    _base.check_state(state, DPNoiseState, who)
    _validate.check_gradient_leaves(updates, who)
    leaves, treedef = jax.tree.flatten(updates)
    std = _noise_std(noise_multiplier, _base.hyper(l2_norm_clip, jnp.float32))
    if batch_size is not None:  # (a traced batch size is clamped to at least one example)
      std = std / _base.hyper(batch_size, jnp.float32, low=1.0)
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state.noise_key))
    axes = _axes.leaf_axes(axis_name, updates, who)
    out = jax.tree.unflatten(treedef, _noised(leaves, noise_key, std, axes))
    new_state = DPNoiseState(
        noise_stddev=std, num_steps=state.num_steps + 1, noise_key=jax.random.key_data(key)
    )
    return out, _base.in_place(state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
