"""Cost of the newer transforms: each + adam vs adam alone, one interleaved run.

clip_by_group_norm (two groups), clip_by_given_norm (the norm given: no read to find
it), adagc (past its warm-up after the first step), spam around adam, record_leaf_norms before
clip_by_global_norm (per-leaf norms recorded), and clip_by_global_norm for
comparison. Per-example clipping takes batch-axis gradients and is not comparable
on this tree.

python -m benchmarks.new_transforms [--sizes 8e6,32e6] [--leaves 8,64]
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

import clipjax
from benchmarks.clip_adam import ratio_main


def _two_groups(updates: Any) -> dict[str, int]:
  return {k: i % 2 for i, k in enumerate(sorted(updates))}


def _with_norm(tx: optax.GradientTransformationExtraArgs, norm: float):
  """tx fed a fixed grad_norm= (what a pipeline that computed the norm earlier passes)."""

  def update(updates, state, params=None, **extra):
    return tx.update(updates, state, params, grad_norm=jnp.float32(norm), **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def variants(lr: float = 1e-3) -> dict[str, optax.GradientTransformation]:
  return {
      "adam": optax.adam(lr),
      "global_norm+adam": optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(lr)),
      "group_norm+adam": optax.chain(clipjax.clip_by_group_norm(1.0, _two_groups), optax.adam(lr)),
      "given_norm+adam": optax.chain(
          _with_norm(clipjax.clip_by_given_norm(1.0), 1e3), optax.adam(lr)
      ),
      "adagc+adam": optax.chain(clipjax.adagc(1.0, warmup_steps=0), optax.adam(lr)),
      "spam(adam)": clipjax.spam(optax.adam(lr)),
      "record+global_norm+adam": optax.chain(
          clipjax.record_leaf_norms(), clipjax.clip_by_global_norm(1.0), optax.adam(lr)
      ),
  }


def main(argv=None):
  ratio_main(variants, __doc__, "8e6,32e6", argv)


if __name__ == "__main__":
  main()
