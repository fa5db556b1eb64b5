"""Every clipper kind + Adam on real model shapes, against optax's equivalent and Adam alone.

Trees shaped like real transformers (GPT-2 layout: token and position
embeddings; per layer two layer norms, the fused QKV and output projections and
the two MLP matrices, each with its bias; a final layer norm):

- ``gpt2-small``: d=768, 12 layers, 148 leaves, 124M parameters;
- ``gpt2-medium``: d=1024, 24 layers, 292 leaves, 355M parameters;
- ``1.1b``: d=2048, 20 layers, 244 leaves, 1.11B parameters.

Each in float32 and bfloat16 (parameters, gradients and Adam's moments all in
that dtype). Step = ``jit(update + apply_updates)`` with the optimizer state
donated and fed back (the gradients are shared by every variant), as a
training loop does. All variants
of a tree are timed in one interleaved run (each round times every variant in
turn, rotating the order); the figure is the median over rounds of the time per
step, and the ratio is to Adam alone in the same run.

For each variant the script also counts, in the compiled program, the kernels
(fusions, library calls and other device operations of the entry computation,
conditionals counted once) and the conditionals, so that a slow variant can be
traced to extra passes or launches.

    python -m benchmarks.model_shapes [--trees gpt2-small,gpt2-medium] \
        [--dtypes float32,bfloat16] [--kinds all] [--impls cond,multiscale] \
        [--json out.json] [--md out.md] [--hlo DIR]

``--impls`` lists the norm implementations timed for every clipjax clipper that
takes one (the default, ``auto``, is what a user gets).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import clipjax
from benchmarks import common
from benchmarks.clip_adam import make_step
from clipjax import _forms

VOCAB, CONTEXT = 50257, 1024
TREES = {
    "gpt2-small": (768, 12),
    "gpt2-medium": (1024, 24),
    "1.1b": (2048, 20),
    "tiny": (64, 2),  # a smoke test on the CPU: 3.3M parameters, 28 leaves
}
LR = 1e-3


def gpt2_shapes(d: int, layers: int) -> dict[str, tuple[int, ...]]:
  """Leaf name -> shape of a GPT-2-style transformer of width d."""
  shapes: dict[str, tuple[int, ...]] = {"wte": (VOCAB, d), "wpe": (CONTEXT, d)}
  for i in range(layers):
    p = f"h{i:02d}"
    shapes |= {
        f"{p}.ln_1.g": (d,),
        f"{p}.ln_1.b": (d,),
        f"{p}.attn.w": (d, 3 * d),
        f"{p}.attn.b": (3 * d,),
        f"{p}.proj.w": (d, d),
        f"{p}.proj.b": (d,),
        f"{p}.ln_2.g": (d,),
        f"{p}.ln_2.b": (d,),
        f"{p}.fc.w": (d, 4 * d),
        f"{p}.fc.b": (4 * d,),
        f"{p}.fc_proj.w": (4 * d, d),
        f"{p}.fc_proj.b": (d,),
    }
  return shapes | {"ln_f.g": (d,), "ln_f.b": (d,)}


def make_tree(shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int, scale: float):
  """Normal entries times `scale`, generated on the device (1.1B numbers in numpy take long)."""
  keys = jax.random.split(jax.random.key(seed), len(shapes))

  @jax.jit
  def gen(keys):
    return {
        name: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        for k, (name, shape) in zip(keys, shapes.items())
    }

  return gen(keys)


def _labels(tree: dict[str, Any]) -> dict[str, str]:
  # Two groups, as one would clip embeddings apart from the blocks.
  return {k: "embed" if k in ("wte", "wpe") else "blocks" for k in tree}


def _given(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
  """tx fed a fixed norm (what a pipeline that computed the norm earlier passes)."""

  def update(updates, state, params=None, **extra):
    return tx.update(updates, state, params, grad_norm=jnp.float32(1e3), **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _adam() -> optax.GradientTransformation:
  return optax.adam(LR)


def _then_adam(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(tx, _adam())


def _as(tx: optax.GradientTransformation, impl: Any) -> optax.GradientTransformation:
  """tx with its norms computed as `impl` ('cond' or 'multiscale'; 'auto': as it is)."""
  return tx if impl == "auto" else _forms.with_norms(tx, impl)


# kind -> (optax's nearest equivalent or None, clipjax's factory of the implementation or None
# for transforms with no norm implementation). Thresholds are set so that the
# gradients below (N(0, 1e-3^2) entries) are clipped: the clipped path is timed.
KINDS: dict[str, tuple[Callable[[], Any] | None, Callable[[Any], Any]]] = {
    "global_norm": (
        lambda: _then_adam(optax.clip_by_global_norm(1.0)),
        lambda i: _as(_then_adam(clipjax.clip_by_global_norm(1.0)), i),
    ),
    "value": (
        lambda: _then_adam(optax.clip(2e-3)),
        lambda i: _as(_then_adam(clipjax.clip_by_value(2e-3)), i),
    ),
    "block_rms": (
        lambda: _then_adam(optax.clip_by_block_rms(5e-4)),
        lambda i: _as(_then_adam(clipjax.clip_by_block_rms(5e-4)), i),
    ),
    "agc": (
        lambda: _then_adam(optax.adaptive_grad_clip(0.01)),
        lambda i: _as(_then_adam(clipjax.adaptive_grad_clip(0.01)), i),
    ),
    "leaf_norm": (None, lambda i: _as(_then_adam(clipjax.clip_by_norm(0.1)), i)),
    "zclip": (None, lambda i: _as(_then_adam(clipjax.zclip()), i)),
    "autoclip": (
        None,
        lambda i: _as(_then_adam(clipjax.autoclip(10.0, history=1000)), i),
    ),
    "skip_spikes": (
        lambda: optax.apply_if_finite(_adam(), max_consecutive_errors=10**6),
        lambda i: _as(clipjax.skip_spikes(_adam(), use_loss=False), i),
    ),
    "group_norm": (
        None,
        lambda i: _as(_then_adam(clipjax.clip_by_group_norm(1.0, _labels)), i),
    ),
    "given_norm": (None, lambda i: _then_adam(_given(clipjax.clip_by_given_norm(1.0)))),
    "adagc": (
        None,
        lambda i: _as(_then_adam(clipjax.adagc(1.0, warmup_steps=0)), i),
    ),
    "spam": (None, lambda i: clipjax.spam(_adam(), clip_delay=2)),
}
# Transforms whose cost does not depend on the norm implementation: timed once.
NO_IMPL = {"given_norm", "spam"}


def variants(
    kinds: list[str], impls: list[str], extra: tuple[str, ...] = ()
) -> dict[str, Callable[[], Any]]:
  """Name -> factory: Adam, then per kind optax's and clipjax's (each of `impls`).

  `extra` names more clipjax variants as KIND/clipjax-IMPL.
  """
  out: dict[str, Callable[[], Any]] = {"adam": _adam}
  for kind in kinds:
    ref, ours = KINDS[kind]
    if ref is not None:
      out[f"{kind}/optax"] = ref
    for impl in ["auto"] if kind in NO_IMPL else impls:
      out[f"{kind}/clipjax-{impl}"] = functools.partial(ours, impl)
  for name in extra:
    kind, impl = name.split("/clipjax-")
    out[name] = functools.partial(KINDS[kind][1], impl)
  return out


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Instructions of an optimized HLO module that are no kernel of their own.
NOT_KERNELS = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
}


def kernel_counts(hlo: str) -> dict[str, int]:
  """Device operations in the entry computation of an optimized HLO module, by kind."""
  entry = hlo[hlo.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  # (Without the /*index=N*/ comments of wide tuple shapes, whose '=' the
  # pattern would stop at: multi-output fusions of six or more results.)
  entry = re.sub(r"/\*.*?\*/", "", entry)
  counts: dict[str, int] = {}
  for m in re.finditer(r"^\s*(?:ROOT )?\S+ = [^=]*?\s([a-z][a-z0-9-]*)\(", entry, re.M):
    op = m.group(1)
    if op not in NOT_KERNELS:
      counts[op] = counts.get(op, 0) + 1
  return counts


@dataclasses.dataclass
class Steps:
  """The compiled steps of a tree's variants, ready to time."""

  fns: dict[str, Callable[..., Any]]  # name -> one step (state held and fed back)
  kernels: dict[str, dict[str, int]]  # name -> kernel counts of its program
  params: int
  leaves: int
  lower_s: float
  compile_s: float


