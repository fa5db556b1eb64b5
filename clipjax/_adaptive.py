"""The history-adaptive clippers: AutoClip (percentile) and ZClip (z-score)."""

from __future__ import annotations

from typing import Any, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from clipjax import _axes, _base, _forms, _history, _numerics, _stats, _validate
from clipjax._types import AxisSpec, Implementation, NonFinite, PyTree, Scalar, ZClipMode

# ------------------------------------------------------------ autoclip
# AutoClip: clip to a percentile of the history of gradient norms.


class AutoClipState(NamedTuple):
  """State of :func:`clipjax.autoclip`.

  Its fields ``pre_clip_norm``, ``clip_scale``, ``clipped``, ``skipped``,
  ``num_steps``, ``num_clipped`` and ``num_nonfinite`` are as in
  :class:`clipjax.ClipState`.

  Attributes:
    clip_threshold: the percentile of the norm history used at the last step.
    norm_history: (history,) float32 ring buffer of finite global norms.
    history_count: int32 number of valid entries in ``norm_history``.
    history_index: int32 slot the next norm is written to.
  """

  clip_threshold: jax.Array
  pre_clip_norm: jax.Array
  clip_scale: jax.Array
  clipped: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  norm_history: jax.Array
  history_count: jax.Array
  history_index: jax.Array


_stats.register_stats_type(AutoClipState)


