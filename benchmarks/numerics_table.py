"""Side-by-side numerics: clipjax vs optax vs PyTorch clip_grad_norm_ on hard inputs.

For each case prints the reported norm and the norm and direction error of the
clipped update (max_norm = 1). PyTorch is skipped if not installed.

    python -m benchmarks.numerics_table
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

import clipjax

CASES = {
    "fp16, 2048 entries of +-300": (np.float16, 300.0, 2048),
    "bf16, 2048 entries of +-1e20": (jnp.bfloat16, 1e20, 2048),
    "fp32, 1000 entries of +-1e20": (np.float32, 1e20, 1000),
    "fp32, 1000 entries of +-1e-25 (max_norm 1e-26)": (np.float32, 1e-25, 1000),
    "fp32, 1 entry of 1e38": (np.float32, 1e38, 1),
    "fp32, 2 entries of +-3e38 (norm beyond float32)": (np.float32, 3e38, 2),
}


def _signs(n):
  return np.where(np.random.default_rng(0).random(n) < 0.5, -1.0, 1.0)


def _describe(out, g, max_norm):
  o = np.asarray(out, np.float64)
  if not np.all(np.isfinite(o)):
    return "non-finite update"
  n = np.linalg.norm(o)
  if n == 0:
    return "update zeroed"
  gd = np.asarray(g, np.float64)
  cos_err = np.linalg.norm(o / n - gd / np.linalg.norm(gd))
  return f"norm error {abs(n - max_norm) / max_norm:.1e}, direction error {cos_err:.1e}"


def main():
  print("| case | clipjax | optax.clip_by_global_norm | torch clip_grad_norm_ |")
  print("|---|---|---|---|")
  for name, (dtype, mag, n) in CASES.items():
    max_norm = 1e-26 if mag < 1 else 1.0
    g = jnp.asarray(_signs(n) * mag, dtype)
    ours = clipjax.clip_by_global_norm(max_norm)
    out, st = ours.update({"g": g}, ours.init({"g": g}))
    a = f"norm {float(st.pre_clip_norm):.3g}; {_describe(out['g'], g, max_norm)}"
    theirs = optax.clip_by_global_norm(max_norm)
    out_o, _ = theirs.update({"g": g}, theirs.init({"g": g}))
    b = f"norm {float(optax.tree.norm({'g': g})):.3g}; {_describe(out_o['g'], g, max_norm)}"
    try:
      import torch

      tdtype = {np.float16: torch.float16, np.float32: torch.float32}.get(dtype, torch.bfloat16)
      t = torch.tensor(np.asarray(g, np.float32)).to(tdtype).requires_grad_()
      t.grad = t.detach().clone()
      tn = torch.nn.utils.clip_grad_norm_([t], max_norm)
      c = f"norm {float(tn):.3g}; {_describe(t.grad.float().numpy(), g, max_norm)}"
    except ImportError:
      c = "(torch not installed)"
    print(f"| {name} | {a} | {b} | {c} |")


if __name__ == "__main__":
  main()
