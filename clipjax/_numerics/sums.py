"""Unit power sums: the norm of every unit of every leaf, exact over the whole float range.

**p = 1 and 2.** Each leaf is upcast to the accumulation dtype (float32 by
default, float64 for float64 leaves) inside the reduction, so fp16/bf16
gradients never overflow while raised to the power p. The accumulation dtype
itself overflows for |g|^p above its range and underflows below it. Two
forms (`Forms.norms`) give the same norms:

- ``'cond'`` (the default on every backend): the plain sum s_0 per unit, and
  only when some unit's s_0 is non-finite or tiny (zero included: an
  underflowed unit cannot be told from a zero one) does one ``lax.cond`` (for
  all leaves together) reduce each unit once more at the scale it needs
  (:func:`_rescued_norms`). The branch is taken on psum-reduced values, so all
  shards agree.
- ``'multiscale'``: every unit reduced at three power-of-two scales in the
  same pass, ``s_0 = sum |g|^p``, ``s_hi = sum |g 2^-k|^p``,
  ``s_lo = sum |g 2^k|^p``; the unit's norm is ``(s_0^(1/p), 0)`` when s_0 is
  finite and not tiny, else ``(s_hi^(1/p), k)`` or ``(s_lo^(1/p), -k)``. No
  branch, but more kernels on a GPU (a second-stage reduction per sum).

**Any other p.** |g|^p has too wide a range for any fixed set of scales
(``ord=200`` on [3, 4] overflows at every float32 scale), so for p not in
{1, 2, inf} each unit is reduced as ``M * (sum (|g| / M)^p)^(1/p)``, M its
max-abs rounded to a power of two: every term is at most 1, exact over the
whole float range, at the cost of a second read of the gradients.

All leaves (and AGC's unit norms of gradients and parameters) go through
:func:`flat_norms` with one branch. How the sums are laid out for XLA (packed
blocks of small leaves, groups for the rescue) is `clipjax._shaping`'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _axes
from clipjax._forms import Forms
from clipjax._numerics.split import (
    Split,
    _clamp_finite,
    _exp_range,
    _needs_rescale,
    _power,
    _safe_root,
    _scales,
    _shift,
    _split_from_sums,
    _tiny,
    combine,
    ldexp,
)
from clipjax._shaping.arrays import (
    Reduce,
    as_rows,
    cast,
    flatten,
    leading_sum,
    reduced_shape,
    reshaped,
    take,
)
from clipjax._shaping.packing import (
    GROUP_LEAF_ELEMENTS,
    JOIN_ELEMENTS,
    Blocks,
    join_groups,
    packed,
    reduce_groups,
    row_groups,
)
from clipjax._types import AxisName, DTypeLike

# A list of per-array axes (None: replicated), or one for all.
AxesArg = AxisName | list[AxisName]


def accumulation_dtype(norm_dtype: DTypeLike, leaves: Sequence[jax.Array]) -> jnp.dtype:
  """`norm_dtype`, widened to float64 when a leaf is float64 (its range needs it)."""
  return functools.reduce(
      jnp.promote_types, [jnp.dtype(x.dtype) for x in leaves], jnp.dtype(norm_dtype)
  )


def _per_leaf(axis_name: AxesArg, n: int) -> list[AxisName]:
  return list(axis_name) if isinstance(axis_name, list) else [axis_name] * n


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


def _plain_sum(
    x: jax.Array, p: float, dtype: DTypeLike, axis: Reduce = None, keepdims: bool = False
) -> jax.Array:
  return jnp.sum(_power(cast(x, dtype), p), axis=axis, keepdims=keepdims)


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
        _axes.psum_grouped(
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
  if forms.norms == "multiscale":
    return _multiscale_norms(xs, p, dtype, axes, red)
  if wide(p, dtype, forms):
    return _wide_norms(xs, p, dtype, axes, red, forms)
  return _cond_norms(xs, p, dtype, axes, red, forms, floor, reported, blocks)


def _wide_sums(
    xs: Sequence[jax.Array],
    p: float,
    axes: list[AxisName],
    red: Sequence[Reduce],
    forms: Forms,
) -> list[jax.Array]:
  """Each array's sums of |x|^p over `red`, accumulated in float64 (see `_wide_norms`).

  To be called with 64-bit types on.
  """

  def term(y: jax.Array) -> jax.Array:
    return _power(lax.convert_element_type(y, np.float64), p)

  sums = [leading_sum(x, r, term, forms.folded_columns) for x, r in zip(xs, red)]
  return _axes.psum_grouped(sums, axes)


def _wide_split(s: jax.Array, p: float, dtype: DTypeLike) -> Split:
  """Float64 power sums as split norms of `dtype`.

  A norm from `_wide_sums` lies in [2^-149, 2^178] (or is 0, inf or NaN);
  one outside [2^-100, 2^100] is carried as r 2^(+-200), r then a normal
  number of float32 or bfloat16. (float16's range is narrower, but its
  leaves are accumulated in float32 like the others.) Two comparisons and a
  product: the scalar work that follows a GPU's reductions stays in one kernel.
  """
  norm = _safe_root(s, p)
  big, small = norm > 2.0**100, norm < 2.0**-100
  scale = jnp.where(big, 2.0**-200, jnp.where(small, 2.0**200, 1.0))
  e = jnp.where(big, 200, jnp.where(small, -200, 0)).astype(jnp.int32)
  return Split(lax.convert_element_type(norm * lax.stop_gradient(scale), jnp.dtype(dtype)), e)


def value_stats(
    xs: Sequence[jax.Array], bounds: Sequence[jax.Array], axes: AxesArg
) -> tuple[Split, jax.Array, jax.Array]:
  """clip_by_value's statistics, float64-accumulated: (the L2 norm of `xs`, whether an
  entry of x_i exceeds bounds[i], the post-clip norm / the norm).

  Each array is read as rows (`as_rows`; a small one as one row), each
  reduced to three partial sums (of the
  squares, of the entries over their bound, of the clipped squares): XLA's GPU
  backend computes them in the loop that reads the array for the optimizer.
  The partials of all arrays, behind a barrier (else XLA folds them back into
  reductions per array, a kernel each), are summed together.
  """
  axes = _per_leaf(axes, len(xs))
  with jax.enable_x64(True):

    def terms(x: jax.Array, b: jax.Array) -> list[jax.Array]:
      """x^2, [|x| > b], clip(x)^2, in float64."""
      wide = x.astype(np.float64)
      clipped = jnp.clip(x, -b, b).astype(np.float64)
      return [wide * wide, (jnp.abs(x) > b).astype(np.float64), clipped * clipped]

    def partials(x: jax.Array, b: jax.Array) -> list[jax.Array]:
      """The three sums of x's rows (a small array as one row, reduced in the loop
      that reads it too; one split by its type whole, as reshaping it would move
      its shards)."""
      if _axes.is_sharded(x):
        return [jnp.reshape(jnp.sum(t), (1,)) for t in terms(x, b)]
      rows = as_rows(x) if x.size > JOIN_ELEMENTS else jnp.reshape(x, (1, -1))
      return [jnp.sum(t, axis=1) for t in terms(rows, b)]

    each = [partials(x, b) for x, b in zip(xs, bounds)]
    # (Counts, not maxima, of the entries over their bound: three sums, one reduction.)
    kinds = [_axes.psum_grouped([p[j] for p in each], axes) for j in range(3)]
    # (One concatenation, not `flatten`'s bounded ones: their inner barriers
    # cost GPT-2 small's 444 partials 2 kernels and 0.002 of a read.)
    joined = lax.optimization_barrier(
        jnp.concatenate(_axes.same_sharding([p for kind in kinds for p in kind]))
    )
    total, over, post = jnp.sum(jnp.reshape(joined, (3, -1)), axis=1)
    ratio = jnp.sqrt(post) / jnp.where(total > 0, jnp.sqrt(total), 1.0)
    # (A NaN entry is over no bound, and clips nothing: NaN data are a
    # non-finite step, not a clipped one.)
    return (
        _wide_split(total, 2.0, jnp.float32),
        (over > 0) & ~jnp.isnan(total),
        lax.convert_element_type(ratio, np.float32),
    )


def wide(p: float, dtype: DTypeLike, forms: Forms) -> bool:
  """Whether p-norms accumulated in `dtype` are the ``'wide'`` form's under `forms`."""
  return p in (1.0, 2.0) and forms.norms == "wide" and jnp.dtype(dtype).itemsize < 8


