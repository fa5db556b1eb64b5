"""Overflow-safe norms of gradient pytrees.

The common case costs one read of the gradients: each leaf is upcast to the
accumulation dtype (float32 by default) inside the reduction, so fp16/bf16
gradients never overflow while they are squared. Only when the total power sum
is non-finite (an overflow such as fp32 gradients of 1e20, or a genuine
inf/NaN) or so small that it may have underflowed, a `lax.cond` recomputes the
norms with each leaf scaled by its max-abs value first:

    ||x||_p = m * || x / m ||_p,   m = max |x|

which is exact in real arithmetic and never overflows. The branch is taken on
the (psum-reduced) total, so every shard takes the same branch.

`p` may be any real >= 1 or inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...] | None

# Below this the fp32 power sum may have lost precision to underflow (squares
# of entries under ~1e-19 are flushed); recompute with scaling. Only trees whose
# norm is below ~1e-15 (or that are all zero) take the slow branch.
_UNDERFLOW_GUARD = 2.0**-100


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x, axis_name: AxisName):
  return x if axis_name is None else lax.pmax(x, axis_name)


def _abs_max(x, dtype, axis=None, keepdims=False):
  # `initial` makes zero-size leaves well defined (norm 0).
  return jnp.max(jnp.abs(x.astype(dtype)), axis=axis, keepdims=keepdims, initial=0)


def _power_sum(x, p: float, dtype, axis=None, keepdims=False):
  x = x.astype(dtype)
  if p == 2:
    return jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  if p == 1:
    return jnp.sum(jnp.abs(x), axis=axis, keepdims=keepdims)
  return jnp.sum(jnp.abs(x) ** p, axis=axis, keepdims=keepdims)


def _safe_root(s, p: float):
  """s ** (1/p), with a finite derivative at s == 0 (for meta-gradients)."""
  positive = s > 0
  safe = jnp.where(positive, s, 1)
  r = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
  return jnp.where(positive, r, jnp.zeros_like(s)) + jnp.where(jnp.isfinite(s), 0, s)


def _scaled(m, ratio_power_sum, p: float):
  """m * ratio_power_sum**(1/p) with m == 0 -> 0 and non-finite m passed on."""
  ok = (m > 0) & jnp.isfinite(m)
  safe_m = jnp.where(ok, m, 1)
  r = _safe_root(jnp.where(ok, ratio_power_sum, 0), p)
  return jnp.where(ok, safe_m * r, jnp.where(jnp.isfinite(m), jnp.zeros_like(m), m))


def _scaled_leaf_norm(x, p: float, dtype, axis_name: AxisName, axis=None, keepdims=False):
  m = _pmax(_abs_max(x, dtype, axis=axis, keepdims=True), axis_name)
  ok = (m > 0) & jnp.isfinite(m)
  safe_m = jnp.where(ok, m, 1)
  ratio = _power_sum(x.astype(dtype) / safe_m, p, dtype, axis=axis, keepdims=True)
  n = _scaled(m, _psum(ratio, axis_name), p)
  return n if keepdims else jnp.squeeze(n, axis=axis)


def combine_norms(norms: Sequence[jax.Array], p: float, dtype) -> jax.Array:
  """The p-norm of the concatenation, from the p-norms of the parts, overflow-safe."""
  if not norms:
    return jnp.zeros([], dtype)
  n = jnp.concatenate([jnp.ravel(jnp.asarray(v, dtype)) for v in norms])
  if math.isinf(p):
    return jnp.max(n)
  m = jnp.max(n)
  ok = (m > 0) & jnp.isfinite(m)
  safe_m = jnp.where(ok, m, 1)
  return _scaled(m, _power_sum(n / safe_m, p, dtype), p)


def tree_norms(
    leaves: Sequence[jax.Array],
    p: float = 2.0,
    dtype=jnp.float32,
    axis_name: AxisName = None,
) -> tuple[list[jax.Array], jax.Array]:
  """Per-leaf p-norms and the global p-norm of `leaves`, in `dtype`.

  With `axis_name`, each leaf is taken to be a shard of a larger array split
  over that mapped axis (shard_map / pmap): power sums are psum-reduced and
  maxima pmax-reduced, so every shard gets the norms of the full arrays.
  """
  leaves = list(leaves)
  if not leaves:
    return [], jnp.zeros([], dtype)
  if math.isinf(p):
    per_leaf = [_pmax(_abs_max(x, dtype), axis_name) for x in leaves]
    return per_leaf, jnp.max(jnp.stack(per_leaf))

  sums = _psum(jnp.stack([_power_sum(x, p, dtype) for x in leaves]), axis_name)
  total = jnp.sum(sums)

  def fast(_):
    return _safe_root(sums, p), _safe_root(total, p)

  def rescaled(xs):
    per = jnp.stack([_scaled_leaf_norm(x, p, dtype, axis_name) for x in xs])
    return per, combine_norms(list(per), p, dtype)

  rescale = ~jnp.isfinite(total) | (total < _UNDERFLOW_GUARD)
  per, glob = lax.cond(rescale, rescaled, fast, leaves)
  return [per[i] for i in range(len(leaves))], glob


def global_norm(tree, p: float = 2.0, dtype=jnp.float32, axis_name: AxisName = None):
  """Overflow-safe global p-norm of a pytree (float32 accumulation by default)."""
  return tree_norms(jax.tree.leaves(tree), p, dtype, axis_name)[1]


def reduced_norm(x, axis, p: float = 2.0, dtype=jnp.float32, keepdims=True):
  """p-norm of `x` over `axis` (e.g. AGC's units), overflow-safe, one read usually."""
  if math.isinf(p):
    return _abs_max(x, dtype, axis=axis, keepdims=keepdims)
  s = _power_sum(x, p, dtype, axis=axis, keepdims=keepdims)
  total = jnp.sum(s)
  return lax.cond(
      ~jnp.isfinite(total) | (total < _UNDERFLOW_GUARD),
      lambda x: _scaled_leaf_norm(x, p, dtype, None, axis=axis, keepdims=keepdims),
      lambda x: _safe_root(s, p),
      x)