def build_steps(
    name: str,
    dtype: str,
    opts: dict[str, Any],
    hlo_dir: pathlib.Path | None,
    threads: int,
    tracing: Callable[[str], Any] = lambda name: contextlib.nullcontext(),
) -> Steps:
  """Compiles each optimizer's step on tree `name` in `dtype`.

  `tracing(variant)` is a context manager entered while that variant is traced.
  """
  d, layers = TREES[name]
  shapes = gpt2_shapes(d, layers)
  dt = jnp.dtype(dtype)
  params = make_tree(shapes, dt, seed=0, scale=0.02)
  grads = make_tree(shapes, dt, seed=1, scale=1e-3)
  holders = {}
  for k, o in opts.items():
    own = jax.tree.map(jnp.copy, params)
    holders[k] = [own, o.init(own)]
  t0 = time.perf_counter()
  lowered = {}
  for k, o in opts.items():
    with tracing(k):
      lowered[k] = make_step(o).lower(*holders[k], grads)
  t_lower = time.perf_counter() - t0
  _log(f"{name} {dtype}: {len(opts)} variants lowered in {t_lower:.1f} s")
  t0 = time.perf_counter()
  # XLA compiles with the GIL released: the variants compile side by side.
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    compiled = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
  t_compile = time.perf_counter() - t0
  _log(f"compiled in {t_compile:.1f} s")
  kernels, fns = {}, {}
  for k, exe in compiled.items():
    text = exe.as_text()
    kernels[k] = kernel_counts(text)
    if hlo_dir is not None:
      fname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}_{dtype}_{k}")
      (hlo_dir / f"{fname}.hlo.txt").write_text(text)

    def call(exe=exe, holder=holders[k]):
      holder[0], holder[1] = exe(holder[0], holder[1], grads)
      return holder[0]

    fns[k] = call
  for k in fns:  # past the history clippers' warm-ups, so that their clipping rules run
    if k.startswith(("zclip", "autoclip", "skip_spikes", "adagc", "spam")):
      for _ in range(30):
        common.block(fns[k]())
  n = sum(x.size for x in jax.tree.leaves(params))
  return Steps(fns, kernels, int(n), len(shapes), t_lower, t_compile)