def _wide_norms(
    xs: Sequence[jax.Array],
    p: float,
    dtype: DTypeLike,
    axes: list[AxisName],
    red: Sequence[Reduce],
    forms: Forms,
) -> Split:
  """Unit norms from sums accumulated in float64: one read, no branch.

  Any finite float32 (or narrower) entry has |g|^p, p in {1, 2}, between
  2^-298 and 2^256, and a sum of fewer than 2^50 of them stays below 2^306:
  inside float64's normal range, so no sum overflows and none loses an entry
  to underflow. Only the powers and the sums are float64; each norm returns to
  `dtype` in the split form, so a norm beyond `dtype`'s range or below its
  normal numbers is still exact.
  """
  # Traced with 64-bit types on, whatever the user's setting: only these
  # intermediates are float64.
  with jax.enable_x64(True):
    return _wide_split(flatten(_wide_sums(xs, p, axes, red, forms), 1)[0], p, dtype)


def unitwise_clip(
    gs: Sequence[jax.Array],
    ws: Sequence[jax.Array],
    lam: jax.Array,
    eps: jax.Array,
    axis_name: AxesArg,
    red: Sequence[Reduce],
    forms: Forms,
) -> tuple[list[jax.Array], Split, jax.Array, jax.Array]:
  """Adaptive gradient clipping with the ``'wide'`` norms: each unit of g_i scaled by
  min(1, lam max(|w_i|, eps) / |g_i|), its norms over `red`.

  Returns (the scaled arrays, the L2 norm of every g together, the least
  scale, whether a unit was clipped). The norms, limits and factors are
  float64 (finite g and w: no value leaves its range, no factor flushes to
  zero), and each array is scaled in float64 and rounded once, in the loop
  that reads its own two reductions: no vector of every unit's factor is
  concatenated and cut again (on a GPU each cut is a kernel). Only the
  statistics join the units of every array. An inf norm gives 0 (finite
  entries become 0, inf ones NaN), a NaN norm or limit NaN, as `clip_factors`.
  """
  dtype = accumulation_dtype(jnp.float32, list(gs) + list(ws))
  if not wide(2.0, dtype, forms):
    raise ValueError(f"unitwise_clip: the 'wide' norms only ({forms.name} forms)")
  n = len(gs)
  axes = _per_leaf(axis_name, n)
  with jax.enable_x64(True):
    sums = _wide_sums(list(gs) + list(ws), 2.0, axes + axes, list(red) * 2, forms)
    lam64, eps64 = (lax.convert_element_type(v, np.float64) for v in (lam, eps))

    def factor(g_sum: jax.Array, w_sum: jax.Array) -> tuple[jax.Array, jax.Array]:
      g_norm = jnp.sqrt(g_sum)
      limit = lam64 * jnp.maximum(jnp.sqrt(w_sum), eps64)
      clipped = g_norm > limit
      f = jnp.where(clipped, limit / jnp.where(clipped, g_norm, 1.0), 1.0)
      return jnp.where(jnp.isnan(g_norm) | jnp.isnan(limit), jnp.nan, f), clipped

    new = [
        lax.convert_element_type(g.astype(np.float64) * factor(g_sum, w_sum)[0], g.dtype)
        for g, g_sum, w_sum in zip(gs, sums[:n], sums[n:])
    ]
    # The statistics from every unit's sums, joined behind a barrier: each
    # array's factors then have one reader (its scaling loop, where XLA computes
    # them), and XLA cannot turn the total back into a second reduction of each
    # gradient.
    g_sums, w_sums = flatten(sums[:n], 1)[0], flatten(sums[n:], 1)[0]
    factors, clipped = factor(g_sums, w_sums)
    return (
        new,
        _wide_split(jnp.sum(g_sums), 2.0, dtype),
        lax.convert_element_type(jnp.min(factors, initial=1.0), np.float32),
        jnp.any(clipped),
    )


