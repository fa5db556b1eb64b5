"""Cost of per-example (DP-SGD) clipping: clipjax vs optax, against summing unclipped.

Every variant takes per-example gradients (a leading batch axis on every leaf),
reduces them to one update and applies Adam. The floor, "sum+adam", sums the
examples unclipped, as a contraction with a vector of ones (what the clippers'
clipped sums are: on CPU, XLA's plain sum over axis 0 is several times slower):
the least any per-example step must read. Each other variant is reported as its
ratio to it:

- optax's ``per_example_global_norm_clip`` / ``per_example_layer_norm_clip``
  (functions; wrapped as transforms here) and ``contrib.differentially_private_aggregate``
  (clip, sum and Gaussian noise, as one transform);
- ``clipjax.per_example_clip`` with the same settings (global or proportional
  per-layer budgets; with noise).

    python -m benchmarks.per_example [--sizes 1e6,4e6] [--leaves 8,64] [--batch 32] [--padded K]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipjax
from benchmarks import common
from benchmarks.clip_adam import make_step


def _reducer(reduce_fn) -> optax.GradientTransformation:
  """A stateless transform from a function (per-example leaves) -> summed leaves."""

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    return jax.tree.unflatten(treedef, list(reduce_fn(leaves))), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def variants(lr: float = 1e-3, clip: float = 1.0) -> dict[str, optax.GradientTransformation]:
  def with_adam(tx):
    return optax.chain(tx, optax.adam(lr))

  return {
      "sum+adam": with_adam(
          _reducer(lambda xs: [jnp.tensordot(jnp.ones(x.shape[0], x.dtype), x, 1) for x in xs])
      ),
      "optax global": with_adam(
          _reducer(lambda xs: optax.per_example_global_norm_clip(xs, clip)[0])
      ),
      "clipjax global": with_adam(clipjax.per_example_clip(clip, reduction="sum")),
      "optax per-layer": with_adam(
          _reducer(lambda xs: optax.per_example_layer_norm_clip(xs, clip, uniform=False)[0])
      ),
      "clipjax per-layer": with_adam(
          clipjax.per_example_clip(clip, per_layer="proportional", reduction="sum")
      ),
      "optax DP aggregate (noise 1)": with_adam(
          optax.contrib.differentially_private_aggregate(clip, 1.0, seed=0)
      ),
      "clipjax DP (noise 1)": with_adam(
          clipjax.per_example_clip(clip, noise_multiplier=1.0, reduction="sum")
      ),
  }


def run_shape(
    n_params: int, n_leaves: int, batch: int, rounds: int, reps: int, padded: int = 0
) -> dict[str, Any]:
  """Median step time of every variant on `batch` per-example gradients of one tree shape.

  The last `padded` examples have zero gradients (the padding of a fixed-size batch).
  """
  template = common.make_tree(n_params, n_leaves, seed=0)
  rng = np.random.default_rng(1)
  # Examples of different sizes: some clipped, some not.
  scales = 10.0 ** rng.uniform(-1, 1, size=batch)
  scales[batch - padded :] = 0.0
  grads = {
      k: jnp.asarray(
          rng.standard_normal((batch,) + x.shape)
          * scales.reshape((-1,) + (1,) * x.ndim)
          / np.sqrt(n_params),
          jnp.float32,
      )
      for k, x in template.items()
  }
  fns = {}
  for name, opt in variants().items():
    params = common.make_tree(n_params, n_leaves, seed=0)
    step, holder = make_step(opt), [params, opt.init(params)]

    def call(step=step, h=holder):
      h[0], h[1] = step(h[0], h[1], grads)
      return h[0]

    fns[name] = call
  return common.interleaved(fns, rounds=rounds, reps=reps)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  common.add_grid_args(ap, sizes="1e6,4e6", leaves="8,64", rounds=9, reps=3)
  ap.add_argument("--batch", type=int, default=32, help="examples per step")
  ap.add_argument("--padded", type=int, default=0, help="examples with zero gradients")
  args = ap.parse_args(argv)
  names = list(variants())
  print(f"machine: {common.machine()}; batch {args.batch}, {args.padded} of them padding\n")
  print("| params | leaves | sum+adam (ms) | " + " | ".join(names[1:]) + " |")
  print("|---:|---:|---:|" + "---:|" * (len(names) - 1))
  for size, leaves in common.grid(args):
    t = run_shape(size, leaves, args.batch, args.rounds, args.reps, args.padded)
    base = t["sum+adam"]
    cells = " | ".join(f"{t[n] / base:.3f}x" for n in names[1:])
    print(f"| {size / 1e6:.0f}M | {leaves} | {base * 1e3:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
  main()