def run_tree(
    name: str,
    dtype: str,
    kinds: list[str],
    impls: list[str],
    rounds: int,
    reps: int,
    hlo_dir: pathlib.Path | None,
    threads: int,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
  opts = {k: f() for k, f in variants(kinds, impls, extra).items()}
  steps = build_steps(name, dtype, opts, hlo_dir, threads)
  times = common.interleaved(steps.fns, rounds=rounds, reps=reps)
  _log("timed")
  return {
      "tree": name,
      "dtype": dtype,
      "params": steps.params,
      "leaves": steps.leaves,
      "lower_s": round(steps.lower_s, 2),
      "compile_s": round(steps.compile_s, 2),
      "ms": {k: v * 1e3 for k, v in times.items()},
      "ratio": {k: v / times["adam"] for k, v in times.items()},
      "kernels": steps.kernels,
  }


def _total(counts: dict[str, int]) -> int:
  return sum(counts.values())


def markdown(results: list[dict[str, Any]]) -> str:
  """One table per tree and dtype: each variant's step time, ratio to Adam and kernel counts."""
  lines = []
  for r in results:
    lines += [
        f"### {r['tree']} ({r['params'] / 1e6:.0f}M parameters, {r['leaves']} leaves), "
        f"{r['dtype']}",
        "",
        "| variant | step (ms) | / adam | kernels | conditionals |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, ms in r["ms"].items():
      c = r["kernels"][k]
      lines.append(
          f"| {k} | {ms:.3f} | {r['ratio'][k]:.3f}x | {_total(c)} | {c.get('conditional', 0)} |"
      )
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--trees", default="gpt2-small,gpt2-medium,1.1b")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--kinds", default="all", help="comma-separated, or 'all'")
  ap.add_argument("--impls", default="auto", help="norm implementations timed for every kind")
  ap.add_argument("--extra", default="", help="more variants, e.g. global_norm/clipjax-multiscale")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--threads", type=int, default=8, help="variants compiled at once")
  ap.add_argument("--json", default=None)
  ap.add_argument("--md", default=None)
  ap.add_argument("--hlo", default=None, help="folder for each variant's optimized HLO")
  args = ap.parse_args(argv)
  kinds = list(KINDS) if args.kinds == "all" else args.kinds.split(",")
  impls = args.impls.split(",")
  extra = tuple(x for x in args.extra.split(",") if x)
  hlo_dir = pathlib.Path(args.hlo) if args.hlo else None
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)
  header = f"machine: {common.machine()}, optax {optax.__version__}"
  print(header, flush=True)
  results = []
  for tree in args.trees.split(","):
    for dtype in args.dtypes.split(","):
      r = run_tree(tree, dtype, kinds, impls, args.rounds, args.reps, hlo_dir, args.threads, extra)
      results.append(r)
      print(markdown([r]), flush=True)
      if args.json:  # after every tree, so that a run cut short keeps what it measured
        doc = {"machine": header, "results": results}
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=1))
      if args.md:
        pathlib.Path(args.md).write_text(header + "\n\n" + markdown(results))


if __name__ == "__main__":
  main()