def tree_norms(
    leaves: Sequence[jax.Array],
    p: float,
    dtype: DTypeLike,
    axis_name: AxesArg,
    forms: Forms,
    blocks: Blocks | None = None,
) -> Split:
  """The global p-norm of `leaves` (all their entries together), as a scalar Split.

  See `flat_norms` for the arguments and its `blocks`.
  """
  xs = list(leaves)
  dtype = accumulation_dtype(dtype, xs)
  if not xs:
    return Split(jnp.zeros([], dtype), jnp.zeros([], jnp.int32))
  if wide(p, dtype, forms):
    # The float64 sums add up without loss of range: one sum, no combination
    # of split norms (which took 5 kernels of its own on a GPU).
    axes = _per_leaf(axis_name, len(xs))
    with jax.enable_x64(True):
      groups, alone = join_groups(xs, axes)
      parts = [jnp.concatenate([jnp.reshape(xs[i], (-1,)) for i in g]) for _, g in groups]
      part_axes = [a for a, _ in groups]
      parts, part_axes = parts + [xs[i] for i in alone], part_axes + [axes[i] for i in alone]
      sums = _wide_sums(parts, p, part_axes, [None] * len(parts), forms)
      return _wide_split(functools.reduce(jnp.add, [jnp.reshape(s, ()) for s in sums]), p, dtype)
  # No unit's own norm is compared with anything: an infinite floor, so the
  # rescue branch runs only when the total is out of range. (A zero leaf, the
  # gradient of a frozen or unused parameter, took it on every step: clip + Adam
  # 1.6x slower, CPU, 8M parameters in 64 leaves, one of them zero.)
  units = flat_norms(xs, p, dtype, axis_name, [None] * len(xs), forms, floor=jnp.inf, blocks=blocks)
  return combine(units, p)


