"""Skipping steps: the spike detector and the chain that honours a skipped step."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from clipjax import _base, _forms, _history, _numerics, _stats, _validate
from clipjax._types import (
    ArrayLike,
    AxisSpec,
    Implementation,
    PyTree,
    Scalar,
)

# ------------------------------------------------------------ chain
# A drop-in for ``optax.chain`` that honours skipped steps.


def skip_flag(state: Any) -> jax.Array | None:
  """OR of every ``skipped`` field in `state`, or None if it has none (static)."""
  found = [v for _, v in optax.tree.get_all_with_path(state, "skipped")]
  if not found:
    return None
  return jnp.any(jnp.stack([jnp.asarray(v, jnp.bool_).reshape(()) for v in found]))


def chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Like ``optax.chain``, but a step one link marks ``skipped`` stops the chain there.

  When a link's state has a true ``skipped`` field (a clipper built with
  ``nonfinite='skip'``, or :func:`clipjax.skip_spikes`), the links after it are
  not run for that step (``lax.cond``): their states are returned unchanged and
  the update is zero, so e.g. Adam's moments and step count do not move. With
  no skipping link it behaves exactly like ``optax.chain``; its state is the
  same tuple of link states.

  Args:
    *transforms: the links, applied in order.

  Returns:
    A ``GradientTransformationExtraArgs``; extra keyword arguments to
    ``update`` (e.g. ``loss=``) go to every link that accepts them.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> opt = clipjax.chain(clipjax.clip_by_global_norm(1.0, nonfinite='skip'),
    ...                     optax.adam(0.1))
    >>> params = {'w': jnp.ones(2)}
    >>> state = opt.init(params)
    >>> bad = {'w': jnp.array([jnp.nan, 1.0])}
    >>> updates, new_state = opt.update(bad, state, params)
    >>> updates['w'], int(new_state[1][0].count)
    (Array([0., 0.], dtype=float32), 0)
  """
  for i, t in enumerate(transforms):
    _validate.transformation(t, f"chain: transform {i}")
  links = tuple(optax.with_extra_args_support(t) for t in transforms)

  def init_fn(params: PyTree) -> tuple[Any, ...]:
    return tuple(t.init(params) for t in links)

  def run(
      i: int, updates: PyTree, states: Sequence[Any], params: PyTree, extra: dict[str, Any]
  ) -> tuple[PyTree, tuple[Any, ...]]:
    if i == len(links):
      return updates, ()
    # A link with links after it in this chain has its skips honoured; the last
    # one is as honoured as this chain is where it stands (e.g. inside optax.chain).
    honoured = _base.skip_honoured() if i + 1 < len(links) else contextlib.nullcontext()
    with honoured:
      updates, new_state = links[i].update(updates, states[i], params, **extra)
    skip = skip_flag(new_state) if i + 1 < len(links) else None
    if skip is None:
      updates, rest = run(i + 1, updates, states, params, extra)
      return updates, (new_state, *rest)

    def skipped(operands: tuple[PyTree, PyTree]) -> tuple[PyTree, tuple[Any, ...]]:
      u, _ = operands
      return jax.tree.map(jnp.zeros_like, u), tuple(states[i + 1 :])

    def not_skipped(operands: tuple[PyTree, PyTree]) -> tuple[PyTree, tuple[Any, ...]]:
      u, p = operands
      return run(i + 1, u, states, p, extra)

    updates, rest = lax.cond(skip, skipped, not_skipped, (updates, params))
    return updates, (new_state, *rest)

  def update_fn(
      updates: PyTree, state: tuple[Any, ...], params: PyTree | None = None, **extra_args: Any
  ) -> tuple[PyTree, tuple[Any, ...]]:
    return run(0, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------ skip
# Skipping optimizer steps whose gradient norm or loss spikes (OLMo-core / MaxText style).


class SkipSpikesState(NamedTuple):
  """State of :func:`clipjax.skip_spikes`.

  Attributes:
    inner_state: the wrapped optimizer's state (unchanged on skipped steps).
    grad_norm: float32 global gradient norm at the last step.
    loss: float32 loss at the last step (0 when losses are not used).
    norm_threshold, loss_threshold: the thresholds used at the last step: for
      the norm the least of ``mean + sigma * std`` of its window, `max_norm`
      and `max_ratio` times the window's largest norm, those in force; for
      the loss ``mean + sigma * std`` (inf during warm-up, or with none).
    skipped: bool, whether the last step was skipped.
    num_steps, num_skipped, num_nonfinite: int32 counts (non-finite steps are
      skipped too and counted in both).
    norm_window, loss_window: (window,) float32 ring buffers.
    window_count, window_index: int32 ring-buffer bookkeeping.
  """

  inner_state: Any
  grad_norm: jax.Array
  loss: jax.Array
  norm_threshold: jax.Array
  loss_threshold: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_skipped: jax.Array
  num_nonfinite: jax.Array
  norm_window: jax.Array
  loss_window: jax.Array
  window_count: jax.Array
  window_index: jax.Array


_stats.register_stats_type(SkipSpikesState)


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int | None = None,
    sigma: Scalar | None = 6.0,
    min_relative_std: Scalar = 0.05,
    warmup: int | None = None,
    use_loss: bool = True,
    max_norm: Scalar | None = None,
    max_ratio: Scalar | None = None,
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps `inner` so that steps with a spiking gradient norm or loss are skipped.

  A step is skipped when its global gradient norm, or its loss (passed as
  ``update(..., loss=loss)``), is more than `sigma` standard deviations above
  the mean of a rolling window of the last `window` steps' values, or when
  either is non-finite. Spike detection starts once `warmup` values are in the
  window. A skipped step returns zero updates and leaves `inner`'s state
  untouched, and `inner.update` is not computed for it (``lax.cond``; under
  ``vmap`` both branches run and one is selected).

  The standard deviation is floored at ``min_relative_std * |mean|``, so the
  threshold is never below ``mean + sigma * min_relative_std * |mean|`` (1.3x the
  mean with the defaults): with a steady, nearly noiseless norm (full-batch
  training) the window's spread is tiny, and without the floor every ordinary
  wiggle would cross ``mean + sigma * std`` and be skipped.

  Two more tests of the gradient norm, each off unless given: a fixed
  threshold, `max_norm` (axlearn's ``drop_norm``: from the first step, no
  warm-up), and a ratio to the largest norm in the window, `max_ratio`
  (Megatron-style "x10 the recent max", once `warmup` values are in). The
  step is skipped when the norm is above the least of the thresholds in force,
  which ``norm_threshold`` reports.

  Every finite value enters its window, a spike capped at the threshold it
  crossed: the baseline can drift upward over training (no lock-in after a
  genuine shift), while a spike barely widens the window's spread, so the
  next spike is still caught. Non-finite values never enter.

  Args:
    inner: the optimizer (or chain) to protect.
    window: rolling-window length (static int); None means 128.
    sigma: number of standard deviations above the mean that counts as a
      spike, > 0, or None for no such test (then the loss is only checked for
      being finite). May be scheduled (a traced value is clamped at 0; NaN
      skips).
    min_relative_std: floor on the standard deviation, relative to the
      window's mean, >= 0 (0 disables the floor).
    warmup: number of values needed before detection starts (static int,
      2..window); None means min(20, window).
    use_loss: also watch the loss; then ``update`` requires ``loss=``.
    max_norm: skip every step whose global gradient norm exceeds it, > 0
      (None: no fixed threshold). May be scheduled.
    max_ratio: skip a step whose norm exceeds `max_ratio` times the largest
      norm in the window, > 1 (None: no such test). May be scheduled.
    axis_name: mapped axes the gradients are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`SkipSpikesState`; its
    ``skipped`` flag also makes :func:`clipjax.chain` skip the links after it.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> opt = clipjax.skip_spikes(optax.sgd(0.1), window=8, warmup=4, sigma=3.0)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> for loss in [1.0, 1.1, 0.9, 1.0, 1.05, 40.0]:
    ...   u, state = opt.update({'w': jnp.ones(2)}, state, params, loss=jnp.float32(loss))
    >>> bool(state.skipped), int(state.num_skipped), u['w']
    (True, 1, Array([0., 0.], dtype=float32))

  References:
    OLMo-core ``SkipStepOptimizer``; MaxText and levanter skip-step
    options; Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022
    (restarting around loss spikes).
  """
  size = _validate.integer(128 if window is None else window, "window", low=2)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "skip_spikes")
  warm = _validate.integer(min(20, size) if warmup is None else warmup, "warmup", low=2, high=size)
  if sigma is not None:
    _validate.scalar(sigma, "sigma", low=0.0, low_inclusive=False)
  if max_norm is not None:
    _validate.scalar(max_norm, "max_norm", low=0.0, low_inclusive=False)
  if max_ratio is not None:
    _validate.scalar(max_ratio, "max_ratio", low=1.0, low_inclusive=False)
  _validate.scalar(min_relative_std, "min_relative_std", low=0.0)
  if not isinstance(use_loss, bool):
    raise TypeError(f"use_loss must be a bool, got {use_loss!r}.")
  _validate.transformation(inner, "skip_spikes: inner")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: PyTree) -> SkipSpikesState:
    # Distinct arrays per field: a shared buffer cannot be donated twice.
    ring = _history.ring_init(size)
    zero = lambda: jnp.zeros([], jnp.float32)
    inf = lambda: jnp.full([], jnp.inf, jnp.float32)
    count = lambda: jnp.zeros([], jnp.int32)
    return SkipSpikesState(
        inner_state=inner.init(params),
        grad_norm=zero(),
        loss=zero(),
        norm_threshold=inf(),
        loss_threshold=inf(),
        skipped=jnp.zeros([], jnp.bool_),
        num_steps=count(),
        num_skipped=count(),
        num_nonfinite=count(),
        norm_window=ring.values,
        loss_window=jnp.zeros((size,), jnp.float32),
        window_count=ring.filled,
        window_index=ring.cursor,
    )

  def update_fn(
      updates: PyTree,
      state: SkipSpikesState,
      params: PyTree | None = None,
      *,
      loss: ArrayLike | None = None,
      **extra_args: Any,
  ) -> tuple[PyTree, SkipSpikesState]:
    if use_loss and loss is None:
      raise ValueError(
          "skip_spikes(use_loss=True) needs update(..., loss=loss); "
          "pass the step's loss or build it with use_loss=False."
      )
    _base.check_state(state, SkipSpikesState, "skip_spikes", ("norm_window", "window", size))
    if use_loss and not _validate.is_real(loss):
      raise TypeError(
          f"skip_spikes: loss must be a real number or array (the step's loss), got {loss!r}."
      )
    if use_loss and loss is not None and jnp.size(loss) != 1:
      raise ValueError(
          f"skip_spikes: loss must be a scalar (the step's mean or summed loss), "
          f"got shape {jnp.shape(loss)}."
      )
    forms = _forms.for_trace(impl)
    _, _, split = _numerics.tree_global_norm(updates, "skip_spikes", axis_name, forms=forms)
    norm = split.value(jnp.float32)  # inf beyond float32's range: always a spike
    loss_value = jnp.asarray(loss if use_loss else 0.0, jnp.float32).reshape(())
    sig = jnp.inf if sigma is None else _base.hyper(sigma, jnp.float32)
    floor = _base.hyper(min_relative_std, jnp.float32)
    fixed = jnp.inf if max_norm is None else _base.hyper(max_norm, jnp.float32)
    ratio = jnp.inf if max_ratio is None else _base.hyper(max_ratio, jnp.float32)
    hypers_ok = ~jnp.isnan(sig + floor) & ~jnp.isnan(fixed) & ~jnp.isnan(ratio)
    finite = split.finite() & jnp.isfinite(loss_value) & hypers_ok
    ready = state.window_count >= warm
    norm_ring = _history.Ring(state.norm_window, state.window_count, state.window_index)

    def threshold(values: jax.Array) -> jax.Array:
      if sigma is None:
        return jnp.asarray(jnp.inf, jnp.float32)
      mean, std = _history.ring_mean_std(
          _history.Ring(values, state.window_count, state.window_index)
      )
      std = jnp.maximum(std, floor * jnp.abs(mean))
      return jnp.where(ready, mean + sig * std, jnp.inf)

    norm_thr, loss_thr = threshold(state.norm_window), threshold(state.loss_window)
    if max_ratio is not None:
      recent = jnp.where(ready, ratio * _history.ring_max(norm_ring), jnp.inf)
      norm_thr = jnp.minimum(norm_thr, recent)
    if max_norm is not None:
      norm_thr = jnp.minimum(norm_thr, fixed)
    spike = norm > norm_thr
    if use_loss:
      spike = spike | (loss_value > loss_thr)
    skip = ~finite | spike

    rings = [
        _history.ring_push(
            _history.Ring(values, state.window_count, state.window_index),
            jnp.minimum(value, thr),
            finite & jnp.isfinite(norm),
        )
        for values, value, thr in (
            (state.norm_window, norm, norm_thr),
            (state.loss_window, loss_value, loss_thr),
        )
    ]

    def skipped(operands: tuple[PyTree, Any]) -> tuple[PyTree, Any]:
      u, inner_state = operands
      return jax.tree.map(jnp.zeros_like, u), inner_state

    def applied(operands: tuple[PyTree, Any]) -> tuple[PyTree, Any]:
      u, inner_state = operands
      if use_loss:
        return inner.update(u, inner_state, params, loss=loss, **extra_args)
      return inner.update(u, inner_state, params, **extra_args)

    new_updates, inner_state = lax.cond(skip, skipped, applied, (updates, state.inner_state))
    return new_updates, _base.in_place(
        state,
        SkipSpikesState(
            inner_state=inner_state,
            grad_norm=norm,
            loss=loss_value,
            norm_threshold=norm_thr,
            loss_threshold=loss_thr,
            skipped=skip,
            num_steps=state.num_steps + 1,
            num_skipped=state.num_skipped + skip.astype(jnp.int32),
            num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
            norm_window=rings[0].values,
            loss_window=rings[1].values,
            window_count=rings[0].filled,
            window_index=rings[0].cursor,
        ),
        skip=("inner_state",),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
