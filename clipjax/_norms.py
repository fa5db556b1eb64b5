"""Overflow-safe norms of gradient pytrees, and clip factors that never flush to zero.

**Split norms.** A norm is carried as a pair ``(r, e)`` meaning ``r * 2**e``
(:class:`Split`), with ``r`` finite whenever the data are: the norm of finite
float32 gradients can exceed float32's range (two entries of 3e38 have L2 norm
4.2e38), and its reciprocal can fall below it (``1 / 1e38`` is a float32
subnormal, which XLA flushes to zero). Clip factors are derived from the split
form (:func:`clip_factors`) as two numbers, a power of two and a factor near
the threshold, so every finite input is scaled to the right norm and direction.
:meth:`Split.value` gives the plain number (inf where it does not fit) for the
reported statistics.

**Unit norms in one read, p = 1 and 2.** Each leaf is upcast to the
accumulation dtype (float32 by default, float64 for float64 leaves) inside the
reduction, so fp16/bf16 gradients never overflow while raised to the power p.
The accumulation dtype itself overflows for |g|^p above its range and
underflows below it, so every unit is reduced at three power-of-two scales in
the same pass:

    s_0 = sum |g|^p,   s_hi = sum |g 2^-k|^p,   s_lo = sum |g 2^k|^p

XLA's GPU backend fuses sibling reductions of one input into one kernel: the
gradients are read once. The unit's norm is ``(s_0^(1/p), 0)`` when s_0 is
finite and not tiny, else ``(s_hi^(1/p), k)`` (overflow) or ``(s_lo^(1/p),
-k)`` (underflow); scaling by a power of two is exact. No branch, no second
read. This is the ``'multiscale'`` form (`Forms.norms`).

The default (``'cond'``, every backend) is cheaper in kernels: the norm is the
plain sum s_0, and only when some unit's s_0 is non-finite or tiny (zero
included: an underflowed unit cannot be told from a zero one) does one
``lax.cond`` (for all leaves together) reduce each unit once more at the scale
it needs. The branch is taken on psum-reduced values, so all shards agree. On
an H200 the multiscale program of a GPT-2-small step had 585 fusions against
358 (optax's clip: 350): the three sums share their first-stage kernel, but a
large leaf needs a second-stage reduction kernel per sum. XLA's CPU backend
does not fuse the three sums at all.

**Any other p.** |g|^p has too wide a range for any fixed set of scales
(``ord=200`` on [3, 4] overflows at every float32 scale), so for p not in
{1, 2, inf} each unit is reduced as ``M * (sum (|g| / M)^p)^(1/p)``, M its
max-abs rounded to a power of two: every term is at most 1, exact over the
whole float range, at the cost of a second read of the gradients.

**Combining.** Unit norms are combined into a global norm in the split form,
by the same max-normalisation over the (few) unit norms.

All leaves (and AGC's unit norms of gradients and parameters) go through one
function with one branch, which keeps the program small: XLA's compile time
grows with the number of operations, and models have hundreds of leaves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _axes, _forms, _validate
from clipjax._forms import Forms
from clipjax._types import AxisName, AxisSpec, DTypeLike, Implementation, Ord, PyTree

# A list of per-array axes (None: replicated), or one for all.
AxesArg = AxisName | list[AxisName]
# What each array is reduced over: None (all axes), an axis or a tuple of them.
Reduce = int | tuple[int, ...] | None

# Exponent of a zero norm: far below any real one, so it never wins a max.
_ZERO_EXP = -(2**20)


class Split(NamedTuple):
  """A norm (or a vector of them) as ``r * 2**e``: ``r`` float, ``e`` int32."""

  r: jax.Array
  e: jax.Array

  def value(self, dtype: DTypeLike | None = None) -> jax.Array:
    """r * 2^e as a number of `dtype` (default r's): inf where it overflows."""
    v = ldexp(self.r, self.e)
    return v if dtype is None else v.astype(dtype)

  def finite(self) -> jax.Array:
    """Whether the data were finite (the norm itself may still exceed the float range)."""
    return jnp.isfinite(self.r)


def _dispatch(
    forms: Forms, cond: Callable[..., Any], multiscale: Callable[..., Any], *args: Any
) -> Any:
  # 'cond' (the plain sums and one rarely taken branch) on every backend unless
  # asked: on an H200 (GPT-2 small) the multiscale sums share one read, but each
  # of the three needs its own second-stage reduction kernel per large leaf
  # (docs/design.md).
  return cond(*args) if forms.norms == "cond" else multiscale(*args)


def accumulation_dtype(norm_dtype: DTypeLike, leaves: Sequence[jax.Array]) -> jnp.dtype:
  """`norm_dtype`, widened to float64 when a leaf is float64 (its range needs it)."""
  return functools.reduce(
      jnp.promote_types, [jnp.dtype(x.dtype) for x in leaves], jnp.dtype(norm_dtype)
  )


def _per_leaf(axis_name: AxesArg, n: int) -> list[AxisName]:
  return list(axis_name) if isinstance(axis_name, list) else [axis_name] * n


def psum_grouped(
    values: list[jax.Array], axes: list[AxisName], op: Callable[..., Any] = lax.psum
) -> list[jax.Array]:
  """values[i] reduced by `op` over axes[i]: one collective per distinct axis spec.

  A group is reduced as a list, never stacked with another group's values, so
  that inside shard_map a replicated leaf's sum never mixes with a sharded
  one's (JAX then types each result as the same on every shard).
  """
  groups: dict[Any, list[int]] = {}
  for i, a in enumerate(axes):
    groups.setdefault(a, []).append(i)
  out = list(values)
  for a, idx in groups.items():
    if a is not None:
      for i, r in zip(idx, op([values[i] for i in idx], a)):
        out[i] = r
  return out


# ---------------------------------------------------------------- powers of two


def _exp_range(dtype: DTypeLike) -> tuple[int, int]:
  """Smallest and largest n for which 2^n is a normal number of `dtype`."""
  fi = jnp.finfo(dtype)
  return int(fi.minexp), int(fi.maxexp) - 1


def pow2(n: jax.typing.ArrayLike, dtype: DTypeLike) -> jax.Array:
  """2^n exactly (built from its bits), 0 below the normal range, inf above it."""
  lo, hi = _exp_range(dtype)
  fi = jnp.finfo(dtype)
  int_t = jnp.int64 if jnp.dtype(dtype).itemsize == 8 else jnp.int32
  n = lax.stop_gradient(jnp.asarray(n, jnp.int32))
  bits = (jnp.clip(n, lo, hi).astype(int_t) - lo + 1) << fi.nmant
  p = lax.bitcast_convert_type(bits, jnp.dtype(dtype))
  return jnp.where(n < lo, jnp.zeros_like(p), jnp.where(n > hi, jnp.full_like(p, jnp.inf), p))


def ldexp(x: jax.Array, n: jax.typing.ArrayLike) -> jax.Array:
  """x * 2^n for |n| up to twice the exponent range, as two exact power-of-two products.

  Differentiable in x (the exponent is a constant), unlike ``jnp.ldexp``.
  """
  n = lax.stop_gradient(jnp.asarray(n, jnp.int32))
  lo, hi = _exp_range(x.dtype)
  n = jnp.clip(n, 2 * lo, 2 * hi)
  half = n // 2
  return x * pow2(half, x.dtype) * pow2(n - half, x.dtype)


def _shift(p: float, dtype: DTypeLike) -> int:
  """k such that 2^(k p) spans the dtype's overflow/underflow margin; 2^k stays representable."""
  _, hi = _exp_range(dtype)
  return min(hi - 27, max(1, round(1.25 * (hi + 1) / p)))


def _tiny(dtype: DTypeLike) -> float:
  """Sums of |g|^p below this may have lost precision to underflow."""
  lo, _ = _exp_range(dtype)
  return 2.0 ** (lo + 26)


@functools.cache
def _power_bound(p: float, dt: np.dtype) -> float:
  """The largest number of `dt` whose p-th power is finite in `dt`."""
  with np.errstate(over="ignore"):
    b = dt.type(float(np.finfo(dt).max) ** (1.0 / p))
    while not np.isfinite(np.power(b, dt.type(p))):
      b = np.nextafter(b, dt.type(0))
  return float(b)


def _clamp_finite(y: jax.Array, p: float, dtype: DTypeLike) -> jax.Array:
  """y clamped to where |y|^p is finite, inf and NaN kept.

  Applied to values scaled by 2^k or 2^-k, where it changes no value that is
  used, so that XLA cannot rewrite |x c|^p as |x|^p |c|^p: for a leaf that is a
  constant in the program (the gradient of a frozen or unused parameter, a
  broadcast zero) it folds that to 0 * (2^80)^2 = 0 * inf = NaN (seen on CPU),
  and to inf * 0 for a constant above 2^64.
  """
  bound = _power_bound(p, np.dtype(dtype))
  return jnp.where(jnp.isfinite(y), jnp.clip(y, -bound, bound), y)


def _scales(p: float, dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """(2^-k, 2^k) as opaque scalars.

  Behind an optimization barrier XLA cannot reassociate square(x * 2^-k) into
  square(x) * 2^-2k (seen on CPU for size-1 reductions: inf * 0 = NaN).
  """
  k = _shift(p, dtype)
  return lax.optimization_barrier((jnp.asarray(2.0**-k, dtype), jnp.asarray(2.0**k, dtype)))


# ------------------------------------------------------------------- unit sums


def _abs_max(
    x: jax.Array, dtype: DTypeLike, axis: Reduce = None, keepdims: bool = False
) -> jax.Array:
  return abs_max(x.astype(dtype), axis, keepdims)


def abs_max(x: jax.Array, axis: Reduce = None, keepdims: bool = False) -> jax.Array:
  """max |x| over `axis`, 0 for a zero-size array.

  `initial` (needed only when there is nothing to reduce) is a separate
  maximum after the reduction, which XLA's GPU backend launches as a kernel of
  its own per leaf: it is left out whenever the array has entries.
  """
  initial = 0 if x.size == 0 else None
  return jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims, initial=initial)


def _power(x: jax.Array, p: float) -> jax.Array:
  if p == 2:
    return jnp.square(x)
  if p == 1:
    return jnp.abs(x)
  return jnp.abs(x) ** p


def _plain_sum(
    x: jax.Array, p: float, dtype: DTypeLike, axis: Reduce = None, keepdims: bool = False
) -> jax.Array:
  return jnp.sum(_power(_cast(x, dtype), p), axis=axis, keepdims=keepdims)


def _power_sums(
    x: jax.Array,
    p: float,
    dtype: DTypeLike,
    axis: Reduce = None,
    keepdims: bool = False,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(s_0, s_hi, s_lo): sums of |x|^p at scales 1, 2^-k and 2^k, one fused pass."""
  x = x.astype(dtype)
  down, up_scale = _scales(p, dtype) if scales is None else scales
  s0 = _plain_sum(x, p, dtype, axis, keepdims)
  # (|x 2^-k| is far below the clamp's bound: no value changes.)
  s_hi = jnp.sum(_power(_clamp_finite(x * down, p, dtype), p), axis=axis, keepdims=keepdims)
  # Clamped so that entries which overflow here (s_lo is then unused) give zero,
  # not NaN, derivatives.
  bound = 2.0 ** (_exp_range(dtype)[1] // 2)
  up = jnp.clip(x * up_scale, -bound, bound)
  s_lo = jnp.sum(_power(up, p), axis=axis, keepdims=keepdims)
  return s0, s_hi, s_lo


def flatten(parts: list[jax.Array], lead: int) -> jax.Array:
  """Concatenates arrays of shape (lead, *u_i) into one (lead, sum |u_i|).

  The barrier keeps XLA from fusing a concatenation of hundreds of operands
  into each consumer (it would then compile the operand selection once per
  consumer: measured 8 s instead of 1 s for 1000 leaves on CPU).
  """
  # (under an Explicit mesh a unit vector split over the devices is replicated
  # first: a reshape of it has no sharding rule, and it is small)
  parts = [_reshaped(_axes.replicated(v), (lead, v.size // lead)) for v in parts]
  return lax.optimization_barrier(concat(parts, 1))


# Operands per concatenation (see `concat`): 16, 32, 64, 128 and 256 compiled
# alike (12.9-14.1 s in the measurement there). The widest keeps the programs
# of trees of up to 256 leaves (GPT-2 small has 148) as they were on every
# backend: each inner concatenation is a kernel of its own.
_CONCAT_WIDTH = 256


def concat(parts: Sequence[jax.Array], axis: int) -> jax.Array:
  """jnp.concatenate(parts, axis), as concatenations of at most _CONCAT_WIDTH operands each.

  XLA's layout assignment passes a layout constraint on one operand of a
  concatenation on to every other operand: its time is quadratic in the number
  of operands. With one concatenation of all the leaves' sums (and one of their
  rows in the rescue branch), clip_by_global_norm alone on 4000 leaves compiled
  in 33 s on CPU, two thirds of it in layout assignment; 64 or 256 operands at
  a time, 13-14 s. The inner concatenations are behind optimization barriers:
  XLA merges nested concatenations back into one (33.9 s without them).
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


def _reduced_axes(ndim: int, axis: Reduce) -> list[int]:
  """The axes a reduction over `axis` (None: all) reduces, non-negative and sorted."""
  if axis is None:
    return list(range(ndim))
  return sorted({a % ndim for a in ((axis,) if isinstance(axis, int) else axis)})


def reduced_shape(shape: tuple[int, ...], axis: Reduce, keepdims: bool) -> tuple[int, ...]:
  """The shape of a reduction of an array of `shape` over `axis` (None: all axes)."""
  axes = _reduced_axes(len(shape), axis)
  return tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)


