"""Achieved memory bandwidth of the clip pass, as a fraction of a measured copy.

The clip pass of clip_by_global_norm must read the gradients once for the norm
and once more to scale them, and write them once: 3 x 4 bytes per fp32 element
(the fewest bytes any implementation moves, unless fused into the optimizer).
The ceiling is a device-to-device copy (read + write), timed the same way.

    python -m benchmarks.bandwidth [--sizes 32e6,128e6]
"""

from __future__ import annotations

import argparse

import jax
import optax

import clipjax
from benchmarks import common


def measure(size: int, leaves: int, rounds: int, reps: int) -> dict[str, float]:
  """GB/s of a copy (2 x bytes) and of each clip pass (3 x bytes)."""
  grads = common.make_tree(size, leaves, seed=1)
  n = sum(x.size for x in jax.tree.leaves(grads))
  ours, theirs = clipjax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  s_ours, s_theirs = ours.init(grads), theirs.init(grads)
  copy = jax.jit(lambda g: jax.tree.map(lambda x: x * 1.0000001, g))
  f_ours = jax.jit(lambda g: ours.update(g, s_ours)[0])
  f_theirs = jax.jit(lambda g: theirs.update(g, s_theirs)[0])
  t = common.interleaved(
      {
          "copy": lambda: copy(grads),
          "ours": lambda: f_ours(grads),
          "optax": lambda: f_theirs(grads),
      },
      rounds,
      reps,
  )
  return {
      "copy": 2 * 4 * n / t["copy"] / 1e9,
      "ours": 3 * 4 * n / t["ours"] / 1e9,
      "optax": 3 * 4 * n / t["optax"] / 1e9,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--sizes", default="32e6,128e6")
  ap.add_argument("--leaves", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args(argv)
  print(f"machine: {common.machine()}\n")
  print(
      "| params | leaves | copy GB/s | clipjax clip GB/s | fraction | optax clip GB/s | "
      "fraction |"
  )
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for size in (int(float(s)) for s in args.sizes.split(",")):
    bw = measure(size, args.leaves, args.rounds, args.reps)
    print(
        f"| {size / 1e6:.0f}M | {args.leaves} | {bw['copy']:.0f} | {bw['ours']:.0f} | "
        f"{bw['ours'] / bw['copy']:.2f} | {bw['optax']:.0f} | {bw['optax'] / bw['copy']:.2f} |",
        flush=True,
    )


if __name__ == "__main__":
  main()
