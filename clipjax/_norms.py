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
clip pass then costs 2.5x a plain one), so on CPU (chosen at lowering time with
``lax.platform_dependent``) the norm is the plain float32 sum s_0, and only
when the total is non-finite or tiny does a ``lax.cond`` recompute every leaf
scaled by its max-abs value (m ||x/m||_p): one read in the common case there
too. The CPU branch is taken on the (psum-reduced) total, so all shards agree.

`p` may be any real >= 1 or inf (max-abs, which cannot overflow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

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
  return lax.platform_dependent(*args, cpu=cpu, default=multiscale)


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x, axis_name: AxisName):
  return x if axis_name is None else lax.pmax(x, axis_name)


def _is_axis_name(a) -> bool:
  return a is None or isinstance(a, str) or (
      isinstance(a, tuple) and all(isinstance(n, str) for n in a))


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
    if not _is_axis_name(a):
      raise ValueError(
          f"{who}: axis_name(updates) gave {a!r} for a leaf; each entry must be an "
          "axis name, a tuple of axis names or None (replicated).")
  return [a or None for a in axes]


def _per_leaf(axis_name, n: int) -> list[AxisName]:
  return list(axis_name) if isinstance(axis_name, list) else [axis_name] * n


def _stack_psum(per_leaf: list[jax.Array], axes: list[AxisName]) -> jax.Array:
  """Stacks per-leaf sums on a new last axis, each psum-reduced over its own axes.

  One psum per distinct axis spec. Leaves are grouped before stacking so that
  inside shard_map a replicated leaf's sum never mixes with a sharded one's
  (JAX then types the result as the same on every shard).
  """
  groups: dict[Any, list[int]] = {}
  for i, a in enumerate(axes):
    groups.setdefault(a, []).append(i)
  if len(groups) == 1:
    return _psum(jnp.stack(per_leaf, axis=-1), axes[0])
  column = {}
  for a, idx in groups.items():
    reduced = _psum(jnp.stack([per_leaf[i] for i in idx], axis=-1), a)
    for j, i in enumerate(idx):
      column[i] = reduced[..., j]
  return jnp.stack([column[i] for i in range(len(per_leaf))], axis=-1)


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


def _power_sums(x, p: float, dtype, axis=None, keepdims=False):
  """(s_0, s_hi, s_lo): sums of |x|^p at scales 1, 2^-k and 2^k, one fused pass."""
  x = x.astype(dtype)
  down, up_scale = _scales(p, dtype)
  s0 = jnp.sum(_power(x, p), axis=axis, keepdims=keepdims)
  s_hi = jnp.sum(_power(x * down, p), axis=axis, keepdims=keepdims)
  # Clamped so that entries which overflow here (s_lo is then unused) give zero,
  # not NaN, derivatives.
  up = jnp.clip(x * up_scale, -(2.0**60), 2.0**60)
  s_lo = jnp.sum(_power(up, p), axis=axis, keepdims=keepdims)
  return s0, s_hi, s_lo


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


def _scaled_norm(x, p: float, dtype, axis_name: AxisName, axis=None, keepdims=False):
  """m * ||x / m||_p with m = max|x| (a second read; the CPU fallback)."""
  x = x.astype(dtype)
  m = _pmax(_abs_max(x, dtype, axis=axis, keepdims=True), axis_name)
  ok = (m > 0) & jnp.isfinite(m)
  safe_m = jnp.where(ok, m, 1)
  ratio = _psum(jnp.sum(_power(x / safe_m, p), axis=axis, keepdims=True), axis_name)
  n = jnp.where(ok, safe_m * _safe_root(jnp.where(ok, ratio, 0), p),
                jnp.where(jnp.isfinite(m), jnp.zeros_like(m), m))
  return n if keepdims else jnp.squeeze(n, axis=axis)


def _needs_rescale(total):
  return ~jnp.isfinite(total) | (total < _TINY)


def combine_norms(norms: Sequence[jax.Array], p: float, dtype) -> jax.Array:
  """The p-norm of the concatenation, from the p-norms of the parts, overflow-safe."""
  if not norms:
    return jnp.zeros([], dtype)
  n = jnp.concatenate([jnp.ravel(jnp.asarray(v, dtype)) for v in norms])
  if math.isinf(p):
    return jnp.max(n)
  return _norm_from_sums(*_power_sums(n, p, dtype), p)


def tree_norms(
    leaves: Sequence[jax.Array],
    p: float = 2.0,
    dtype=jnp.float32,
    axis_name: AxisName | list[AxisName] = None,
) -> tuple[list[jax.Array], jax.Array]:
  """Per-leaf p-norms and the global p-norm of `leaves`, in `dtype`.

  With `axis_name`, each leaf is taken to be a shard of a larger array split
  over that mapped axis (shard_map / pmap): power sums are psum-reduced and
  maxima pmax-reduced, so every shard gets the norms of the full arrays. A list
  gives each leaf its own axes; None there marks a replicated leaf.
  """
  leaves = list(leaves)
  if not leaves:
    return [], jnp.zeros([], dtype)
  axes = _per_leaf(axis_name, len(leaves))
  if math.isinf(p):
    per_leaf = [_pmax(_abs_max(x, dtype), a) for x, a in zip(leaves, axes)]
    return per_leaf, jnp.max(jnp.stack(per_leaf))

  def multiscale(*xs):
    # (3, n_leaves): one psum for all leaves and scales (per group of axes).
    sums = _stack_psum([jnp.stack(_power_sums(x, p, dtype)) for x in xs], axes)
    return _norm_from_sums(sums[0], sums[1], sums[2], p)

  def cpu(*xs):
    sums = _stack_psum([jnp.sum(_power(x.astype(dtype), p)) for x in xs], axes)
    return lax.cond(
        _needs_rescale(jnp.sum(sums)),
        lambda xs: jnp.stack([_scaled_norm(x, p, dtype, a) for x, a in zip(xs, axes)]),
        lambda xs: _safe_root(sums, p), xs)

  per = _dispatch(cpu, multiscale, *leaves)
  return [per[i] for i in range(len(leaves))], combine_norms([per], p, dtype)


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


def reduced_norm(x, axis, p: float = 2.0, dtype=jnp.float32, keepdims=True,
                 axis_name: AxisName = None):
  """p-norm of `x` over `axis` (e.g. AGC's units), overflow-safe, one read.

  With `axis_name`, the reduced axes of `x` are sharded over that mapped axis:
  the partial sums (or maxima) are all-reduced across it.
  """
  if math.isinf(p):
    return _pmax(_abs_max(x, dtype, axis=axis, keepdims=keepdims), axis_name)

  def multiscale(x):
    sums = _psum(jnp.stack(_power_sums(x, p, dtype, axis=axis, keepdims=keepdims)), axis_name)
    return _norm_from_sums(sums[0], sums[1], sums[2], p)

  def cpu(x):
    s = _psum(jnp.sum(_power(x.astype(dtype), p), axis=axis, keepdims=keepdims), axis_name)
    # The predicate is computed from all-reduced sums, so every shard of an
    # axis group takes the same branch (the rescale branch all-reduces too).
    return lax.cond(_needs_rescale(jnp.sum(s)),
                    lambda x: _scaled_norm(x, p, dtype, axis_name, axis=axis, keepdims=keepdims),
                    lambda x: _safe_root(s, p), x)

  return _dispatch(cpu, multiscale, x)
