"""Concatenation, reshaping and reductions' shapes, in forms XLA compiles fast.

Each function equals a plain ``jnp`` one-liner in value (see README.md here).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

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


# XLA's GPU backend (jax 0.10.2) does not fuse a float64 elementwise producer
# into a reduction over leading axes that keeps at most this many entries: it
# writes the float64 array first (README.md).
_NARROW_COLUMNS = 1024


def leading_sum(
    x: jax.Array, axis: Reduce, term: Callable[[jax.Array], jax.Array], fold: bool
) -> jax.Array:
  """jnp.sum(term(x), axis, keepdims=True), `term` elementwise.

  With `fold`, a reduction over x's leading axes that keeps a block of at most
  _NARROW_COLUMNS entries reads x as k rows side by side (a free reshape), so
  that it keeps more; the k partial sums of each entry are added after.
  """
  axes = reduced_axes(x.ndim, axis)
  lead = len(axes)
  # (Not for an array split by its type: the reshape would move its shards.)
  cols = math.prod(x.shape[lead:])
  if (
      fold
      and 0 < lead < x.ndim
      and axes == list(range(lead))
      and cols <= _NARROW_COLUMNS
      and not _axes.is_sharded(x)
  ):
    rows = math.prod(x.shape[:lead])
    # (The first k past the limit: at most 2 * _NARROW_COLUMNS candidates.)
    candidates = range(2, min(rows, 2 * _NARROW_COLUMNS + 2))
    k = next((k for k in candidates if rows % k == 0 and k * cols > _NARROW_COLUMNS), None)
    if k is not None:
      s = jnp.sum(term(lax.reshape(x, (rows // k, k * cols))), axis=0)
      # (Added as slices: elementwise, fused into the sums' readers, where a
      # reduction of k rows would be a kernel of its own.)
      s = functools.reduce(jnp.add, [s[i * cols : (i + 1) * cols] for i in range(k)])
      return lax.reshape(s, reduced_shape(x.shape, axis, True))
  return jnp.sum(term(x), axis=axis, keepdims=True)


# Rows of at most this many entries are reduced in the loop that reads them on
# a GPU; XLA splits a longer row into a reduction of its own (README.md).
_ROW_ENTRIES = 2**14


@functools.cache
def _row_length(n: int) -> int:
  """The largest divisor of n of at most _ROW_ENTRIES."""
  best = 1
  for d in range(1, math.isqrt(n) + 1):
    if n % d == 0:
      best = max(best, *(c for c in (d, n // d) if c <= _ROW_ENTRIES))
  return best


def as_rows(x: jax.Array) -> jax.Array:
  """jnp.reshape(x, (k, -1)): rows of at most _ROW_ENTRIES entries.

  Not for an array split by its type (an Explicit mesh): reshaping it would
  move its shards.
  """
  return jnp.reshape(x, (x.size // _row_length(x.size), -1))


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
