"""The state every clipper carries: what it did at the last step, and counts."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ClipState(NamedTuple):
  """State of the stateless clippers (value, norm, global norm, block RMS, AGC).

  Every field is a fixed-shape array, so the state can be jitted, vmapped,
  carried through ``lax.scan`` and checkpointed. Read a field with
  ``optax.tree.get(opt_state, "pre_clip_norm")`` or collect them all with
  :func:`clipjax.clip_stats`.

  Attributes:
    pre_clip_norm: float32 norm of the incoming updates at the last step (the
      global norm of the clipper's ``ord``; L2 for per-leaf/unit clippers).
    clip_scale: float32 factor applied at the last step: the global factor for
      global-norm clipping, the smallest per-leaf/per-unit factor otherwise, and
      post-clip norm / pre-clip norm for value clipping. 1 when nothing was
      clipped.
    clipped: bool, whether anything was clipped at the last step.
    skipped: bool, whether the last step was skipped (``nonfinite='skip'``);
      :func:`clipjax.chain` then leaves the transforms after this one untouched.
    num_steps: int32 count of updates seen.
    num_clipped: int32 count of steps where something was clipped.
    num_nonfinite: int32 count of steps whose gradients held inf or NaN.
  """

  pre_clip_norm: jax.Array
  clip_scale: jax.Array
  clipped: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array


def init_clip_state() -> ClipState:
  return ClipState(
      pre_clip_norm=jnp.zeros([], jnp.float32),
      clip_scale=jnp.ones([], jnp.float32),
      clipped=jnp.zeros([], jnp.bool_),
      skipped=jnp.zeros([], jnp.bool_),
      num_steps=jnp.zeros([], jnp.int32),
      num_clipped=jnp.zeros([], jnp.int32),
      num_nonfinite=jnp.zeros([], jnp.int32),
  )


def next_clip_state(state: ClipState, *, norm, scale, clipped, finite, skipped) -> ClipState:
  clipped = jnp.asarray(clipped) & finite
  steps, n_clipped, n_nonfinite = counters(
      state.num_steps, state.num_clipped, state.num_nonfinite, clipped=clipped, finite=finite)
  return ClipState(
      pre_clip_norm=jnp.asarray(norm, jnp.float32),
      clip_scale=jnp.asarray(scale, jnp.float32),
      clipped=clipped,
      skipped=jnp.asarray(skipped, jnp.bool_),
      num_steps=steps,
      num_clipped=n_clipped,
      num_nonfinite=n_nonfinite,
  )


def counters(num_steps, num_clipped, num_nonfinite, *, clipped, finite):
  """The three running counts after one more step."""
  return (num_steps + 1, num_clipped + jnp.asarray(clipped).astype(jnp.int32),
          num_nonfinite + (~finite).astype(jnp.int32))
