"""Concatenation, reshaping and reductions' shapes, in forms XLA compiles fast.

Each function equals a plain ``jnp`` one-liner in value (see README.md here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _axes
from clipjax._types import DTypeLike

# What each array is reduced over: None (all axes), an axis or a tuple of them.
Reduce = int | tuple[int, ...] | None


def flatten(parts: list[jax.Array], lead: int) -> jax.Array:
  """Concatenates arrays of shape (lead, *u_i) into one (lead, sum |u_i|).

  The barrier keeps XLA from fusing a concatenation of hundreds of operands
  into each consumer, which compiles the operand selection once per consumer
  (README.md).
  """
  # (under an Explicit mesh a unit vector split over the devices is replicated
  # first: a reshape of it has no sharding rule, and it is small)
  parts = [reshaped(_axes.replicated(v), (lead, v.size // lead)) for v in parts]
  return lax.optimization_barrier(concat(parts, 1))


# Operands per concatenation (see `concat`): 16 to 256 compiled alike; the
# widest keeps the programs of trees of up to 256 leaves (GPT-2 small has 148)
# as they were on every backend, each inner concatenation being a kernel.
_CONCAT_WIDTH = 256


def concat(parts: Sequence[jax.Array], axis: int) -> jax.Array:
  """jnp.concatenate(parts, axis), as concatenations of at most _CONCAT_WIDTH operands each.

  XLA's layout assignment passes a layout constraint on one operand of a
  concatenation on to every other operand: its time is quadratic in the number
  of operands (README.md). The inner concatenations are behind optimization
  barriers, or XLA merges them back into one.
  """
  parts = list(parts)
  while len(parts) > _CONCAT_WIDTH:
    w = _CONCAT_WIDTH
    parts = [_joined(parts[i : i + w], axis) for i in range(0, len(parts), w)]
  return jnp.concatenate(_axes.same_sharding(parts), axis=axis)


def stack(parts: Sequence[jax.Array]) -> jax.Array:
  """jnp.stack(parts), as `concat` bounds it (one value per leaf: see `concat`)."""
  return concat([jnp.expand_dims(x, 0) for x in parts], 0)


def _joined(parts: list[jax.Array], axis: int) -> jax.Array:
  if len(parts) == 1:
    return parts[0]
  return lax.optimization_barrier(jnp.concatenate(_axes.same_sharding(parts), axis=axis))


def reduced_axes(ndim: int, axis: Reduce) -> list[int]:
  """The axes a reduction over `axis` (None: all) reduces, non-negative and sorted."""
  if axis is None:
    return list(range(ndim))
  return sorted({a % ndim for a in ((axis,) if isinstance(axis, int) else axis)})


def reduced_shape(shape: tuple[int, ...], axis: Reduce, keepdims: bool) -> tuple[int, ...]:
  """The shape of a reduction of an array of `shape` over `axis` (None: all axes)."""
  axes = reduced_axes(len(shape), axis)
  return tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)


def unflatten(flat: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
  """The leading entries of the vector `flat`, cut into arrays of `shapes` in order."""
  sizes = [math.prod(shape) for shape in shapes]
  rest = flat.shape[0] - sum(sizes)
  # (One split, not a slice per array: tracing time counts at thousands of leaves.)
  pieces = lax.split(flat, sizes + [rest] if rest else sizes)
  return [reshaped(x, shape) for x, shape in zip(pieces, shapes)]


def reshaped(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return x if x.shape == shape else lax.reshape(x, shape)


def cast(x: jax.Array, dtype: DTypeLike) -> jax.Array:
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def take(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
  """x's entries at the static indices `idx` along `axis`: a slice where they are
  one run in order (a gather is a loop of its own), else a gather."""
  first = int(idx[0]) if idx.size else 0
  if np.array_equal(idx, np.arange(first, first + idx.size)):
    return lax.slice_in_dim(x, first, first + idx.size, axis=axis)
  return x[(slice(None),) * axis + (idx,)]


def computed_once(x: jax.Array) -> jax.Array:
  """x, divided by an opaque 1 so that its producers are computed once.

  XLA duplicates cheap scalar operations into every consumer's fused loop
  (compile time, README.md); a division is not duplicated, so the chain ends
  in one.
  """
  return x / lax.optimization_barrier(jnp.ones([], x.dtype))
