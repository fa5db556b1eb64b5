"""Overflow-safe norms of gradient pytrees, in one read of the gradients.

Each leaf is upcast to the accumulation dtype (float32 by default) inside the
reduction, so fp16/bf16 gradients never overflow while they are raised to the
power p. float32 itself overflows for |g|^p above 3.4e38 (fp32 gradients of
1e20 when p = 2, where optax and PyTorch return an inf norm and zero the
update) and underflows below 1e-38 (gradients under ~1e-19). So every leaf is
reduced three times in the same pass, at three power-of-two scales:

    s_0 = sum |g|^p,   s_hi = sum |g 2^-k|^p,   s_lo = sum |g 2^k|^p

XLA fuses sibling reductions of one input into one kernel: the gradients are
read once, and the two extra sums cost a few flops per element of a
memory-bound loop. The norm comes from s_0 when it is finite and not tiny,
else from s_hi (overflow) or s_lo (underflow), rescaled by 2^(+-k). Scaling by
a power of two is exact, so the result equals the float32 norm of the scaled
data; there is no branch (no ``lax.cond``, whose predicate a GPU must copy to
the host) and no second read. Genuine inf/NaN gradients give an inf/NaN norm.

XLA's CPU backend does not fuse the three sibling reductions (measured: the
clip pass then costs 2.5x a plain one), so on CPU (the default backend at
trace time) the norm is the plain float32 sum s_0, and only when the total is
non-finite or tiny does one ``lax.cond`` (for all leaves together) reduce each
leaf once more, at 2^-k where its s_0 overflowed and 2^k where it is tiny: one
read in the common case there too. The branch is taken on the (psum-reduced)
total, so all shards agree.

All leaves (and AGC's unit norms of gradients and parameters) go through one
function with one branch, which keeps the program small: XLA's compile time
grows with the number of operations, and models have hundreds of leaves.

`p` may be any real >= 1 or inf (max-abs, which cannot overflow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from clipjax import _validate

AxisName = str | tuple[str, ...] | None
# One axis name for every leaf, or a function of the updates that returns a
# pytree (same structure) of per-leaf axis names; None marks a leaf replicated
# over the mapped axes (counted once, not once per shard).
AxisSpec = AxisName | Callable[[Any], Any]

# s_0 below this may have lost precision to underflow; use s_lo instead.
_TINY = 2.0**-100

# None: choose by platform (CPU: "cond", others: "multiscale"). Tests set it
# to check both implementations on any machine.
FORCE_IMPLEMENTATION: str | None = None


def _dispatch(cpu, multiscale, *args):
  if FORCE_IMPLEMENTATION == "cond":
    return cpu(*args)
  if FORCE_IMPLEMENTATION == "multiscale":
    return multiscale(*args)
  # Chosen by the default backend at trace time rather than with
  # lax.platform_dependent, which traces both implementations (doubling the
  # trace time of a many-leaf tree). Both are correct everywhere; only a
  # program lowered for a backend other than the default may get the slower one.
  return cpu(*args) if jax.default_backend() == "cpu" else multiscale(*args)


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x, axis_name: AxisName):
  return x if axis_name is None else lax.pmax(x, axis_name)


def leaf_axes(axis_name: AxisSpec, tree: Any, who: str) -> list[AxisName]:
  """Per-leaf mapped axes of `tree` (at trace time) from a clipper's `axis_name`."""
  treedef = jax.tree.structure(tree)
  if not callable(axis_name):
    return [axis_name or None] * treedef.num_leaves
  spec = axis_name(tree)
  try:
    axes = treedef.flatten_up_to(spec)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{who}: axis_name(updates) must return a pytree with the structure of the "
        f"updates ({treedef}), holding an axis name, a tuple of names or None per "
        f"leaf; got {spec!r}.") from e
  for a in axes:
    if not _validate.is_axis_name(a):
      raise ValueError(
          f"{who}: axis_name(updates) gave {a!r} for a leaf; each entry must be an "
          "axis name, a tuple of axis names or None (replicated).")
  return [a or None for a in axes]


def _per_leaf(axis_name, n: int) -> list[AxisName]:
  return list(axis_name) if isinstance(axis_name, list) else [axis_name] * n


def _psum_grouped(values: list[jax.Array], axes: list[AxisName]) -> list[jax.Array]:
  """values[i] psum-reduced over axes[i]: one psum per distinct axis spec.

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
      for i, r in zip(idx, lax.psum([values[i] for i in idx], a)):
        out[i] = r
  return out


def _shift(p: float) -> int:
  """k such that 2^(k p) spans fp32's overflow/underflow margin; 2^k stays representable."""
  return min(100, max(1, round(160 / p)))


