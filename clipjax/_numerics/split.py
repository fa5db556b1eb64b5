"""The split form of a norm, its combination and the clip factors that never flush to zero.

A norm is carried as a pair ``(r, e)`` meaning ``r * 2**e`` (:class:`Split`),
with ``r`` finite whenever the data are: the norm of finite float32 gradients
can exceed float32's range (two entries of 3e38 have L2 norm 4.2e38), and its
reciprocal can fall below it (``1 / 1e38`` is a float32 subnormal, which XLA
flushes to zero). Clip factors are derived from the split form
(:func:`clip_factors`) as two numbers, a power of two and a factor near the
threshold, so every finite input is scaled to the right norm and direction.
:meth:`Split.value` gives the plain number (inf where it does not fit) for the
reported statistics. Unit norms are combined into a global norm in the split
form, relative to the largest (:func:`combine`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _axes
from clipjax._forms import Forms
from clipjax._shaping.arrays import computed_once
from clipjax._types import AxisName, DTypeLike

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


def _power(x: jax.Array, p: float) -> jax.Array:
  if p == 2:
    return jnp.square(x)
  if p == 1:
    return jnp.abs(x)
  return jnp.abs(x) ** p


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


def _exponents(n: Split) -> tuple[jax.Array, jax.Array]:
  """(e, f): each norm's exponent with r in [0.5, 1), and f, r's own exponent.

  A zero norm gets a tiny exponent (it never wins a max), inf/NaN the top one
  (they dominate any combination).
  """
  _, f = jnp.frexp(lax.stop_gradient(n.r))
  e = jnp.where(n.r == 0, _ZERO_EXP, jnp.where(jnp.isfinite(n.r), n.e + f, -_ZERO_EXP))
  return e, f


def normalize(n: Split) -> Split:
  """The same norms with r in [0.5, 1) (0 for zero, with a tiny exponent; inf/NaN kept)."""
  e, f = _exponents(n)
  r = ldexp(n.r, -f)  # exact; differentiable in n.r
  return Split(jnp.where(jnp.isfinite(n.r), r, n.r), e.astype(jnp.int32))


def combine(n: Split, p: float) -> Split:
  """The p-norm of a vector of split norms (the global norm of their units)."""
  if n.r.size == 0:
    return Split(jnp.zeros([], n.r.dtype), jnp.zeros([], jnp.int32))
  # The largest norm's exponent, r in [0.5, 1) (see `_exponents`).
  finite = jnp.isfinite(n.r)
  top = jnp.max(_exponents(n)[0])
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


def psum_norm(n: Split, axes: AxisName) -> Split:
  """The L2 norm `n`, each device's part of it, combined over the mapped `axes`.

  For a value each device computed over its own part (a leaf split along a
  kept axis): relative to the largest exponent across the devices, so that no
  magnitude overflows.
  """
  top = lax.pmax(_exponents(n)[0], axes)
  term = jnp.where(jnp.isfinite(n.r), ldexp(n.r, n.e - top), n.r)
  total = lax.psum(jnp.square(term), axes)
  return Split(_safe_root(total, 2.0), jnp.where(top == _ZERO_EXP, 0, top).astype(jnp.int32))


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

  if forms.norms == "multiscale" or not forms.factor_branch:
    return _clip_factors(threshold, norm)
  return lax.cond(
      jnp.any(_clipped(threshold, norm) | jnp.isnan(threshold) | jnp.isnan(norm.r)),
      factors,
      unclipped,
      (threshold, norm),
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