def unflatten(flat: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
  """The leading entries of the vector `flat`, cut into arrays of `shapes` in order."""
  sizes = [math.prod(shape) for shape in shapes]
  rest = flat.shape[0] - sum(sizes)
  # (One split, not a slice per array: tracing time counts at thousands of leaves.)
  pieces = lax.split(flat, sizes + [rest] if rest else sizes)
  return [_reshaped(x, shape) for x, shape in zip(pieces, shapes)]


def _reshaped(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return x if x.shape == shape else lax.reshape(x, shape)


def _chunk_width(n: int) -> int:
  """Parts per chunk for the n arrays of one kind (see `split_per_array`).

  About sqrt(n / 8), a power of two from 1 to 64: the chunks (buffers) number
  n / width and the distinct scaling loops width. `clip_by_norm` alone on
  2000 leaves of one shape, trace + lower + compile: 8.8-9.9 s with 8 parts
  per chunk, 8.0-8.4 s with 16, 8.3-10.3 s with 32; on 10,000 leaves 70.3 s
  with 32, 73.4 s with 64, 75.3 s with 128.
  """
  return 1 << min(6, max(0, round(math.log2(math.sqrt(n / 8)))))


# The most outputs of one cutting reduction (see `_separate`): 500 in one
# compiled in 6.8 s, 128 in 4.8 s (clip_by_norm + Adam, 500 leaves, CPU).
_OUTPUTS_PER_REDUCE = 128


def split_per_array(
    vectors: Sequence[jax.Array],
    shapes: list[tuple[int, ...]],
    kinds: Sequence[Hashable],
    forms: Forms,
) -> list[tuple[jax.Array, ...]]:
  """Array i's part of each of `vectors`, as `unflatten` cuts them.

  For clip factors (`clip_factors`) and per-array statistics. XLA's CPU backend
  compiles a kernel per distinct fused loop, and a slice is fused into the loop
  that reads it, its offset included: when every array read its part as a
  slice of the vectors, every array's scaling loop (and the optimizer's loop
  it fuses into) was a kernel of its own, although the arrays share a shape
  (clip_by_norm + Adam at 2000 leaves of 768 float32: 101.5 s to compile,
  optax's global-norm clip + Adam 38.4 s).

  On CPU the parts of arrays of one kind (`kinds[i]`: the callers pass what
  else makes their loops differ, the array's shape and dtype) are cut into
  chunks of `_chunk_width` parts, each a buffer of its own (an output of a
  variadic reduction, which XLA does not fuse into its readers), and an array
  reads its chunk at its position in it: the loops of arrays of one kind at
  one position are one kernel, a chunk's width of them for the kind. Cut into
  one buffer per part (a second reduction per chunk), `clip_by_norm` alone on
  10,000 leaves took 88.6 s to trace, lower and compile; chunks of 32 parts
  read in place, 70.3 s. Other backends read the slices (not measured there;
  see `Forms.chunked`).
  """

  def sliced(*vectors: jax.Array) -> list[tuple[jax.Array, ...]]:
    return list(zip(*(unflatten(v, shapes) for v in vectors)))

  def chunked(*vectors: jax.Array) -> list[tuple[jax.Array, ...]]:
    rows = jnp.stack(vectors)  # (vectors, entries)
    sizes = [math.prod(shape) for shape in shapes]
    starts = np.cumsum([0] + sizes)
    by_kind: dict[Any, list[int]] = {}
    for i, key in enumerate(zip(shapes, kinds)):
      by_kind.setdefault(key, []).append(i)
    # The kinds of one part size and chunk width are cut by the same reductions.
    by_cut: dict[tuple[int, int], list[list[int]]] = {}
    for members in by_kind.values():
      by_cut.setdefault((sizes[members[0]], _chunk_width(len(members))), []).append(members)
    out: list[tuple[jax.Array, ...]] = [()] * len(shapes)
    for (size, width), groups in by_cut.items():
      chunks = iter(_chunks(rows, starts, size, groups, width))
      for members in groups:
        for parts in _grouped(members, width):
          chunk = next(chunks)
          # Vector j's parts of the chunk, (1, 1, size) each, cut in one split.
          pieces = [
              lax.split(lax.slice_in_dim(chunk, j, j + 1), [1] * chunk.shape[1], axis=1)
              for j in range(len(vectors))
          ]
          for position, i in enumerate(parts):
            out[i] = tuple(
                _cast(_reshaped(p[position], shapes[i]), v.dtype) for p, v in zip(pieces, vectors)
            )
    return out

  return chunked(*vectors) if forms.chunked else sliced(*vectors)


def _grouped(items: list[int], n: int) -> list[list[int]]:
  return [items[c : c + n] for c in range(0, len(items), n)]


def _chunks(
    rows: jax.Array, starts: np.ndarray, size: int, groups: list[list[int]], width: int
) -> list[jax.Array]:
  """The parts (`size` entries each) of each group's members, `width` at a time, in order.

  Each is a (vectors, parts, size) array. With several, each is a buffer of its
  own, and each group's last chunk is padded to `width` parts (with parts that
  are never read), so that they all share a shape.
  """
  k = rows.shape[0]
  if len(groups) == 1 and len(groups[0]) <= width:
    padded_members = groups[0]
  else:
    padded_members = []
    for members in groups:
      padded_members += members + [members[0]] * (-len(members) % width)
  idx = np.concatenate(
      [np.arange(starts[i], starts[i] + size, dtype=np.int64) for i in padded_members]
  )
  picked = lax.reshape(_take(rows, idx, 1), (k, len(padded_members), size))
  if len(padded_members) <= width:
    return [picked]
  return _separate(picked, len(padded_members) // width, width, 1)


def _take(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
  """x's entries at the static indices `idx` along `axis`: a slice where they are
  one run in order (a gather is a loop of its own), else a gather."""
  first = int(idx[0]) if idx.size else 0
  if np.array_equal(idx, np.arange(first, first + idx.size)):
    return lax.slice_in_dim(x, first, first + idx.size, axis=axis)
  return x[(slice(None),) * axis + (idx,)]


def _separate(x: jax.Array, n: int, width: int, axis: int) -> list[jax.Array]:
  """x's first n slices of `width` along `axis`, each an output of a variadic
  reduction (of at most _OUTPUTS_PER_REDUCE): on CPU, each a buffer of its
  own, which its readers read whole.

  The reduction adds a zero (behind a barrier: XLA would fold it) along a new
  last axis, appended once for all the slices: the values exactly, but for
  -0.0, which becomes 0.0.
  """
  pad = lax.optimization_barrier(jnp.zeros((*x.shape, 1), x.dtype))
  both = lax.concatenate([lax.expand_dims(x, (x.ndim,)), pad], x.ndim)
  zero = jnp.zeros([], x.dtype)
  out: list[jax.Array] = []
  for first in range(0, n, _OUTPUTS_PER_REDUCE):
    count = min(_OUTPUTS_PER_REDUCE, n - first)
    operands = [
        lax.slice_in_dim(both, j * width, (j + 1) * width, axis=axis)
        for j in range(first, first + count)
    ]
    out += lax.reduce(
        operands, [zero] * count, lambda a, b: tuple(u + v for u, v in zip(a, b)), (x.ndim,)
    )
  return out


def _cast(x: jax.Array, dtype: DTypeLike) -> jax.Array:
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _safe_root(s: jax.Array, p: float) -> jax.Array:
  """s ** (1/p), inf/NaN passed on, with a finite derivative at s == 0."""
  positive = s > 0
  safe = jnp.where(positive & jnp.isfinite(s), s, 1)
  r = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
  return jnp.where(jnp.isfinite(s), jnp.where(positive, r, jnp.zeros_like(s)), s)


def _needs_rescale(s: jax.Array, dtype: DTypeLike) -> jax.Array:
  return ~jnp.isfinite(s) | (s < _tiny(dtype))


def _split_from_sums(
    s0: jax.Array, s_hi: jax.Array, s_lo: jax.Array, p: float, dtype: DTypeLike
) -> Split:
  k = _shift(p, dtype)
  use0 = ~_needs_rescale(s0, dtype)
  use_hi = ~jnp.isfinite(s0)  # overflow, or genuine inf/NaN (then s_hi is inf/NaN too)
  r = jnp.where(
      use0, _safe_root(s0, p), jnp.where(use_hi, _safe_root(s_hi, p), _safe_root(s_lo, p))
  )
  e = jnp.where(use0, 0, jnp.where(use_hi, k, -k)).astype(jnp.int32)
  return Split(r, e)


# -------------------------------------------------------------- norms of units


def flat_norms(
    xs: Sequence[jax.Array],
    p: float,
    dtype: DTypeLike,
    axis_name: AxesArg,
    red: Sequence[Reduce],
    forms: Forms,
    floor: jax.typing.ArrayLike | None = None,
    reported: int | None = None,
    blocks: Blocks | None = None,
) -> Split:
  """p-norms of each array in `xs` over its `red` entry (None: all axes), as one flat Split.

  The norms of array i (shape ``reduced_shape(x.shape, red[i], True)``) follow
  those of array i - 1; `unflatten` splits them. The accumulation dtype is
  `dtype`, widened to float64 if an array is float64. With `axis_name`, the
  reduced part of each array is a shard of a larger one split over that mapped
  axis (shard_map / pmap): power sums are psum-reduced and maxima
  pmax-reduced, so every shard gets the norms of the full arrays. A list gives
  each array its own axes; None there marks a replicated array.

  Every norm is exact unless the caller gives a `floor` (a scalar, or one per
  unit): a clipper that compares each unit's norm with a limit of at least
  `floor` lets units whose norm is far below it (zero, or tiny) keep their
  plain, possibly underflowed, norm when the total of the first `reported`
  units (default all), which it reports, is in range. Their clip factor is 1
  either way, and the rescue branch (a second read) then does not run on every
  step for the zero gradient of a frozen parameter. An infinite floor: only the
  total counts (a global norm).

  `blocks`, if given, holds the packed blocks (see `Blocks`) for the caller's
  own reductions of the same arrays.
  """
  dtype = accumulation_dtype(dtype, xs)
  if not xs:
    return Split(jnp.zeros((0,), dtype), jnp.zeros((0,), jnp.int32))
  axes = _per_leaf(axis_name, len(xs))
  if math.isinf(p):
    m = flatten(
        psum_grouped(
            [_abs_max(x, dtype, axis=r, keepdims=True) for x, r in zip(xs, red)], axes, lax.pmax
        ),
        1,
    )[0]
    return Split(m, jnp.zeros(m.shape, jnp.int32))
  if p not in (1.0, 2.0):
    return _max_normalized(xs, p, dtype, axes, red)

  # The per-array sums are concatenated into one vector before the (elementwise)
  # root and the choice of scale, so that those are a handful of operations for
  # the whole tree rather than a handful per leaf: compile time counts.
  return _dispatch(
      forms,
      lambda *xs: _cond_norms(xs, p, dtype, axes, red, forms, floor, reported, blocks),
      lambda *xs: _multiscale_norms(xs, p, dtype, axes, red),
      *xs,
  )


def _multiscale_norms(
    xs: Sequence[jax.Array], p: float, dtype: DTypeLike, axes: list[AxisName], red: Sequence[Reduce]
) -> Split:
  """Unit norms from sums at three scales (one fused read on GPU/TPU), no branch."""
  scales = _scales(p, dtype)
  sums = psum_grouped(
      [jnp.stack(_power_sums(x, p, dtype, r, True, scales)) for x, r in zip(xs, red)], axes
  )
  flat = flatten(sums, 3)
  return _split_from_sums(flat[0], flat[1], flat[2], p, dtype)


def _cond_norms(
    xs: Sequence[jax.Array],
    p: float,
    dtype: DTypeLike,
    axes: list[AxisName],
    red: Sequence[Reduce],
    forms: Forms,
    floor: jax.typing.ArrayLike | None = None,
    reported: int | None = None,
    blocks: Blocks | None = None,
) -> Split:
  """Unit norms from plain sums, and one branch that reduces again where a sum left the range."""
  ys, red_y, axes_y, order = _packed(xs, red, axes, dtype, forms, blocks)
  sums = [_plain_sum(y, p, dtype, r, True) for y, r in zip(ys, red_y)]
  sy = flatten(psum_grouped(sums, axes_y), 1)[0]
  # In the order of the units of xs (behind a barrier, so that the gather is
  # not fused into each reader of s0).
  s0 = sy if order is None else lax.optimization_barrier(sy[order])

  def rescue(ys: tuple[jax.Array, ...]) -> Split:
    n = _rescued_norms(ys, sy, p, dtype, axes_y, red_y)
    return n if order is None else Split(n.r[order], n.e[order])

  # Taken when any unit needs it (not only when the total does): a tiny leaf
  # beside a normal one must still get its own norm, unless `floor` says its
  # norm cannot matter.
  return lax.cond(
      _rescue_needed(s0, p, dtype, floor, reported),
      rescue,
      # Typed as the rescue branch's (sharded and varying where s0 is: zeros_like).
      lambda ys: Split(_safe_root(s0, p), jnp.zeros_like(s0, jnp.int32)),
      tuple(ys),
  )


# On CPU, arrays of at most _PACK_LEAF_ELEMENTS entries whose units are rows,
# and of at most _PACK_COLUMN_ELEMENTS whose units are not, are packed into
# blocks (see `_packed`).
_PACK_LEAF_ELEMENTS = 2**11
_PACK_COLUMN_ELEMENTS = 2**10


def _packed(
    xs: Sequence[jax.Array],
    red: Sequence[Reduce],
    axes: list[AxisName],
    dtype: DTypeLike,
    forms: Forms,
    blocks: Blocks | None = None,
) -> tuple[list[jax.Array], list[Reduce], list[AxisName], np.ndarray | None]:
  """On CPU, the small arrays of `xs` packed into blocks that hold their units.

  Returns (arrays, their reductions, their mapped axes, the permutation that
  takes the values of their units to the order of the units of `xs`, or None
  where that is the identity). The arrays of one kind (see `_row_groups`)
  become one (A, R, B) or (A, R) block of `dtype` (their `_unit_block`s concatenated),
  reduced over its middle axis, in the place of the first of them; the other
  arrays are as they were.

  Each reduction of its own is a kernel launch and an output buffer, and XLA's
  CPU compile time grows faster than linearly with their number:
  `clip_by_global_norm` alone on 2000 leaves of 768 float32 took 8.4 s to
  trace, lower and compile with a sum per leaf against 5.5 s packed, on 10,000
  leaves 75 s against 48 s. The rescue branch reads the same blocks, so that
  its operands are a few blocks, not every leaf.

  At run time the copy costs less than the launches it saves for arrays of at
  most _PACK_LEAF_ELEMENTS entries whose units are rows: `clip_by_global_norm`
  + Adam, 1000 leaves of 2048 float32, 11.2 ms a step packed against 12.6 ms.
  Not for leaves of 4096 entries, which XLA reduces with one YNNPACK kernel
  each. Units that are not rows (AGC's kernels: columns) pack up to 1024
  entries: AGC + Adam on 1000 leaves of 32 x 32, 11.3-12.2 ms a step against
  14.1-15.8 ms, but on 1000 of 32 x 64 25.0-27.1 ms against 15.1-17.2 ms
  (medians of 7 x 10 steps, two runs each).
  Other backends reduce every array on its own (not measured there; see
  `Forms.packed`). The blocks are made by `blocks` (a fresh `Blocks` if None).
  """
  if not forms.packed:
    return list(xs), list(red), axes, None
  blocks = Blocks() if blocks is None else blocks
  packs = {m[0]: m for m in _packs(xs, red, axes)}
  packed = {i for m in packs.values() for i in m}
  starts = _unit_starts(xs, red)
  ys: list[jax.Array] = []
  red_y: list[Reduce] = []
  axes_y: list[AxisName] = []
  position = []
  for i, x in enumerate(xs):
    if i in packs:
      ys.append(blocks.block([xs[j] for j in packs[i]], [red[j] for j in packs[i]], dtype))
      red_y.append(1)
    elif i not in packed:
      ys.append(x)
      red_y.append(red[i])
    else:
      continue
    axes_y.append(axes[i])
    position += [np.arange(starts[j], starts[j + 1]) for j in packs.get(i, [i])]
  return ys, red_y, axes_y, _unit_order(np.concatenate(position))


def _packs(xs: Sequence[jax.Array], red: Sequence[Reduce], axes: list[AxisName]) -> list[list[int]]:
  """The groups of arrays `_packed` concatenates into blocks (`packed_values` too,
  so that one `Blocks` hands both the same block)."""
  groups = _row_groups(
      xs, red, axes, _PACK_LEAF_ELEMENTS, transpose=False, column_limit=_PACK_COLUMN_ELEMENTS
  )
  return [m for (kind, _), m in groups.items() if kind != "alone" and len(m) > 1]


def _unit_starts(xs: Sequence[jax.Array], red: Sequence[Reduce]) -> np.ndarray:
  """Where each array's units start in the flat vector of all the arrays' units (and the end)."""
  return np.cumsum([0] + [math.prod(reduced_shape(x.shape, r, True)) for x, r in zip(xs, red)])


def _unit_order(position: np.ndarray) -> np.ndarray | None:
  """The gather that takes values at the units `position` back to the units' order
  (None where they are in order)."""
  return None if np.array_equal(position, np.arange(position.size)) else np.argsort(position)


def packed_values(
    xs: Sequence[jax.Array],
    dtype: DTypeLike,
    rows_fn: Callable[[jax.Array], tuple[jax.Array, ...]],
    forms: Forms,
    blocks: Blocks | None = None,
) -> tuple[tuple[jax.Array, ...] | None, list[int]]:
  """For XLA's CPU backend: `rows_fn` over the small arrays of `xs`, packed as in `_packed`.

  Each array is one row (in `dtype`) of a matrix per size, and ``rows_fn(rows)``
  gives one or more values per row (a tuple of vectors). Returns (those values
  of the packed arrays, each in no particular order but the same for all, or
  None if none was packed; the indices of the others). Asking for every value
  in one call traces one copy of the rows, not one per value; with the
  `blocks` a norm of the same arrays was given (same `dtype`), not even that.
  """
  if not forms.packed:
    return None, list(range(len(xs)))
  blocks = Blocks() if blocks is None else blocks
  packed = _packs(xs, [None] * len(xs), [None] * len(xs))
  alone = sorted(set(range(len(xs))) - {i for m in packed for i in m})
  if not packed:
    return None, alone
  values = [rows_fn(blocks.block([xs[i] for i in m], [None] * len(m), dtype)) for m in packed]
  return lax.optimization_barrier(tuple(concat(v, 0) for v in zip(*values))), alone


class Blocks:
  """The blocks of `_packed` made while tracing one update, each made once.

  A clipper that reduces the same small arrays for its norm and for values of
  its own (`packed_values`) passes one `Blocks` to both, and both read one
  traced block. Copies are merged by XLA, but only after they were traced,
  lowered and carried through its first passes: with three copies (its norm,
  maxima and clipped sums) `clip_by_value` + Adam on 2000 leaves of 24 x 32
  took 16.8 s to compile, with one 15.8 s (CPU, means of 4). Keyed by the
  arrays' identities, which it keeps alive: make one per update, never share
  it between traces.
  """

  def __init__(self) -> None:
    self._made: dict[Hashable, tuple[list[jax.Array], jax.Array]] = {}

  def block(self, xs: Sequence[jax.Array], red: Sequence[Reduce], dtype: DTypeLike) -> jax.Array:
    """The `_unit_block`s of `xs` (reduced over `red`) in `dtype`, concatenated."""
    key = (tuple(map(id, xs)), tuple(red), jnp.dtype(dtype))
    if key not in self._made:
      made = concat([_unit_block(x, r, dtype) for x, r in zip(xs, red)], 0)
      self._made[key] = (list(xs), made)
    return self._made[key][1]


def _row_groups(
    xs: Sequence[jax.Array],
    red: Sequence[Reduce],
    axes: list[AxisName],
    leaf_limit: int,
    transpose: bool = True,
    column_limit: int | None = None,
) -> dict[Any, list[int]]:
  """Arrays whose units can be reduced together: {(kind, number): members}.

  A kind is ((R, B), mapped axes), (A, R, B) the array's `_unit_block`:
  the arrays of a kind are concatenated along A and reduced over R. Arrays
  reduced over different mapped axes are never mixed (see psum_grouped). An
  array whose type says how it is sharded is ``"alone"`` (its block could not
  be formed without gathering it), and so is one of more than `leaf_limit`
  entries (`column_limit`, if given, where its units are not rows: B is not 1):
  copying it would cost more than reducing it on its own. So is one whose
  block needs a transposing copy (its reduced axes are not adjacent), unless
  `transpose`. A group holds at most _GROUP_ELEMENTS entries.
  """
  groups: dict[Any, list[int]] = {}
  filled: dict[Any, tuple[int, int]] = {}  # per kind of unit: (group number, elements in it)
  for i, (x, r, a) in enumerate(zip(xs, red, axes)):
    block = _block_shape(x.shape, r)
    columns = block is not None and block[2] != 1
    limit = leaf_limit if column_limit is None or not columns else column_limit
    if (
        _axes.is_sharded(x)
        or x.size > min(limit, _GROUP_ELEMENTS)
        or not (transpose or block is not None)
    ):
      groups[("alone", i)] = [i]
      continue
    if block is None:  # the reduced axes are not adjacent: `_unit_block` transposes to rows
      unit = (math.prod(x.shape[j] for j in _reduced_axes(x.ndim, r)), 1)
    else:
      unit = block[1:]
    # (inside shard_map, a leaf that varies over other axes than its neighbour
    # would make the block, and so the neighbour's results, vary over them too)
    kind = (unit, a, _axes.varying(x))
    number, size = filled.get(kind, (0, 0))
    if size + x.size > _GROUP_ELEMENTS:
      number, size = number + 1, 0
    filled[kind] = (number, size + x.size)
    groups.setdefault((kind, number), []).append(i)
  return groups


def _reduce_groups(
    xs: Sequence[jax.Array],
    red: Sequence[Reduce],
    axes: list[AxisName],
    dtype: DTypeLike,
    groups: dict[Any, list[int]],
    rows_fn: Callable[[jax.Array, np.ndarray], jax.Array],
    alone_fn: Callable[[int, np.ndarray], jax.Array],
) -> jax.Array:
  """A value per unit, as one flat vector in the order of `flat_norms`.

  The members of a group are reduced by ``rows_fn(block, idx)``, ``block``
  their `_unit_block`s concatenated, (A, R, B) or (A, R), which gives a vector
  of the values of its units in order; an array alone by ``alone_fn(i, idx)``,
  a vector of a value per unit. ``idx`` is where those units are in the flat
  vector. Each part is psum-reduced over its arrays' mapped axes.
  """
  starts = _unit_starts(xs, red)
  parts, part_axes, order = [], [], []
  for (kind, _), members in groups.items():
    idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
    if idx.size == 0:  # arrays with no units (an AGC leaf of shape (3, 0))
      continue
    if kind == "alone":
      parts.append(alone_fn(members[0], idx))
    else:
      parts.append(rows_fn(concat([_unit_block(xs[i], red[i], dtype) for i in members], 0), idx))
    part_axes.append(axes[members[0]])
    order.append(idx)
  if not parts:
    return jnp.zeros((0,), dtype)
  parts = psum_grouped(parts, part_axes)
  flat = concat(parts, 0) if len(parts) > 1 else parts[0]
  back = _unit_order(np.concatenate(order))
  return flat if back is None else flat[back]


def _rescue_needed(
    s0: jax.Array,
    p: float,
    dtype: DTypeLike,
    floor: jax.typing.ArrayLike | None,
    reported: int | None,
) -> jax.Array:
  """Whether some unit's plain sum `s0` cannot give a norm good enough for its use.

  A unit whose sum is below `_tiny` (zero included) lost at most 2^lo (the
  smallest normal number) per entry to underflow, so its norm^p is below
  2^(lo + 62) for any unit of fewer than 2^60 entries: with a limit of at least
  `floor`, floor^p above that, it is not clipped whatever its exact norm. A NaN
  floor (a NaN hyperparameter) fails the comparison: the branch runs.
  """
  low = _needs_rescale(s0, dtype)
  if floor is None:
    return jnp.any(low)
  lo, _ = _exp_range(dtype)
  negligible = _power(jnp.asarray(floor, dtype), p) >= 2.0 ** (lo + 62)
  total = jnp.sum(s0[:reported])  # what the clipper reports: its own underflow check
  return jnp.any(~jnp.isfinite(s0) | (low & ~negligible)) | ~(total >= _tiny(dtype))


def _rescued_norms(
    xs: Sequence[jax.Array],
    s0: jax.Array,
    p: float,
    dtype: DTypeLike,
    axes: list[AxisName],
    red: Sequence[Reduce],
) -> Split:
  """The rarely taken branch: every unit reduced again, at the scale it needs.

  A unit whose plain sum overflowed (or is inf/NaN) is reduced at 2^-k and gets
  exponent k; one whose sum is tiny or zero (an underflowed unit cannot be told
  from a zero one) at 2^k, exponent -k; the others at 1, exponent 0. (Two
  reductions, s_hi and s_lo, would double what XLA has to compile.)

  Units of one kind are reduced together, as one block that concatenates their
  arrays (see `_row_groups`; arrays reduced over axes that are not adjacent
  are transposed to rows): a reduction per leaf here cost as much compile time
  as the rest of a clipper (CPU, 1000 leaves of 768 entries:
  clip_by_global_norm 9.1 s, 4.3 s this way). The copy is made only when the
  branch runs, of arrays of at most _GROUP_LEAF_ELEMENTS entries; larger ones
  (the blocks `_packed` made, on CPU) are reduced alone.
  """
  k = _shift(p, dtype)
  down, up = _scales(p, dtype)
  tiny = _tiny(dtype)

  def reduce_scaled(x: jax.Array, s: jax.Array, axis: Reduce) -> jax.Array:
    y = x * jnp.where(~jnp.isfinite(s), down, jnp.where(s < tiny, up, jnp.ones_like(s)))
    # No value this branch uses changes: entries of a unit kept at scale 1 have
    # a finite |x|^p.
    return jnp.sum(_power(_clamp_finite(y, p, dtype), p), axis=axis, keepdims=True)

  def rows_sum(block: jax.Array, idx: np.ndarray) -> jax.Array:
    s = _reshaped(_take(s0, idx, 0), reduced_shape(block.shape, 1, True))
    return _reshaped(reduce_scaled(block, s, 1), idx.shape)

  def alone_sum(i: int, idx: np.ndarray) -> jax.Array:
    s = lax.reshape(
        lax.slice_in_dim(s0, int(idx[0]), int(idx[-1]) + 1),
        reduced_shape(xs[i].shape, red[i], True),
    )
    return jnp.reshape(_axes.replicated(reduce_scaled(xs[i].astype(dtype), s, red[i])), (-1,))

  groups = _row_groups(xs, red, axes, _GROUP_LEAF_ELEMENTS)
  sc = _reduce_groups(xs, red, axes, dtype, groups, rows_sum, alone_sum)
  exponent = jnp.where(~jnp.isfinite(s0), k, jnp.where(s0 < tiny, -k, 0)).astype(jnp.int32)
  return Split(_safe_root(sc, p), exponent)


# The rescue branch groups leaves of at most _GROUP_LEAF_ELEMENTS entries, into
# matrices of at most _GROUP_ELEMENTS (64 MiB in float32).
_GROUP_LEAF_ELEMENTS = 2**16
_GROUP_ELEMENTS = 2**24


def _block_shape(shape: tuple[int, ...], r: Reduce) -> tuple[int, int, int] | None:
  """(A, R, B) when reducing an array of `shape` over `r` is reducing its
  reshape to (A, R, B) over the middle axis (the reduced axes are adjacent),
  else None (the units' entries are interleaved: only a transposing copy
  makes them rows).

  Units are then numbered as ``reduced_shape(shape, r, True)`` flattened:
  (a, b) is unit a * B + b.
  """
  red_axes = _reduced_axes(len(shape), r)
  if not red_axes:
    return math.prod(shape), 1, 1
  lo, hi = red_axes[0], red_axes[-1] + 1
  if red_axes != list(range(lo, hi)):
    return None
  return math.prod(shape[:lo]), math.prod(shape[lo:hi]), math.prod(shape[hi:])


def _unit_block(x: jax.Array, r: Reduce, dtype: DTypeLike) -> jax.Array:
  """x as an (A, R, B) array of `dtype` whose units are its [a, :, b] (see
  `_block_shape`); as (A, R) where B is 1.

  Where the reduced axes are not adjacent, x is transposed to (units, R).
  (Rows stay a matrix: their reduction compiles as it did before blocks.)
  """
  block = _block_shape(x.shape, r)
  if block is None:
    red_axes = _reduced_axes(x.ndim, r)
    kept = [a for a in range(x.ndim) if a not in red_axes]
    x = jnp.transpose(x, kept + red_axes)
    block = (math.prod(x.shape[: len(kept)]), math.prod(x.shape[len(kept) :]), 1)
  return _reshaped(_cast(x, dtype), block if block[2] != 1 else block[:2])


def _max_normalized(
    xs: Sequence[jax.Array], p: float, dtype: DTypeLike, axes: list[AxisName], red: Sequence[Reduce]
) -> Split:
  """Unit norms as M * (sum (|x| / M)^p)^(1/p), M the unit's max-abs.

  M = m 2^e (m in [0.5, 1)) divides as a power of two (exact) and a factor in
  (1, 2], so no reciprocal leaves the float range, and the largest term is 1:
  (1/2)^p would underflow for p > 126.
  """
  maxima = psum_grouped(
      [_abs_max(x, dtype, axis=r, keepdims=True) for x, r in zip(xs, red)], axes, lax.pmax
  )
  parts, mants, exps = [], [], []
  for x, r, mx in zip(xs, red, maxima):
    m, e = jnp.frexp(lax.stop_gradient(mx))
    m = jnp.where(m > 0, m, 1)  # an all-zero unit: any scale gives 0
    parts.append(jnp.sum(_power(ldexp(x.astype(dtype), -e) / m, p), axis=r, keepdims=True))
    mants.append(m)
    exps.append(e)
  s = flatten(psum_grouped(parts, axes), 1)[0]
  m = flatten(mants, 1)[0]
  e = flatten(exps, 1)[0].astype(jnp.int32)
  return Split(_safe_root(s, p) * m, e)


# ----------------------------------------------------------------- combination


def normalize(n: Split) -> Split:
  """The same norms with r in [0.5, 1) (0 for zero, with a tiny exponent; inf/NaN kept)."""
  _, f = jnp.frexp(lax.stop_gradient(n.r))
  r = ldexp(n.r, -f)  # exact; differentiable in n.r
  finite = jnp.isfinite(n.r)
  # inf/NaN take the top exponent, so that they dominate any combination.
  e = jnp.where(n.r == 0, _ZERO_EXP, jnp.where(finite, n.e + f, -_ZERO_EXP)).astype(jnp.int32)
  return Split(jnp.where(finite, r, n.r), e)


def combine(n: Split, p: float) -> Split:
  """The p-norm of a vector of split norms (the global norm of their units)."""
  if n.r.size == 0:
    return Split(jnp.zeros([], n.r.dtype), jnp.zeros([], jnp.int32))
  # The largest norm's exponent, r in [0.5, 1) (zero norms: a tiny exponent,
  # inf/NaN: the top one, so that they dominate).
  _, f = jnp.frexp(lax.stop_gradient(n.r))
  finite = jnp.isfinite(n.r)
  top = jnp.max(jnp.where(n.r == 0, _ZERO_EXP, jnp.where(finite, n.e + f, -_ZERO_EXP)))
  # Each term at most 1 (the largest in [0.5, 1)): no overflow whatever the
  # magnitudes. ldexp is exact but for terms below the normal range, which are
  # negligible beside the largest. (Fewer operations than normalising each norm
  # first: XLA's CPU backend compiles each fusion of them at ~12 ms.)
  terms = jnp.where(finite, ldexp(n.r, n.e - top), n.r)
  if math.isinf(p):
    r = jnp.max(terms)
  elif p in (1.0, 2.0):
    # The largest term's p-th power is at least 1/4: none underflows that matters.
    r = _safe_root(jnp.sum(_power(terms, p)), p)
  else:
    # Relative to the largest, so that the largest term is 1: (1/2)^p underflows.
    big = jnp.max(terms)
    safe = jnp.where((big > 0) & jnp.isfinite(big), big, 1)
    r = _safe_root(jnp.sum(_power(terms / safe, p)), p) * safe
  return Split(r, jnp.where(top == _ZERO_EXP, 0, top).astype(jnp.int32))


def psum_norms(norms: list[Split], axes: list[AxisName]) -> list[Split]:
  """Each L2 norm combined over the devices of its mapped axes (None: kept as it is).

  For values that each device computed over its own part (a leaf split along
  a kept axis): relative to the largest exponent across the devices, so that
  no magnitude overflows.
  """
  exps = []
  for n in norms:
    _, f = jnp.frexp(lax.stop_gradient(n.r))
    finite = jnp.isfinite(n.r)
    exps.append(jnp.where(n.r == 0, _ZERO_EXP, jnp.where(finite, n.e + f, -_ZERO_EXP)))
  tops = psum_grouped(exps, axes, lax.pmax)
  terms = [jnp.where(jnp.isfinite(n.r), ldexp(n.r, n.e - t), n.r) for n, t in zip(norms, tops)]
  sums = psum_grouped([jnp.square(t) for t in terms], axes)
  return [
      n
      if a is None
      else Split(_safe_root(s, 2.0), jnp.where(t == _ZERO_EXP, 0, t).astype(jnp.int32))
      for n, a, s, t in zip(norms, axes, sums, tops)
  ]


def tree_norms(
    leaves: Sequence[jax.Array],
    p: float,
    dtype: DTypeLike,
    axis_name: AxesArg,
    forms: Forms,
    blocks: Blocks | None = None,
) -> Split:
  """The global p-norm of `leaves` as a scalar Split (see `flat_norms`, and its `blocks`)."""
  leaves = list(leaves)
  dtype = accumulation_dtype(dtype, leaves)
  if not leaves:
    return Split(jnp.zeros([], dtype), jnp.zeros([], jnp.int32))
  # No unit's own norm is compared with anything: an infinite floor, so the
  # rescue branch runs only when the total is out of range. (A zero leaf, the
  # gradient of a frozen or unused parameter, took it on every step: clip + Adam
  # 1.6x slower, CPU, 8M parameters in 64 leaves, one of them zero.)
  units = flat_norms(
      leaves, p, dtype, axis_name, [None] * len(leaves), forms, floor=jnp.inf, blocks=blocks
  )
  return combine(units, p)


def tree_global_norm(
    tree: PyTree,
    who: str,
    axis_name: AxisSpec = None,
    p: float = 2.0,
    dtype: DTypeLike = jnp.float32,
    *,
    forms: Forms,
) -> tuple[list[jax.Array], Any, Split]:
  """Checks `tree`'s leaves; returns (leaves, treedef, their global p-norm as a Split)."""
  _validate.check_gradient_leaves(tree, who)
  leaves, treedef = jax.tree.flatten(tree)
  axes = _axes.leaf_axes(axis_name, tree, who)
  return leaves, treedef, tree_norms(leaves, p, dtype, axes, forms)


def clip_factors(
    threshold: jax.typing.ArrayLike,
    norm: Split,
    forms: Forms,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(f1, f2, clipped): scaling by f1 then f2 equals min(1, threshold / norm), never flushed.

  `threshold` broadcasts against the norms. f2 is a power of two at most 1 and
  f1 = (t / m) 2^d1 with t/m in (0.5, 2): each is a normal number wherever the
  product is representable as two such factors (down to 2^-220 in float32),
  where the plain quotient would be a subnormal that XLA flushes to zero
  (``1 / 1e38``). An inf norm gives 0 (finite entries become 0 and inf ones
  NaN, as in optax and PyTorch); a NaN norm or a NaN threshold gives NaN.
  """
  if norm.r.ndim == 0:
    return _clip_factors(threshold, norm)

  # Vectors of factors (one per leaf or unit) are sliced by every leaf's scaling
  # loop, and XLA fuses the whole chain behind a slice into each: on CPU, a
  # conditional's outputs are materialised instead (compile time of 2000
  # leaves: 2x lower), and it is skipped when nothing is clipped.
  def factors(operands: tuple[jax.typing.ArrayLike, Split]) -> tuple[jax.Array, ...]:
    return _clip_factors(*operands)

  def unclipped(operands: tuple[jax.typing.ArrayLike, Split]) -> tuple[jax.Array, ...]:
    # Typed as `factors`' outputs: sharded as the norms (ones_like), and inside
    # shard_map varying where a threshold or norm does.
    ones = jnp.ones_like(norm.r)
    return _axes.cast_like((ones, ones, jnp.zeros_like(norm.r, jnp.bool_)), operands)

  return _dispatch(
      forms,
      lambda: lax.cond(
          jnp.any(_clipped(threshold, norm) | jnp.isnan(threshold) | jnp.isnan(norm.r)),
          factors,
          unclipped,
          (threshold, norm),
      ),
      lambda: factors((threshold, norm)),
  )


def _normalized(threshold: jax.typing.ArrayLike, norm: Split) -> tuple[Split, Split]:
  t = normalize(Split(jnp.asarray(threshold, norm.r.dtype), jnp.zeros([], jnp.int32)))
  return t, normalize(norm)


def _exceeds(n: Split, t: Split) -> jax.Array:
  """norm > threshold, both normalized; an inf threshold never clips."""
  above = jnp.isinf(n.r) | (n.e > t.e) | ((n.e == t.e) & (n.r > t.r))
  return above & jnp.isfinite(t.r)


def _clipped(threshold: jax.typing.ArrayLike, norm: Split) -> jax.Array:
  t, n = _normalized(threshold, norm)
  return _exceeds(n, t)


def _clip_factors(
    threshold: jax.typing.ArrayLike,
    norm: Split,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  dtype = norm.r.dtype
  t, n = _normalized(threshold, norm)
  inf = jnp.isinf(n.r)
  clipped = _exceeds(n, t)
  lo, _ = _exp_range(dtype)
  d = jnp.where(clipped & ~inf, t.e - n.e, 0)
  d1 = jnp.maximum(d, lo + 26)
  safe_m = jnp.where(clipped & ~inf, n.r, 1)
  f1 = jnp.where(clipped, jnp.where(inf, 0, ldexp(t.r / safe_m, d1)), 1)
  f2 = jnp.where(clipped, pow2(d - d1, dtype), 1)
  # A NaN threshold, or a NaN norm (NaN gradients), makes the factor NaN: the
  # whole update (the leaf's or unit's, for per-leaf clippers) becomes NaN, as in
  # optax and PyTorch, instead of passing the finite entries unscaled.
  nan = jnp.isnan(jnp.asarray(threshold, dtype)) | jnp.isnan(n.r)
  f1 = jnp.where(nan, jnp.nan, f1).astype(dtype)
  return computed_once(f1), computed_once(f2), clipped


def computed_once(x: jax.Array) -> jax.Array:
  """x, divided by an opaque 1 so that its producers are computed once.

  XLA duplicates cheap scalar operations into every consumer's fused loop: the
  few dozen behind a clip factor, copied into the scaling loop of each of 2000
  leaves, doubled the compile time (and would be recomputed per element). A
  division is not duplicated, so the chain ends in one.
  """
  return x / lax.optimization_barrier(jnp.ones([], x.dtype))


def _public_norm_args(
    p: Ord, dtype: DTypeLike, axis_name: AxisSpec, implementation: Any, who: str
) -> tuple[float, jnp.dtype, Implementation]:
  """Validates the arguments of `global_norm` and `leaf_norms`."""
  _validate.axis_name(axis_name)
  return (
      _validate.norm_ord(p, "p"),
      _validate.norm_dtype(dtype, "dtype"),
      _validate.implementation(implementation, who),
  )


def global_norm(
    tree: PyTree,
    p: Ord = 2.0,
    dtype: DTypeLike = jnp.float32,
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> jax.Array:
  """Overflow-safe global p-norm of a pytree (float32 accumulation by default).

  Exact over the whole float range for every p >= 1: the result is inf only
  when the norm itself exceeds the accumulation dtype's range.

  Args:
    tree: a pytree of floating-point arrays.
    p: the norm's order, any p >= 1 or inf.
    dtype: accumulation dtype (float32, or float64 under x64; float64 leaves
      are accumulated in float64 in any case).
    axis_name: as in :func:`clipjax.clip_by_global_norm`: inside
      ``shard_map``, the mapped axes the leaves are sharded over (or a function
      of the tree giving them per leaf, None for replicated leaves).
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Raises:
    ValueError: `p` below 1 or not a number; TypeError for non-float leaves.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> norm = clipjax.global_norm({'a': jnp.array([3e20]), 'b': jnp.array([4e20])})
    >>> round(float(norm) / 1e20, 6)  # optax.tree.norm: inf
    5.0
    >>> float(clipjax.global_norm({'a': jnp.array([3.0, 4.0])}, p=200))
    4.0
  """
  p, dtype, impl = _public_norm_args(p, dtype, axis_name, implementation, "global_norm")
  forms = _forms.for_trace(impl)
  return tree_global_norm(tree, "global_norm", axis_name, p, dtype, forms=forms)[2].value()


def leaf_norms(
    tree: PyTree,
    p: Ord = 2.0,
    dtype: DTypeLike = jnp.float32,
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> PyTree:
  """Overflow-safe p-norm of each leaf of a pytree, as a pytree of scalars.

  The per-leaf counterpart of :func:`global_norm`, with the same guarantees
  and arguments: exact over the whole float range for every p >= 1 (inf only
  where a leaf's norm exceeds the accumulation dtype's range), all leaves
  reduced together (one branch on CPU, not one per leaf).

  Args:
    tree: a pytree of floating-point arrays.
    p: the norm's order, any p >= 1 or inf.
    dtype: accumulation dtype (float32, or float64 under x64; float64 leaves
      are accumulated in float64 in any case).
    axis_name: as in :func:`global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A pytree with the structure of `tree` whose leaves are the norms, scalars
    of the accumulation dtype.

  Raises:
    ValueError: `p` below 1 or not a number; TypeError for non-float leaves.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> norms = clipjax.leaf_norms({'a': jnp.array([3e20, 4e20]), 'b': jnp.array([1.0])})
    >>> round(float(norms['a']) / 1e20, 6), float(norms['b'])  # jnp.linalg.norm: inf, 1.0
    (5.0, 1.0)
  """
  p, dtype, impl = _public_norm_args(p, dtype, axis_name, implementation, "leaf_norms")
  _validate.check_gradient_leaves(tree, "leaf_norms")
  leaves, treedef = jax.tree.flatten(tree)
  norms = flat_norms(
      leaves,
      p,
      dtype,
      _axes.leaf_axes(axis_name, tree, "leaf_norms"),
      [None] * len(leaves),
      _forms.for_trace(impl),
  ).value()
  return jax.tree.unflatten(treedef, list(norms))