def autoclip(
    percentile: Scalar = 10.0,
    *,
    history: int | None = None,
    nonfinite: NonFinite = "propagate",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AutoClip: clips the global norm to the `percentile`-th percentile of past norms.

  At each step the current global L2 norm is appended to a ring buffer of the
  last `history` finite norms (so the current norm *is* part of the
  percentile, as in the paper's reference code), then

  .. math::
    \tau_t = \text{percentile}_p(\{\|g_s\|\}_{s \in \text{window}}), \quad
    g \leftarrow g \cdot \min(1, \tau_t / \|g_t\|)

  While the buffer is not yet full, the percentile is over the entries seen so
  far (the first step is therefore never clipped). Percentiles use NumPy's
  default linear interpolation. Non-finite norms are not recorded. The paper
  keeps the whole history; a bounded buffer keeps the state fixed-size (its
  cost is one sort of `history` floats per step).

  Args:
    percentile: p in [0, 100]; the paper recommends 10. May be scheduled (a
      traced value is clamped to [0, 100]; NaN makes the step non-finite).
    history: ring-buffer length (static int); None means 1000.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    axis_name: mapped axes the gradients are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` with an :class:`AutoClipState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.autoclip(50.0, history=4)
    >>> state = tx.init({'w': jnp.zeros(1)})
    >>> for g in [1.0, 3.0, 2.0, 100.0]:
    ...   u, state = tx.update({'w': jnp.array([g])}, state)
    >>> round(float(state.clip_threshold), 5), round(float(u['w'][0]), 5)  # median of [1,3,2,100]
    (2.5, 2.5)

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
  """
  _validate.scalar(percentile, "percentile", low=0.0, high=100.0)
  size = _validate.integer(1000 if history is None else history, "history")
  policy = _validate.nonfinite_policy(nonfinite)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "autoclip")

  def init_fn(params: PyTree) -> AutoClipState:
    del params
    ring = _history.ring_init(size)
    base = _base.init_clip_state()
    return AutoClipState(
        clip_threshold=jnp.full([], jnp.inf, jnp.float32),
        **base._asdict(),
        norm_history=ring.values,
        history_count=ring.filled,
        history_index=ring.cursor,
    )

  def update_fn(
      updates: PyTree, state: AutoClipState, params: PyTree | None = None, **extra_args: Any
  ) -> tuple[PyTree, AutoClipState]:
    del params, extra_args
    _base.check_state(state, AutoClipState, "autoclip", ("norm_history", "history", size))
    forms = _forms.for_trace(impl)
    leaves, treedef, norm = _numerics.tree_global_norm(updates, "autoclip", axis_name, forms=forms)
    value = norm.value(jnp.float32)
    ring = _history.ring_push(
        _history.Ring(state.norm_history, state.history_count, state.history_index),
        value,
        jnp.isfinite(value),
    )
    q = _base.hyper(percentile, jnp.float32, 0.0, 100.0)
    threshold = _base.poison(_history.ring_percentile(ring, q), q)
    threshold = jnp.where(ring.filled > 0, threshold, jnp.inf)
    new, clip = _base.clip_to_threshold(
        state, leaves, treedef, norm, threshold, policy, "autoclip", forms
    )
    return new, _base.in_place(
        state,
        AutoClipState(
            clip_threshold=threshold,
            **clip._asdict(),
            norm_history=ring.values,
            history_count=ring.filled,
            history_index=ring.cursor,
        ),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------ zclip
# ZClip: z-score based adaptive clipping of the global norm, with EMA statistics.


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

_MODES = get_args(ZClipMode)


def zclip(
    *,
    alpha: Scalar = 0.97,
    z_thresh: Scalar = 2.5,
    eps: Scalar = 1e-6,
    warmup_steps: int | None = None,
    mode: ZClipMode = "zscore",
    max_norm: Scalar | None = None,
    nonfinite: NonFinite = "propagate",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
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
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

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
  impl = _validate.implementation(implementation, "zclip")

  def init_fn(params: PyTree) -> ZClipState:
    del params
    # Distinct arrays per field: a shared buffer cannot be donated twice.
    zero = lambda: jnp.zeros([], jnp.float32)
    return ZClipState(
        clip_threshold=jnp.full([], jnp.inf, jnp.float32),
        z_score=zero(),
        norm_mean=zero(),
        norm_var=zero(),
        **_base.init_clip_state()._asdict(),
        warmup_norms=jnp.zeros((warmup,), jnp.float32),
        warmup_count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
      updates: PyTree, state: ZClipState, params: PyTree | None = None, **extra_args: Any
  ) -> tuple[PyTree, ZClipState]:
    del params, extra_args
    _base.check_state(state, ZClipState, "zclip", ("warmup_norms", "warmup_steps", warmup))
    forms = _forms.for_trace(impl)
    leaves, treedef, split = _numerics.tree_global_norm(updates, "zclip", axis_name, forms=forms)
    # The statistics take the norm as a float32 number (inf beyond its range: a
    # spike, never recorded); the clipping itself uses the exact split form.
    norm = split.value(jnp.float32)
    finite = jnp.isfinite(norm)
    # Traced hyperparameters are clamped into range; a NaN one makes the step non-finite.
    alpha_ = _base.hyper(alpha, jnp.float32, 0.0, 1.0)
    z_thr = _base.hyper(z_thresh, jnp.float32)
    eps_ = _base.hyper(eps, jnp.float32)
    cap = jnp.inf if max_norm is None else _base.hyper(max_norm, jnp.float32)
    warming = state.warmup_count < warmup

    std = jnp.sqrt(state.norm_var)
    z = jnp.where(warming, 0.0, (norm - state.norm_mean) / (std + eps_))
    spike = ~warming & (z > z_thr)
    if mode == "zscore":
      target = state.norm_mean + z_thr**2 * std / jnp.where(spike, z, 1.0)
    else:
      target = state.norm_mean + z_thr * std
    target = jnp.minimum(jnp.where(spike, target, jnp.inf), cap)
    target = _base.poison(target, alpha_, z_thr, eps_, cap)
    new, clip = _base.clip_to_threshold(
        state, leaves, treedef, split, target, policy, "zclip", forms
    )
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

    return new, _base.in_place(
        state,
        ZClipState(
            clip_threshold=boundary,
            z_score=jnp.where(finite, z, 0.0),
            norm_mean=mean,
            norm_var=var,
            **clip._asdict(),
            warmup_norms=buf,
            warmup_count=count,
        ),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------ AdaGC


class AdaGCState(NamedTuple):
  """State of :func:`clipjax.adagc`.

  Attributes:
    pre_clip_norm: float32 global L2 norm of the last updates, before clipping.
    clip_scale: the smallest per-leaf factor applied at the last step.
    clipped: whether any leaf was clipped at the last step.
    skipped: whether the last step was skipped (``nonfinite='skip'``).
    num_steps, num_clipped, num_nonfinite: running counts, as in
      :class:`clipjax.ClipState`.
    gamma: each leaf's threshold statistic, an EMA of its clipped norm, as a
      :class:`clipjax.PerLeaf` (one float32 vector with the leaves' paths;
      ``state.gamma.as_dict()`` gives ``{path: gamma}``), reported by
      :func:`clipjax.clip_stats` as ``gamma/<leaf path>``. A leaf whose norm is
      below about 1e-15 (its float32 sum of squares underflows) adds its plain
      float32 norm, possibly 0,
      when ``lambda_rel * eps`` is above 2^-32: gamma only enters as
      ``max(gamma, eps)``, and the exact norm would cost a second read of the
      gradients on every step (a frozen parameter's zero gradient).
  """

  pre_clip_norm: jax.Array
  clip_scale: jax.Array
  clipped: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  gamma: _base.PerLeaf


_stats.register_stats_type(AdaGCState)


def adagc(
    lambda_abs: Scalar = 1.0,
    *,
    lambda_rel: Scalar = 1.05,
    beta: Scalar = 0.98,
    warmup_steps: int | None = None,
    eps: Scalar = 1e-8,
    nonfinite: NonFinite = "propagate",
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGC: each tensor clipped relative to an EMA of its own clipped gradient norm.

  With :math:`g_i` leaf i's gradient at step t (counted from 1) and
  :math:`\gamma_i` its statistic:

  - **warm-up** (t = 1, or t < `warmup_steps`): global clipping,
    :math:`\hat g = g \min(1, \lambda_{abs} / \|g\|)`, and
    :math:`\gamma_i = \|\hat g_i\|` at t = 1, then
    :math:`\gamma_i \leftarrow \min(\gamma_i, \|\hat g_i\|)`;
  - **after**: per tensor,
    :math:`\hat g_i = g_i \min\left(1, \frac{\lambda_{rel}\max(\gamma_i, \epsilon)}
    {\max(\|g_i\|, \epsilon)}\right)` and
    :math:`\gamma_i \leftarrow \beta\gamma_i + (1-\beta)\|\hat g_i\|`.

  This is the clipping of the AdaGC optimizer as pytorch-optimizer implements it
  (which folds it into Adam); here it is a transform to chain before any
  optimizer (``optax.chain(clipjax.adagc(), optax.adamw(...))``). Norms are
  overflow-safe; a step with non-finite gradients leaves the statistics as they
  were. One read of the gradients for the norms, one for the scaling.

  Args:
    lambda_abs: the global-norm threshold of the warm-up, >= 0.
    lambda_rel: the relative threshold after it, > 0 (a leaf may grow by this
      factor over its EMA before it is clipped).
    beta: the EMA's decay in [0, 1).
    warmup_steps: static int >= 0; None means 100 (the reference's default).
    eps: > 0, a floor on the statistics and the norms in the ratio.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    axis_name: inside ``shard_map``, the mapped axes each leaf is split over
      (``'auto'``: read from the leaves' types), so that every leaf's norm and
      the warm-up's global norm are those of the whole arrays; see
      :func:`clipjax.clip_by_global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A ``GradientTransformationExtraArgs`` with an :class:`AdaGCState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.adagc(lambda_abs=10.0, lambda_rel=1.05, warmup_steps=2)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> for g in ([3.0, 4.0], [3.0, 4.0], [30.0, 40.0]):  # a tenfold jump at step 3
    ...   u, state = tx.update({'w': jnp.array(g)}, state)
    >>> [round(float(x), 4) for x in u['w']], round(float(state.gamma.as_dict()['w']), 4)  # 1.05*5
    ([3.15, 4.2], 5.005)

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language Model
    Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025;
    pytorch-optimizer's ``AdaGC``.
  """
  _validate.scalar(lambda_abs, "lambda_abs", low=0.0)
  _validate.scalar(lambda_rel, "lambda_rel", low=0.0, low_inclusive=False)
  _validate.scalar(beta, "beta", low=0.0, high=1.0, high_inclusive=False)
  _validate.scalar(eps, "eps", low=0.0, low_inclusive=False)
  warmup = _validate.integer(100 if warmup_steps is None else warmup_steps, "warmup_steps", low=0)
  policy = _validate.nonfinite_policy(nonfinite)
  _validate.axis_name(axis_name)
  impl = _validate.implementation(implementation, "adagc")
  who = "adagc"

  def init_fn(params: PyTree) -> AdaGCState:
    return AdaGCState(*_base.init_clip_state(), gamma=_base.PerLeaf.zeros(params))

  def update_fn(
      updates: PyTree, state: AdaGCState, params: PyTree | None = None, **extra: Any
  ) -> tuple[PyTree, AdaGCState]:
    del params, extra
    _base.check_state(state, AdaGCState, who)
    _validate.check_gradient_leaves(updates, who)
    _base.check_per_leaf(state.gamma, updates, who)
    leaves, treedef = jax.tree.flatten(updates)
    ft = _numerics.accumulation_dtype(jnp.float32, leaves)
    # A leaf's limit is at least lambda_rel * eps after the warm-up, which clips
    # by the total alone: a zero or tiny leaf's exact norm does not matter.
    lam_rel, eps_v = _base.hyper(lambda_rel, ft), _base.hyper(eps, ft)
    floor = jnp.maximum(lam_rel, 0) * eps_v
    axes = _axes.leaf_axes(axis_name, updates, who)
    forms = _forms.for_trace(impl)
    norms = _numerics.flat_norms(
        leaves, 2.0, jnp.float32, axes, [None] * len(leaves), forms, floor=floor
    )
    total = _numerics.combine(norms, 2.0)
    step = state.num_steps + 1
    warm = (step == 1) | (step < warmup)

    # Warm-up: one global factor for every leaf; each clipped leaf norm is
    # n_i * lambda_abs / |g| (computed in split form: no overflow).
    lam_abs = _base.hyper(lambda_abs, ft)
    gw1, gw2, warm_clipped = _numerics.clip_factors(lam_abs, total, forms)
    n, t = _numerics.normalize(norms), _numerics.normalize(total)
    safe_t = jnp.where(t.r > 0, t.r, 1)
    plain = norms.value(ft)  # each leaf's norm, unclipped
    warm_hat = jnp.where(warm_clipped, _numerics.ldexp(n.r / safe_t * lam_abs, n.e - t.e), plain)

    # After: per leaf, against lambda_rel * max(gamma, eps); max(|g_i|, eps) only
    # matters for zero norms, which are never clipped.
    gamma = state.gamma.values.astype(ft)
    limit = lam_rel * jnp.maximum(gamma, eps_v)
    limit = _base.poison(limit, lambda_rel, eps)
    af1, af2, adapt_clipped = _numerics.clip_factors(limit, norms, forms)
    adapt_hat = jnp.where(adapt_clipped, limit, plain)

    # The warm-up's scalars broadcast against the per-leaf vectors.
    f1 = jnp.where(warm, gw1, af1)
    f2 = jnp.where(warm, gw2, af2)
    clipped = jnp.where(warm, warm_clipped, adapt_clipped)
    hat = jnp.where(warm, warm_hat, adapt_hat)
    b = _base.hyper(beta, ft, high=1.0)
    new_gamma = jnp.where(
        warm, jnp.where(step == 1, hat, jnp.minimum(gamma, hat)), b * gamma + (1 - b) * hat
    )

    new = _base.scale_each_leaf(leaves, f1, f2, None, forms)
    scale = jnp.min(f1 * f2, initial=1.0)
    out, clip_state = _base.apply_policy_and_count(
        state, jax.tree.unflatten(treedef, new), total, scale, jnp.any(clipped), policy, who
    )
    # A non-finite (or skipped) step leaves the statistics as they were.
    keep = ~jnp.isfinite(total.r) | clip_state.skipped | jnp.any(~jnp.isfinite(new_gamma))
    new_gamma = jnp.where(keep, gamma, new_gamma).astype(jnp.float32)
    new_state = AdaGCState(*clip_state, gamma=_base.PerLeaf(new_gamma, state.gamma.paths))
    return out, _base.in_place(state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
