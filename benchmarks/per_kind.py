"""Each clipper kind side by side: clipjax vs optax vs PyTorch, the clip alone.

For every tree shape (total parameters x number of leaves) one interleaved run
times, for each kind, clipjax's transform, optax's equivalent where optax has
one, and the PyTorch equivalent on the CPU (when torch is installed):

- value: clip_by_value | optax.clip | clip_grad_value_(foreach=True)
- global_norm: clip_by_global_norm | optax.clip_by_global_norm | clip_grad_norm_(foreach=True)
- leaf_norm: clip_by_norm | (none) | _foreach_norm + _foreach_mul_
- block_rms: clip_by_block_rms | optax.clip_by_block_rms | _foreach_norm / sqrt(n) + _foreach_mul_
- agc: adaptive_grad_clip | optax.adaptive_grad_clip | timm's adaptive_clip_grad (a loop)
- autoclip: autoclip(10, history=1000) | (none) | the AutoClip paper's loop, foreach norms
- zclip: zclip() | (none) | ZClip's z-score rule, foreach norms

JAX: ``jit(tx.update)`` from gradients to clipped gradients, with the
gradients and state donated and the output fed back in, so XLA may reuse the
buffers (one read for the norm, one read and one write for the scaling).
PyTorch: the in-place clip of ``p.grad`` (the same reads and write). Each call
clips the previous call's output in both. The PyTorch rows
without a built-in are written the way its docs suggest (foreach ops), with
the history rules run on the host as the authors' code does.

    python -m benchmarks.per_kind [--sizes 1e6,8e6,32e6] [--leaves 8,100,1000]
"""

from __future__ import annotations

import argparse
import collections
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import clipjax
from benchmarks import common

MAX_NORM, VALUE, RMS, AGC = 1.0, 1e-3, 1e-2, 1e-2


def jax_variants() -> dict[str, dict[str, optax.GradientTransformation]]:
  return {
      "value": {"clipjax": clipjax.clip_by_value(VALUE), "optax": optax.clip(VALUE)},
      "global_norm": {
          "clipjax": clipjax.clip_by_global_norm(MAX_NORM),
          "optax": optax.clip_by_global_norm(MAX_NORM),
      },
      "leaf_norm": {"clipjax": clipjax.clip_by_norm(MAX_NORM)},
      "block_rms": {
          "clipjax": clipjax.clip_by_block_rms(RMS),
          "optax": optax.clip_by_block_rms(RMS),
      },
      "agc": {"clipjax": clipjax.adaptive_grad_clip(AGC), "optax": optax.adaptive_grad_clip(AGC)},
      "autoclip": {"clipjax": clipjax.autoclip(10.0, history=1000)},
      "zclip": {"clipjax": clipjax.zclip()},
  }


# ------------------------------------------------------------------ PyTorch side


