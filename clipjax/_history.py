"""Fixed-size ring buffers of scalars and their masked statistics (jit-safe)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Ring(NamedTuple):
  values: jax.Array  # (size,) float32
  filled: jax.Array  # int32, number of valid entries (<= size)
  cursor: jax.Array  # int32, where the next value goes


def ring_init(size: int) -> Ring:
  return Ring(jnp.zeros((size,), jnp.float32), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))


def ring_push(ring: Ring, value: jax.Array, keep: jax.Array) -> Ring:
  """Appends `value` (overwriting the oldest) if `keep`; otherwise returns `ring` unchanged."""
  size = ring.values.shape[0]
  values = ring.values.at[ring.cursor].set(jnp.asarray(value, jnp.float32))
  pushed = Ring(values, jnp.minimum(ring.filled + 1, size), (ring.cursor + 1) % size)
  return jax.tree.map(lambda new, old: jnp.where(keep, new, old), pushed, ring)


def ring_mask(ring: Ring) -> jax.Array:
  # Entries are written from 0 upward until the ring is full, so the first
  # `filled` slots are the valid ones.
  return jnp.arange(ring.values.shape[0]) < ring.filled


def ring_mean_std(ring: Ring) -> tuple[jax.Array, jax.Array]:
  """Mean and population standard deviation of the valid entries (0, 0 when empty)."""
  mask = ring_mask(ring)
  n = jnp.maximum(ring.filled, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(mask, ring.values, 0)) / n
  var = jnp.sum(jnp.where(mask, (ring.values - mean) ** 2, 0)) / n
  return mean, jnp.sqrt(var)


def ring_max(ring: Ring) -> jax.Array:
  """The largest valid entry (-inf when empty)."""
  return jnp.max(jnp.where(ring_mask(ring), ring.values, -jnp.inf))


def ring_percentile(ring: Ring, q: jax.Array) -> jax.Array:
  """numpy.percentile(valid entries, q) with linear interpolation; NaN when empty."""
  size = ring.values.shape[0]
  ordered = jnp.sort(jnp.where(ring_mask(ring), ring.values, jnp.inf))
  n = ring.filled.astype(jnp.float32)
  pos = jnp.asarray(q, jnp.float32) / 100.0 * (n - 1)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, size - 1)
  hi = jnp.clip(lo + 1, 0, jnp.maximum(ring.filled - 1, 0))
  frac = pos - jnp.floor(pos)
  value = ordered[lo] + frac * (ordered[hi] - ordered[lo])
  value = jnp.where(hi == lo, ordered[lo], value)  # avoid inf - inf at the end
  return jnp.where(ring.filled > 0, value, jnp.nan)