def _abs_max(x, dtype, axis=None, keepdims=False):
  # `initial` makes zero-size leaves well defined (norm 0).
  return jnp.max(jnp.abs(x.astype(dtype)), axis=axis, keepdims=keepdims, initial=0)


def _power(x, p: float):
  if p == 2:
    return jnp.square(x)
  if p == 1:
    return jnp.abs(x)
  return jnp.abs(x) ** p


def _scales(p: float, dtype):
  """(2^-k, 2^k) as opaque scalars.

  Behind an optimization barrier XLA cannot reassociate square(x * 2^-k) into
  square(x) * 2^-2k (seen on CPU for size-1 reductions: inf * 0 = NaN).
  """
  k = _shift(p)
  return lax.optimization_barrier((jnp.asarray(2.0**-k, dtype), jnp.asarray(2.0**k, dtype)))


def _plain_sum(x, p: float, dtype, axis=None, keepdims=False):
  return jnp.sum(_power(x.astype(dtype), p), axis=axis, keepdims=keepdims)


def _power_sums(x, p: float, dtype, axis=None, keepdims=False, scales=None):
  """(s_0, s_hi, s_lo): sums of |x|^p at scales 1, 2^-k and 2^k, one fused pass.

  `scales` is `_scales(p, dtype)`, made here when not given (pass it to share
  one barrier among many leaves).
  """
  x = x.astype(dtype)
  down, up_scale = _scales(p, dtype) if scales is None else scales
  s0 = _plain_sum(x, p, dtype, axis, keepdims)
  s_hi = jnp.sum(_power(x * down, p), axis=axis, keepdims=keepdims)
  # Clamped so that entries which overflow here (s_lo is then unused) give zero,
  # not NaN, derivatives.
  up = jnp.clip(x * up_scale, -(2.0**60), 2.0**60)
  s_lo = jnp.sum(_power(up, p), axis=axis, keepdims=keepdims)
  return s0, s_hi, s_lo


def _flatten(parts: list[jax.Array], lead: int) -> jax.Array:
  """Concatenates arrays of shape (lead, *u_i) into one (lead, sum |u_i|).

  The barrier keeps XLA from fusing a concatenation of hundreds of operands
  into each consumer (it would then compile the operand selection once per
  consumer: measured 8 s instead of 1 s for 1000 leaves on CPU).
  """
  return lax.optimization_barrier(
      jnp.concatenate([jnp.reshape(v, (lead, -1)) for v in parts], axis=1))


def reduced_shape(shape: tuple[int, ...], axis, keepdims: bool) -> tuple[int, ...]:
  """The shape of a reduction of an array of `shape` over `axis` (None: all axes)."""
  ndim = len(shape)
  if axis is None:
    axes = set(range(ndim))
  else:
    axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
  return tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)


