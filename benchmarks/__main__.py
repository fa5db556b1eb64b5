"""Runs every benchmark: python -m benchmarks [--quick].

Prints markdown tables (paste into benchmarks/RESULTS.md with the machine line).
"""

from __future__ import annotations

import argparse

import jax

from benchmarks import (
    adaptive_adam,
    bandwidth,
    clip_adam,
    compile_time,
    frozen_leaf,
    model_shapes,
    new_transforms,
    per_example,
    per_kind,
    rnn_throughput,
)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--quick", action="store_true", help="fewer rounds and sizes")
  args = ap.parse_args()
  gpu = jax.default_backend() == "gpu"
  rounds = ["--rounds", "5"] if args.quick else []
  print("## clip + adam vs adam\n", flush=True)
  clip_adam.main(["--sizes", "8e6,32e6" + (",128e6" if gpu else "")] + rounds)
  print("\n## each clipper kind: clipjax vs optax vs PyTorch\n", flush=True)
  per_kind.main(["--sizes", "1e6,32e6", "--leaves", "8,1000"] if args.quick else [])
  print("\n## compile time with many leaves\n", flush=True)
  compile_time.main(["--leaves", "8,128" + ("" if args.quick else ",1000")])
  print("\n## adaptive clippers + adam vs adam\n", flush=True)
  adaptive_adam.main(["--sizes", "8e6" + (",32e6" if gpu else "")] + rounds)
  print("\n## a frozen parameter's zero gradient: every norm clipper + adam\n", flush=True)
  frozen_leaf.main(rounds)
  print("\n## newer transforms + adam vs adam\n", flush=True)
  new_transforms.main(["--sizes", "8e6" + (",32e6" if gpu else "")] + rounds)
  print("\n## per-example (DP-SGD) clipping + adam\n", flush=True)
  per_example.main(["--sizes", "1e6" + (",16e6" if gpu else ",4e6")] + rounds)
  print("\n## every kind on GPT-2-shaped trees\n", flush=True)
  # On a CPU, the smoke-test tree (the real ones take minutes a step there).
  model_shapes.main(
      ["--trees", "gpt2-small,gpt2-medium" if gpu else "tiny", "--dtypes", "float32,bfloat16"]
      + (["--kinds", "global_norm,value,agc", "--rounds", "3"] if args.quick else [])
  )
  if gpu:
    print("\n## clip pass bandwidth\n", flush=True)
    bandwidth.main(["--sizes", "32e6,128e6,256e6"])
  print("\n## RNN experiment throughput and sweep scaling\n", flush=True)
  rnn_throughput.main(["--ks", "1,8,16,64" if gpu else "1,8,16", "--epochs", "50"])


if __name__ == "__main__":
  main()
