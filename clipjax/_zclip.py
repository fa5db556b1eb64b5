"""ZClip: z-score based adaptive clipping of the global norm, with EMA statistics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _clipper, _norms, _state, _stats, _validate


class ZClipState(NamedTuple):
  """State of :func:`clipjax.zclip`.

  Its fields ``pre_clip_norm``, ``clip_scale``, ``clipped``, ``skipped``,
  ``num_steps``, ``num_clipped`` and ``num_nonfinite`` are as in
  :class:`clipjax.ClipState`.

  Attributes:
    clip_threshold: the norm above which the last step counted as a spike
      (``mean + z_thresh * std``, capped by ``max_norm``; ``max_norm`` or inf
      during warm-up).
    z_score: (norm - mean) / (std + eps) at the last step (0 during warm-up).
    norm_mean, norm_var: EMA mean and variance of the (clipped) global norm.
    warmup_norms: (warmup_steps,) float32 buffer of the first finite norms.
    warmup_count: int32 number of them collected so far.
  """

  clip_threshold: jax.Array
  z_score: jax.Array
  norm_mean: jax.Array
  norm_var: jax.Array
  pre_clip_norm: jax.Array
  clip_scale: jax.Array
  clipped: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  warmup_norms: jax.Array
  warmup_count: jax.Array


_stats.register_stats_type(ZClipState)

_MODES = ("zscore", "percentile")


def zclip(
    *,
    alpha: Any = 0.97,
    z_thresh: Any = 2.5,
    eps: Any = 1e-6,
    warmup_steps: int | None = None,
    mode: str = "zscore",
    max_norm: Any = None,
    nonfinite: str = "propagate",
    axis_name: _norms.AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZClip: clips gradient-norm spikes detected by a z-score against EMA statistics.

  Warm-up: the first `warmup_steps` finite norms are collected (and clipped
  only by `max_norm`, if given); then the mean :math:`\mu` and variance
  :math:`\sigma^2` are initialised from them. After that, with
  :math:`z = (\|g\| - \mu) / (\sigma + \epsilon)`, a step with
  :math:`z > z_{thr}` is a spike and its norm is clipped to

  - ``mode='zscore'`` (reciprocal scaling): :math:`\mu + z_{thr}^2\,\sigma / z`
    (the larger the spike, the harder the clip);
  - ``mode='percentile'``: :math:`\mu + z_{thr}\,\sigma`;

  and in both cases to at most `max_norm` if given. The statistics are then
  updated with the clipped norm :math:`\hat g`:
  :math:`\mu \leftarrow \alpha\mu + (1-\alpha)\hat g`,
  :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(\hat g - \mu)^2`
  (with the updated :math:`\mu`, as the reference implementation).
  Non-finite norms leave the statistics untouched.

  Args:
    alpha: EMA decay in (0, 1).
    z_thresh: z-score threshold > 0.
    eps: > 0, added to the standard deviation.
    warmup_steps: number of norms used to initialise the statistics (static
      int); None means 25.
    mode: ``'zscore'`` or ``'percentile'``.
    max_norm: optional hard cap on the global norm (also during warm-up).
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    axis_name: mapped axes the gradients are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ZClipState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.zclip(warmup_steps=4, z_thresh=2.0)
    >>> state = tx.init({'w': jnp.zeros(1)})
    >>> for g in [1.0, 1.2, 0.8, 1.0, 50.0]:
    ...   u, state = tx.update({'w': jnp.array([g])}, state)
    >>> bool(state.clipped), round(float(u['w'][0]), 3)  # mu 1, sigma 0.141, z ~ 346
    (True, 1.002)

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025.
  """
  _validate.scalar(alpha, "alpha", low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
  _validate.scalar(z_thresh, "z_thresh", low=0.0, low_inclusive=False)
  _validate.scalar(eps, "eps", low=0.0, low_inclusive=False)
  warmup = _validate.integer(25 if warmup_steps is None else warmup_steps, "warmup_steps")
  if mode not in _MODES:
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
  if max_norm is not None:
    _validate.scalar(max_norm, "max_norm", low=0.0)
  policy = _validate.nonfinite_policy(nonfinite)
  _validate.axis_name(axis_name)

  def init_fn(params):
    del params
    # Distinct arrays per field: a shared buffer cannot be donated twice.
    zero = lambda: jnp.zeros([], jnp.float32)
    return ZClipState(clip_threshold=jnp.full([], jnp.inf, jnp.float32), z_score=zero(),
                      norm_mean=zero(), norm_var=zero(), **_state.init_clip_state()._asdict(),
                      warmup_norms=jnp.zeros((warmup,), jnp.float32),
                      warmup_count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _clipper.check_state(state, ZClipState, "zclip", ("warmup_norms", "warmup_steps", warmup))
    leaves, treedef, split = _clipper.flat_global_norm(updates, "zclip", axis_name)
    # The statistics take the norm as a float32 number (inf beyond its range: a
    # spike, never recorded); the clipping itself uses the exact split form.
    norm = split.value(jnp.float32)
    finite = jnp.isfinite(norm)
    # Traced hyperparameters are clamped into range; a NaN one makes the step non-finite.
    alpha_ = _clipper.hyper(alpha, jnp.float32, 0.0, 1.0)
    z_thr = _clipper.hyper(z_thresh, jnp.float32)
    eps_ = _clipper.hyper(eps, jnp.float32)
    cap = jnp.inf if max_norm is None else _clipper.hyper(max_norm, jnp.float32)
    warming = state.warmup_count < warmup

    std = jnp.sqrt(state.norm_var)
    z = jnp.where(warming, 0.0, (norm - state.norm_mean) / (std + eps_))
    spike = ~warming & (z > z_thr)
    if mode == "zscore":
      target = state.norm_mean + z_thr**2 * std / jnp.where(spike, z, 1.0)
    else:
      target = state.norm_mean + z_thr * std
    target = jnp.minimum(jnp.where(spike, target, jnp.inf), cap)
    target = _clipper.poison(target, alpha_, z_thr, eps_, cap)
    new, clip = _clipper.clip_to_threshold(state, leaves, treedef, split, target, policy, "zclip")
    boundary = jnp.where(warming, cap, jnp.minimum(state.norm_mean + z_thr * std, cap))

    # Statistics: warm-up buffer, its mean/variance once full, then EMA with the clipped norm.
    buf = state.warmup_norms.at[jnp.minimum(state.warmup_count, warmup - 1)].set(norm)
    buf = jnp.where(warming & finite, buf, state.warmup_norms)
    count = state.warmup_count + (warming & finite).astype(jnp.int32)
    just_full = warming & (count == warmup)
    clipped_norm = jnp.minimum(norm, target)
    ema_mean = alpha_ * state.norm_mean + (1 - alpha_) * clipped_norm
    ema_var = alpha_ * state.norm_var + (1 - alpha_) * (clipped_norm - ema_mean) ** 2
    update_ema = ~warming & finite & ~jnp.isnan(target)
    mean = jnp.where(just_full, jnp.mean(buf), jnp.where(update_ema, ema_mean, state.norm_mean))
    var = jnp.where(just_full, jnp.var(buf), jnp.where(update_ema, ema_var, state.norm_var))

    return new, ZClipState(clip_threshold=boundary, z_score=jnp.where(finite, z, 0.0),
                           norm_mean=mean, norm_var=var, **clip._asdict(), warmup_norms=buf,
                           warmup_count=count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
