"""Compile time of a training step's optimizer with many leaves: clipjax vs optax.

For each leaf count, traces, lowers and compiles ``jit(update + apply_updates)``
of adam alone and of each clipper chained before adam, and reports the seconds
of each phase (median of `--repeats` fresh traces: each repeat builds a new
function, so nothing is reused from JAX's caches).

    python -m benchmarks.compile_time [--leaves 8,128,1000] [--repeats 3] [--only REGEX]

`--only` keeps the optimizers whose name matches (Adam alone always runs: the
last column is relative to it). With `--alternate`, the repeats of each leaf
count go round the optimizers (one trace of each, then the next round) instead
of running one optimizer's repeats back to back, so that a change in the
machine's speed during the run falls on all of them alike.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import optax

import clipjax
from benchmarks import common


def chains(lr: float = 1e-3) -> dict[str, optax.GradientTransformation]:
  def with_adam(clip):
    return optax.chain(clip, optax.adam(lr))

  return {
      "adam": optax.adam(lr),
      "optax clip_by_global_norm": with_adam(optax.clip_by_global_norm(1.0)),
      "clipjax clip_by_global_norm": with_adam(clipjax.clip_by_global_norm(1.0)),
      "optax clip (value)": with_adam(optax.clip(1e-3)),
      "clipjax clip_by_value": with_adam(clipjax.clip_by_value(1e-3)),
      "clipjax clip_by_norm": with_adam(clipjax.clip_by_norm(1.0)),
      "optax adaptive_grad_clip": with_adam(optax.adaptive_grad_clip(1e-2)),
      "clipjax adaptive_grad_clip": with_adam(clipjax.adaptive_grad_clip(1e-2)),
      "optax clip_by_block_rms": with_adam(optax.clip_by_block_rms(1e-3)),
      "clipjax clip_by_block_rms": with_adam(clipjax.clip_by_block_rms(1e-3)),
      "clipjax zclip": with_adam(clipjax.zclip()),
      "clipjax skip_spikes(clip + adam)": clipjax.skip_spikes(
          with_adam(clipjax.clip_by_global_norm(1.0)), use_loss=False
      ),
  }


def compile_seconds(opt, params, grads) -> tuple[float, float]:
  """(trace + lower, compile) seconds for one fresh step function."""

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(opt.init, params)
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(params, state, grads)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--leaves", default="8,128,1000")
  ap.add_argument("--elements", type=int, default=768, help="elements per leaf")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--only", default="", help="regex: run only the matching optimizers (and adam)")
  ap.add_argument("--alternate", action="store_true", help="go round the optimizers per repeat")
  args = ap.parse_args(argv)
  selected = {
      name: opt for name, opt in chains().items() if name == "adam" or re.search(args.only, name)
  }
  print(f"machine: {common.machine()}\n")
  print("| leaves | optimizer | trace+lower (s) | compile (s) | total / adam |")
  print("|---:|---|---:|---:|---:|")
  for n in (int(x) for x in args.leaves.split(",")):
    tree = jax.eval_shape(lambda n=n: common.make_tree(n * args.elements, n))
    if args.alternate:
      runs = {name: [] for name in selected}
      for _ in range(args.repeats):
        for name, opt in selected.items():
          runs[name].append(compile_seconds(opt, tree, tree))
    else:
      runs = {
          name: [compile_seconds(opt, tree, tree) for _ in range(args.repeats)]
          for name, opt in selected.items()
      }
    lower = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
    comp = {name: statistics.median(r[1] for r in rs) for name, rs in runs.items()}
    adam_total = lower["adam"] + comp["adam"]
    for name in selected:
      print(
          f"| {n} | {name} | {lower[name]:.2f} | {comp[name]:.2f} |"
          f" {(lower[name] + comp[name]) / adam_total:.2f}x |",
          flush=True,
      )


if __name__ == "__main__":
  main()
