"""Timing helpers shared by the benchmarks: interleaved rounds, medians, machine info."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


def machine() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (
      f"{platform.node() or 'host'}: {dev.platform} ({kind}), {os.cpu_count()} CPU cores, "
      f"jax {jax.__version__}"
  )


def add_grid_args(ap: argparse.ArgumentParser, sizes: str, leaves: str, rounds: int, reps: int):
  """--sizes (total parameters) x --leaves, comma-separated, and the timing --rounds/--reps."""
  ap.add_argument("--sizes", default=sizes, help="total parameters, comma-separated")
  ap.add_argument("--leaves", default=leaves, help="numbers of leaves, comma-separated")
  ap.add_argument("--rounds", type=int, default=rounds)
  ap.add_argument("--reps", type=int, default=reps)


def grid(args: argparse.Namespace):
  """(n_params, n_leaves) for every pair of --sizes x --leaves, in order."""
  for size in (int(float(s)) for s in args.sizes.split(",")):
    for leaves in (int(x) for x in args.leaves.split(",")):
      yield size, leaves


def block(x):
  return jax.block_until_ready(x)


def interleaved(
    fns: Mapping[Any, Callable[[], object]], rounds: int, reps: int
) -> dict[Any, float]:
  """Median seconds per call of each fn, timing them round-robin.

  Each round runs every fn `reps` times back to back (after one warm-up call
  per fn), so drift in machine load hits all of them alike.
  """
  for f in fns.values():
    block(f())
  samples: dict[str, list[float]] = {k: [] for k in fns}
  order = list(fns)
  for r in range(rounds):
    for k in order[r % len(order) :] + order[: r % len(order)]:
      t0 = time.perf_counter()
      for _ in range(reps):
        out = fns[k]()
      block(out)
      samples[k].append((time.perf_counter() - t0) / reps)
  return {k: statistics.median(v) for k, v in samples.items()}


def make_tree(n_params: int, n_leaves: int, seed: int = 0, dtype=np.float32):
  """n_leaves 2-D leaves of (nearly) equal size summing to about n_params."""
  rng = np.random.default_rng(seed)
  per = n_params // n_leaves
  cols = 256
  rows = max(per // cols, 1)
  return {
      f"l{i:03d}": jax.numpy.asarray(rng.standard_normal((rows, cols)), dtype)
      for i in range(n_leaves)
  }