def _multiscale_norms(
    xs: Sequence[jax.Array], p: float, dtype: DTypeLike, axes: list[AxisName], red: Sequence[Reduce]
) -> Split:
  """Unit norms from sums at three scales (one fused read on GPU/TPU), no branch."""
  scales = _scales(p, dtype)
  sums = _axes.psum_grouped(
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
  ys, red_y, axes_y, order = packed(xs, red, axes, dtype, forms, blocks)
  sums = [_plain_sum(y, p, dtype, r, True) for y, r in zip(ys, red_y)]
  sy = flatten(_axes.psum_grouped(sums, axes_y), 1)[0]
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


def _max_normalized(
    xs: Sequence[jax.Array], p: float, dtype: DTypeLike, axes: list[AxisName], red: Sequence[Reduce]
) -> Split:
  """Unit norms as M * (sum (|x| / M)^p)^(1/p), M the unit's max-abs.

  M = m 2^e (m in [0.5, 1)) divides as a power of two (exact) and a factor in
  (1, 2], so no reciprocal leaves the float range, and the largest term is 1:
  (1/2)^p would underflow for p > 126.
  """
  maxima = _axes.psum_grouped(
      [_abs_max(x, dtype, axis=r, keepdims=True) for x, r in zip(xs, red)], axes, lax.pmax
  )
  parts, mants, exps = [], [], []
  for x, r, mx in zip(xs, red, maxima):
    m, e = jnp.frexp(lax.stop_gradient(mx))
    m = jnp.where(m > 0, m, 1)  # an all-zero unit: any scale gives 0
    parts.append(jnp.sum(_power(ldexp(x.astype(dtype), -e) / m, p), axis=r, keepdims=True))
    mants.append(m)
    exps.append(e)
  s = flatten(_axes.psum_grouped(parts, axes), 1)[0]
  m = flatten(mants, 1)[0]
  e = flatten(exps, 1)[0].astype(jnp.int32)
  return Split(_safe_root(s, p) * m, e)


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
  arrays (see `row_groups`; arrays reduced over axes that are not adjacent
  are transposed to rows): a reduction per leaf here cost as much compile time
  as the rest of a clipper (CPU, 1000 leaves of 768 entries:
  clip_by_global_norm 9.1 s, 4.3 s this way). The copy is made only when the
  branch runs, of arrays of at most GROUP_LEAF_ELEMENTS entries; larger ones
  (the blocks `packed` made, on CPU) are reduced alone.
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
    s = reshaped(take(s0, idx, 0), reduced_shape(block.shape, 1, True))
    return reshaped(reduce_scaled(block, s, 1), idx.shape)

  def alone_sum(i: int, idx: np.ndarray) -> jax.Array:
    s = lax.reshape(
        lax.slice_in_dim(s0, int(idx[0]), int(idx[-1]) + 1),
        reduced_shape(xs[i].shape, red[i], True),
    )
    return jnp.reshape(_axes.replicated(reduce_scaled(xs[i].astype(dtype), s, red[i])), (-1,))

  groups = row_groups(xs, red, axes, GROUP_LEAF_ELEMENTS)
  sc = reduce_groups(xs, red, axes, dtype, groups, rows_sum, alone_sum)
  exponent = jnp.where(~jnp.isfinite(s0), k, jnp.where(s0 < tiny, -k, 0)).astype(jnp.int32)
  return Split(_safe_root(sc, p), exponent)
