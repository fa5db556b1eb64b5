"""Time of the global-norm reduction alone: plain fp32 vs the overflow-safe variants.

- plain: sum of squares in float32 (overflows for |g| > ~1e19).
- cond: plain, with a lax.cond that sums again at the scale needed when a sum left
  the float range (clipjax's default, every backend).
- multiscale: three sibling sums at scales 1, 2^-k, 2^k (the ``'multiscale'`` form).
- blue: one variadic reduction carrying (max, scaled sum of squares) pairs.
- variadic: multiscale's three sums as one variadic reduction (docs/design.md's
  candidate for a branch-free default: one reduction kernel per leaf, not three).

    python -m benchmarks.norm_variants [--sizes 8e6,32e6] [--leaves 8,64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

import clipjax
from benchmarks import common
from clipjax import _forms, _numerics
from clipjax._numerics import split as _split


def plain(leaves):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def blue(leaves):
  def leaf(x):
    a = jnp.abs(x.astype(jnp.float32)).ravel()

    def comb(u, v):
      (m1, s1), (m2, s2) = u, v
      m = jnp.maximum(m1, m2)
      safe = jnp.where(m > 0, m, 1.0)
      r1, r2 = m1 / safe, m2 / safe
      return m, s1 * r1 * r1 + s2 * r2 * r2

    m, s = lax.reduce(
        (a, (a > 0).astype(jnp.float32)), (jnp.float32(0), jnp.float32(0)), comb, (0,)
    )
    return m * jnp.sqrt(s)

  norms = jnp.stack([leaf(x) for x in leaves])
  return _numerics.combine(_numerics.Split(norms, jnp.zeros(norms.shape, jnp.int32)), 2.0).value()


def variadic(leaves):
  f32 = jnp.float32
  down, up = _split._scales(2.0, f32)  # noqa: SLF001 - the library's own scales
  bound = 2.0 ** (jnp.finfo(f32).maxexp // 2)

  def leaf(x):
    x = x.astype(f32)
    hi = jnp.square(_split._clamp_finite(x * down, 2.0, f32))  # noqa: SLF001
    lo = jnp.square(jnp.clip(x * up, -bound, bound))
    return lax.reduce(
        (jnp.square(x), hi, lo),
        (f32(0),) * 3,
        lambda a, b: tuple(u + v for u, v in zip(a, b)),
        tuple(range(x.ndim)),
    )

  s0, s_hi, s_lo = (jnp.stack(v) for v in zip(*(leaf(x) for x in leaves)))
  units = _split._split_from_sums(s0, s_hi, s_lo, 2.0, f32)  # noqa: SLF001
  return _numerics.combine(units, 2.0).value()


def forced(impl):
  def norm(leaves):
    with _forms.use(_forms.for_trace().with_norms(impl)):
      return clipjax.global_norm(leaves)

  return norm


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  common.add_grid_args(ap, sizes="8e6,32e6", leaves="8,64", rounds=15, reps=5)
  args = ap.parse_args(argv)
  variants = {
      "plain": plain,
      "cond": forced("cond"),
      "multiscale": forced("multiscale"),
      "blue": blue,
      "variadic": variadic,
  }
  print(f"machine: {common.machine()}\n")
  print("| params | leaves | plain (ms) | " + " | ".join(list(variants)[1:]) + " |")
  print("|---:|---:|---:|" + "---:|" * (len(variants) - 1))
  for size, n_leaves in common.grid(args):
    leaves = list(common.make_tree(size, n_leaves, seed=1).values())
    fns = {k: jax.jit(f) for k, f in variants.items()}
    t = common.interleaved(
        {k: (lambda f=f, x=leaves: f(x)) for k, f in fns.items()}, args.rounds, args.reps
    )
    cells = " | ".join(f"{t[k] / t['plain']:.2f}x" for k in list(variants)[1:])
    print(f"| {size / 1e6:.0f}M | {n_leaves} | {t['plain'] * 1e3:.3f} | {cells} |", flush=True)


if __name__ == "__main__":
  main()
