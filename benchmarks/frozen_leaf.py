"""Every norm clipper + adam vs adam alone, with the gradient of a frozen parameter.

A frozen (``stop_gradient``) or unused parameter, or a padded example, has a
zero gradient. The norms' plain sums cannot tell a zero sum from one that
underflowed, and until 20ccc9f every such step ran the rescue branch (a second
read of the gradients). This table times one interleaved run with the first
`--zero-leaves` leaves zero (default 1); ``--zero-leaves 0`` gives the ordinary
case for comparison.

    python -m benchmarks.frozen_leaf [--sizes 8e6] [--leaves 64] [--zero-leaves 1]
"""

from __future__ import annotations

import argparse

import optax

import clipjax
from benchmarks import common
from benchmarks.clip_adam import ratio_table


def variants(lr: float = 1e-3) -> dict[str, optax.GradientTransformation]:
  def with_adam(clip):
    return optax.chain(clip, optax.adam(lr))

  return {
      "adam": optax.adam(lr),
      "global_norm": with_adam(clipjax.clip_by_global_norm(1.0)),
      "value": with_adam(clipjax.clip_by_value(1e-3)),
      "norm": with_adam(clipjax.clip_by_norm(1.0)),
      "block_rms": with_adam(clipjax.clip_by_block_rms(1e-2)),
      "agc": with_adam(clipjax.adaptive_grad_clip(1e-2)),
      "zclip": with_adam(clipjax.zclip()),
      "adagc": with_adam(clipjax.adagc(1.0, warmup_steps=0)),
      "optax global_norm": with_adam(optax.clip_by_global_norm(1.0)),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  common.add_grid_args(ap, sizes="8e6", leaves="64", rounds=15, reps=3)
  ap.add_argument("--zero-leaves", type=int, default=1, help="leaves whose gradient is zero")
  ratio_table(variants, ap.parse_args(argv))


if __name__ == "__main__":
  main()
