"""Cost of clipping: adam alone vs optax clip+adam vs clipjax clip+adam.

One interleaved run per tree shape; prints a markdown table of median step times
and ratios to adam alone. Also times clipjax's overflow-safe norm against a
plain float32 sum-of-squares norm (the "robust norm" overhead).

    python -m benchmarks.clip_adam [--sizes 8e6,32e6] [--leaves 8,64] [--zero-leaves K] [--hlo DIR]

With --zero-leaves K the first K leaves of the gradients are zero, as the
gradient of a frozen or unused parameter is.

With --hlo DIR it writes the optimized HLO of each step there, to see what
each clipper compiles to.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax

import clipjax
from benchmarks import common


def plain_global_norm_clip(max_norm: float) -> optax.GradientTransformation:
  """The cheapest correct-when-it-does-not-overflow clip: fp32 sum of squares."""

  def update(updates, state, params=None):
    del params
    sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in jax.tree.leaves(updates))
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def variants(lr: float = 1e-3, max_norm: float = 1.0) -> dict[str, optax.GradientTransformation]:
  return {
      "adam": optax.adam(lr),
      "optax clip+adam": optax.chain(optax.clip_by_global_norm(max_norm), optax.adam(lr)),
      "clipjax clip+adam": optax.chain(clipjax.clip_by_global_norm(max_norm), optax.adam(lr)),
      "plain-norm clip+adam": optax.chain(plain_global_norm_clip(max_norm), optax.adam(lr)),
  }


def make_step(opt):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def run_shape(
    n_params: int,
    n_leaves: int,
    rounds: int,
    reps: int,
    hlo_dir=None,
    opts: dict[str, optax.GradientTransformation] | None = None,
    zero_leaves: int = 0,
):
  """Median step time of each optimizer in `opts` (default: `variants()`), interleaved.

  The first `zero_leaves` leaves of the gradients are zero.
  """
  grads = common.make_tree(n_params, n_leaves, seed=1)
  for name in sorted(grads)[:zero_leaves]:
    grads[name] = jnp.zeros_like(grads[name])
  fns, holders = {}, {}
  for name, opt in (opts or variants()).items():
    params = common.make_tree(n_params, n_leaves, seed=0)
    step = make_step(opt)
    holders[name] = [params, opt.init(params)]
    if hlo_dir is not None:
      text = step.lower(params, holders[name][1], grads).compile().as_text()
      fname = name.replace(" ", "_").replace("+", "_")
      (pathlib.Path(hlo_dir) / f"{fname}_{n_params}_{n_leaves}.hlo.txt").write_text(text)

    def call(step=step, h=holders[name]):
      h[0], h[1] = step(h[0], h[1], grads)
      return h[0]

    fns[name] = call
  return common.interleaved(fns, rounds=rounds, reps=reps)


def ratio_table(opts_fn, args) -> None:
  """Prints one row per tree shape: Adam's time and every other variant's ratio to it.

  `opts_fn()` returns the variants, "adam" first; `args` holds the grid (sizes,
  leaves, rounds, reps) and the number of zero gradient leaves.
  """
  names = list(opts_fn())
  print(f"machine: {common.machine()}\n")
  print("| params | leaves | adam (ms) | " + " | ".join(names[1:]) + " |")
  print("|---:|---:|---:|" + "---:|" * (len(names) - 1))
  for size, leaves in common.grid(args):
    t = run_shape(
        size, leaves, args.rounds, args.reps, opts=opts_fn(), zero_leaves=args.zero_leaves
    )
    a = t["adam"]
    cells = " | ".join(f"{t[n] / a:.3f}x" for n in names[1:])
    print(f"| {size / 1e6:.0f}M | {leaves} | {a * 1e3:.2f} | {cells} |", flush=True)


def ratio_main(opts_fn, doc: str, sizes: str, argv=None) -> None:
  """The command line of a ratio-table benchmark: --sizes (default `sizes`) x --leaves."""
  ap = argparse.ArgumentParser(description=doc)
  common.add_grid_args(ap, sizes=sizes, leaves="8,64", rounds=15, reps=3)
  _add_zero_leaves(ap)
  ratio_table(opts_fn, ap.parse_args(argv))


def _add_zero_leaves(ap: argparse.ArgumentParser) -> None:
  ap.add_argument(
      "--zero-leaves", type=int, default=0, help="leaves whose gradient is zero (frozen)"
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  common.add_grid_args(ap, sizes="8e6,32e6", leaves="8,64", rounds=15, reps=3)
  ap.add_argument("--hlo", default=None)
  _add_zero_leaves(ap)
  args = ap.parse_args(argv)
  if args.hlo:
    pathlib.Path(args.hlo).mkdir(parents=True, exist_ok=True)
  print(f"machine: {common.machine()}\n")
  print(
      "| params | leaves | adam (ms) | optax clip+adam | clipjax clip+adam | "
      "plain-norm clip+adam | robust / plain |"
  )
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for size, leaves in common.grid(args):
    t = run_shape(size, leaves, args.rounds, args.reps, args.hlo, zero_leaves=args.zero_leaves)
    a = t["adam"]
    print(
        f"| {size/1e6:.0f}M | {leaves} | {a*1e3:.2f} | {t['optax clip+adam']/a:.3f}x | "
        f"{t['clipjax clip+adam']/a:.3f}x | {t['plain-norm clip+adam']/a:.3f}x | "
        f"{t['clipjax clip+adam']/t['plain-norm clip+adam']:.3f} |",
        flush=True,
    )


if __name__ == "__main__":
  main()