def torch_variants(torch) -> dict[str, Callable[[Any], None]]:
  """kind -> f(params) clipping each p.grad in place."""
  foreach_norm = torch._foreach_norm  # noqa: SLF001 - what clip_grad_norm_ uses inside

  def grads(ps):
    return [p.grad for p in ps]

  def leaf_norm(ps):
    g = grads(ps)
    coefs = (MAX_NORM / (torch.stack(foreach_norm(g)) + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(g, coefs.unbind())

  def block_rms(ps):
    g = grads(ps)
    sizes = torch.tensor([float(x.numel()) for x in g])
    rms = torch.stack(foreach_norm(g)) / sizes.sqrt()
    torch._foreach_mul_(g, (RMS / (rms + 1e-6)).clamp(max=1.0).unbind())

  def unitwise_norm(x):  # timm's, with our (in, out) layout: units reduce over dim 0
    return x.norm(2.0) if x.ndim <= 1 else x.norm(2.0, dim=0, keepdim=True)

  def agc(ps, eps=1e-3):  # timm.utils.agc.adaptive_clip_grad
    for p in ps:
      g = p.grad.detach()
      max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(AGC)
      grad_norm = unitwise_norm(g)
      clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
      p.grad.detach().copy_(torch.where(grad_norm < max_norm, g, clipped))

  def total_norm(g):
    return torch.linalg.vector_norm(torch.stack(foreach_norm(g))).item()

  history: collections.deque[float] = collections.deque(maxlen=1000)

  def autoclip(ps):  # Seetharaman et al.'s loop: norm -> history -> percentile -> clip
    g = grads(ps)
    norm = total_norm(g)
    history.append(norm)
    clip = float(np.percentile(np.asarray(history), 10.0))
    torch._foreach_mul_(g, min(1.0, clip / (norm + 1e-6)))

  z = {"n": 0, "mean": 0.0, "var": 0.0, "warm": []}

  def zclip(ps, alpha=0.97, z_thresh=2.5, warmup=25):  # Kumar et al.'s z-score rule
    g = grads(ps)
    norm = total_norm(g)
    if len(z["warm"]) < warmup:
      z["warm"].append(norm)
      if len(z["warm"]) == warmup:
        z["mean"], z["var"] = float(np.mean(z["warm"])), float(np.var(z["warm"]))
      return
    std = math.sqrt(z["var"])
    score = (norm - z["mean"]) / (std + 1e-6)
    clipped = norm
    if score > z_thresh:
      clipped = z["mean"] + (z_thresh**2 / score) * std
      torch._foreach_mul_(g, clipped / norm)
    z["mean"] = alpha * z["mean"] + (1 - alpha) * clipped
    z["var"] = alpha * z["var"] + (1 - alpha) * (clipped - z["mean"]) ** 2

  return {
      "value": lambda ps: torch.nn.utils.clip_grad_value_(ps, VALUE, foreach=True),
      "global_norm": lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True),
      "leaf_norm": leaf_norm,
      "block_rms": block_rms,
      "agc": agc,
      "autoclip": autoclip,
      "zclip": zclip,
  }


def torch_params(torch, params, grads):
  ps = []
  for w, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads)):
    p = torch.nn.Parameter(torch.from_numpy(np.array(w)))
    p.grad = torch.from_numpy(np.array(g))
    ps.append(p)
  return ps


# ------------------------------------------------------------------ the run


def run_shape(n_params: int, n_leaves: int, rounds: int, reps: int, use_torch: bool):
  """({(kind, library): median seconds per clip}, parameters in the tree): one interleaved run."""
  params = common.make_tree(n_params, n_leaves, seed=0)
  grads = common.make_tree(n_params, n_leaves, seed=1)
  fns: dict[tuple[str, str], Callable[[], object]] = {}
  for kind, libs in jax_variants().items():
    for lib, tx in libs.items():
      # Gradients and state donated and fed back: XLA may write in place, as
      # PyTorch clips p.grad in place (each call clips the previous output).
      step = jax.jit(tx.update, donate_argnums=(0, 1))
      holder = [jax.tree.map(jax.numpy.copy, grads), tx.init(params)]

      def call(step=step, holder=holder):
        holder[0], holder[1] = step(holder[0], holder[1], params)
        return holder[0]

      fns[(kind, lib)] = call
  if use_torch:
    import torch

    ps = torch_params(torch, params, grads)
    for kind, f in torch_variants(torch).items():

      def torch_call(f: Callable[[Any], None] = f) -> None:
        f(ps)

      fns[(kind, "torch")] = torch_call
  for kind, lib in fns:  # past ZClip's 25 warm-up steps, so that its clipping rule runs
    if kind == "zclip":
      for _ in range(30):
        common.block(fns[(kind, lib)]())
  actual = sum(x.size for x in jax.tree.leaves(params))
  return common.interleaved(fns, rounds=rounds, reps=reps), actual


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  common.add_grid_args(ap, sizes="1e6,8e6,32e6", leaves="8,100,1000", rounds=7, reps=2)
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args(argv)
  use_torch = not args.skip_torch and torch_available() and jax.default_backend() == "cpu"
  print(
      f"machine: {common.machine()}"
      + (f", torch {__import__('torch').__version__}" if use_torch else ", PyTorch not timed")
      + "\n"
  )
  print("| params | leaves | kind | clipjax (ms) | optax / clipjax | torch / clipjax |")
  print("|---:|---:|---|---:|---:|---:|")
  for size, leaves in common.grid(args):
    t, actual = run_shape(size, leaves, args.rounds, args.reps, use_torch)
    for kind in jax_variants():
      base = t[(kind, "clipjax")]
      ratio = {
          lib: (f"{t[(kind, lib)] / base:.2f}x" if (kind, lib) in t else "—")
          for lib in ("optax", "torch")
      }
      print(
          f"| {actual / 1e6:.2f}M | {leaves} | {kind} | {base * 1e3:.3f} | "
          f"{ratio['optax']} | {ratio['torch']} |",
          flush=True,
      )


if __name__ == "__main__":
  main()
