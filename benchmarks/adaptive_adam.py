"""Cost of the history-adaptive clippers: each + adam vs adam alone, one interleaved run.

python -m benchmarks.adaptive_adam [--sizes 8e6] [--leaves 8,64]
"""

from __future__ import annotations

import argparse

import optax

import clipjax
from benchmarks import common
from benchmarks.clip_adam import run_shape


def variants(lr: float = 1e-3) -> dict[str, optax.GradientTransformation]:
  return {
      "adam": optax.adam(lr),
      "autoclip+adam": optax.chain(clipjax.autoclip(10.0), optax.adam(lr)),
      "zclip+adam": optax.chain(clipjax.zclip(), optax.adam(lr)),
      "skip_spikes(adam)": clipjax.skip_spikes(optax.adam(lr), use_loss=False),
      "skip_spikes(zclip+adam)": clipjax.skip_spikes(
          clipjax.chain(clipjax.zclip(), optax.adam(lr)), use_loss=False
      ),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  common.add_grid_args(ap, sizes="8e6", leaves="8,64", rounds=15, reps=3)
  args = ap.parse_args(argv)
  names = list(variants())
  print(f"machine: {common.machine()}\n")
  print("| params | leaves | adam (ms) | " + " | ".join(names[1:]) + " |")
  print("|---:|---:|---:|" + "---:|" * (len(names) - 1))
  for size, leaves in common.grid(args):
    t = run_shape(size, leaves, args.rounds, args.reps, opts=variants())
    a = t["adam"]
    cells = " | ".join(f"{t[n] / a:.3f}x" for n in names[1:])
    print(f"| {size / 1e6:.0f}M | {leaves} | {a * 1e3:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
  main()