def unflatten(flat: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
  out, start = [], 0
  for shape in shapes:
    size = math.prod(shape)
    out.append(jnp.reshape(flat[start:start + size], shape))
    start += size
  return out


def _safe_root(s, p: float):
  """s ** (1/p), inf/NaN passed on, with a finite derivative at s == 0."""
  positive = s > 0
  safe = jnp.where(positive & jnp.isfinite(s), s, 1)
  r = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
  return jnp.where(jnp.isfinite(s), jnp.where(positive, r, jnp.zeros_like(s)), s)


def _norm_from_sums(s0, s_hi, s_lo, p: float):
  down, up = _scales(p, s0.dtype)
  use0 = jnp.isfinite(s0) & (s0 >= _TINY)
  use_hi = ~jnp.isfinite(s0)  # overflow, or genuine inf/NaN (then s_hi is inf/NaN too)
  return jnp.where(use0, _safe_root(s0, p),
                   jnp.where(use_hi, _safe_root(s_hi, p) * up, _safe_root(s_lo, p) * down))


def _needs_rescale(total):
  return ~jnp.isfinite(total) | (total < _TINY)


def combine_norms(norms: Sequence[jax.Array], p: float, dtype) -> jax.Array:
  """The p-norm of the concatenation, from the p-norms of the parts, overflow-safe."""
  if not norms:
    return jnp.zeros([], dtype)
  return _combine_flat(_flatten([jnp.asarray(v, dtype) for v in norms], 1)[0], p, dtype)


def _combine_flat(n: jax.Array, p: float, dtype) -> jax.Array:
  n = n.astype(dtype)
  if math.isinf(p):
    return jnp.max(n, initial=0)
  return _norm_from_sums(*_power_sums(n, p, dtype), p)


def flat_norms(xs, p: float, dtype, axis_name, red) -> jax.Array:
  """p-norms of each array in `xs` over its `red` entry (None: all axes), as one flat vector.

  The norms of array i (shape ``reduced_shape(x.shape, red[i], True)``) follow
  those of array i - 1; `unflatten` splits them. With `axis_name`, the reduced
  part of each array is a shard of a larger one split over that mapped axis
  (shard_map / pmap): power sums are psum-reduced and maxima pmax-reduced, so
  every shard gets the norms of the full arrays. A list gives each array its
  own axes; None there marks a replicated array.
  """
  if not xs:
    return jnp.zeros((0,), dtype)
  axes = _per_leaf(axis_name, len(xs))
  if math.isinf(p):
    return _flatten([_pmax(_abs_max(x, dtype, axis=r, keepdims=True), a)
                     for x, r, a in zip(xs, red, axes)], 1)[0]

  # The per-array sums are concatenated into one vector before the (elementwise)
  # root and the choice of scale, so that those are a handful of operations for
  # the whole tree rather than a handful per leaf: compile time counts.
  def multiscale(*xs):
    scales = _scales(p, dtype)
    sums = _psum_grouped([jnp.stack(_power_sums(x, p, dtype, r, True, scales))
                          for x, r in zip(xs, red)], axes)
    flat = _flatten(sums, 3)
    return _norm_from_sums(flat[0], flat[1], flat[2], p)

  def cpu(*xs):
    s0_parts = _psum_grouped([_plain_sum(x, p, dtype, r, True) for x, r in zip(xs, red)], axes)
    s0 = _flatten(s0_parts, 1)[0]

    def rescue(xs):
      # One more reduction per array, at a scale chosen per unit from its s_0:
      # 2^-k where it overflowed (or is inf/NaN), 2^k where it is tiny, else 1.
      # (Two reductions, s_hi and s_lo, would double what XLA has to compile.)
      down, up = _scales(p, dtype)

      def scale_of(s):
        return jnp.where(~jnp.isfinite(s), down, jnp.where(s < _TINY, up, jnp.ones_like(s)))

      parts = [_plain_sum(x.astype(dtype) * scale_of(s), p, dtype, r, True)
               for x, r, s in zip(xs, red, s0_parts)]
      sc = _flatten(_psum_grouped(parts, axes), 1)[0]
      rescaled = _safe_root(sc, p) / scale_of(s0)  # exact: powers of two
      return jnp.where(jnp.isfinite(s0) & (s0 >= _TINY), _safe_root(s0, p), rescaled)

    return lax.cond(_needs_rescale(jnp.sum(s0)), rescue, lambda xs: _safe_root(s0, p), xs)

  return _dispatch(cpu, multiscale, *xs)


def tree_norms(
    leaves: Sequence[jax.Array],
    p: float = 2.0,
    dtype=jnp.float32,
    axis_name: AxisName | list[AxisName] = None,
) -> tuple[list[jax.Array], jax.Array]:
  """Per-leaf p-norms and the global p-norm of `leaves`, in `dtype` (see `flat_norms`)."""
  leaves = list(leaves)
  if not leaves:
    return [], jnp.zeros([], dtype)
  flat = flat_norms(leaves, p, dtype, axis_name, [None] * len(leaves))
  # Global-norm clippers use only the total: XLA drops the per-leaf slices then.
  return unflatten(flat, [()] * len(leaves)), _combine_flat(flat, p, dtype)


def global_norm(tree, p: float = 2.0, dtype=jnp.float32, axis_name: AxisSpec = None):
  """Overflow-safe global p-norm of a pytree (float32 accumulation by default).

  `axis_name` is as in :func:`clipjax.clip_by_global_norm`: inside
  ``shard_map``, the mapped axes the leaves are sharded over (or a function of
  the tree giving them per leaf, None for replicated leaves).

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> norm = clipjax.global_norm({'a': jnp.array([3e20]), 'b': jnp.array([4e20])})
    >>> round(float(norm) / 1e20, 6)  # optax.tree.norm: inf
    5.0
  """
  return tree_norms(jax.tree.leaves(tree), p, dtype, leaf_axes(axis_name, tree, "global_norm"))[1]

