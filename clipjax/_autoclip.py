"""AutoClip: clip to a percentile of the history of gradient norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _clipper, _history, _norms, _state, _stats, _validate


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
    percentile: Any = 10.0,
    *,
    history: int | None = None,
    nonfinite: str = "propagate",
    axis_name: _norms.AxisSpec = None,
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

  Returns:
    A ``GradientTransformationExtraArgs`` with an :class:`AutoClipState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.autoclip(50.0, history=4)
    >>> state = tx.init({'w': jnp.zeros(1)})
    >>> for g in [1.0, 3.0, 2.0, 100.0]:
    ...   u, state = tx.update({'w': jnp.array([g])}, state)
    >>> float(state.clip_threshold), u['w']  # median of [1, 3, 2, 100]
    (2.5, Array([2.5], dtype=float32))

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
  """
  _validate.scalar(percentile, "percentile", low=0.0, high=100.0)
  size = _validate.integer(1000 if history is None else history, "history")
  policy = _validate.nonfinite_policy(nonfinite)
  _validate.axis_name(axis_name)

  def init_fn(params):
    del params
    ring = _history.ring_init(size)
    base = _state.init_clip_state()
    return AutoClipState(clip_threshold=jnp.full([], jnp.inf, jnp.float32), **base._asdict(),
                         norm_history=ring.values, history_count=ring.count,
                         history_index=ring.index)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _clipper.check_state(state, AutoClipState, "autoclip", ("norm_history", "history", size))
    leaves, treedef, norm = _clipper.flat_global_norm(updates, "autoclip", axis_name)
    value = norm.value(jnp.float32)
    ring = _history.ring_push(
        _history.Ring(state.norm_history, state.history_count, state.history_index), value,
        jnp.isfinite(value))
    q = _clipper.hyper(percentile, jnp.float32, 0.0, 100.0)
    threshold = _clipper.poison(_history.ring_percentile(ring, q), q)
    threshold = jnp.where(ring.count > 0, threshold, jnp.inf)
    new, clip = _clipper.clip_to_threshold(state, leaves, treedef, norm, threshold, policy,
                                           "autoclip")
    return new, AutoClipState(clip_threshold=threshold, **clip._asdict(),
                              norm_history=ring.values, history_count=ring.count,
                              history_index=ring.index)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
