"""NumPy float64 references, written from the definitions (not from clipjax)."""

from __future__ import annotations

import math

import numpy as np


def pnorm(x: np.ndarray, p: float) -> float:
  x = np.abs(np.asarray(x, np.float64)).ravel()
  if x.size == 0:
    return 0.0
  if math.isinf(p):
    return float(x.max())
  m = x.max()
  if m == 0:
    return 0.0
  return float(m * np.sum((x / m) ** p) ** (1.0 / p))  # scaled: exact in float64 range


def global_norm(leaves, p=2.0) -> float:
  return pnorm(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves]), p)


def clip_by_value(leaves, delta):
  return [np.clip(np.asarray(x, np.float64), -delta, delta) for x in leaves]


def clip_by_norm(leaves, max_norm, p=2.0):
  out = []
  for x in leaves:
    n = pnorm(x, p)
    out.append(np.asarray(x, np.float64) * (max_norm / n if n > max_norm else 1.0))
  return out


def clip_by_global_norm(leaves, max_norm, p=2.0):
  n = global_norm(leaves, p)
  s = max_norm / n if n > max_norm else 1.0
  return [np.asarray(x, np.float64) * s for x in leaves]


def clip_by_group_norm(leaves, max_norm, groups, p=2.0):
  """Each group of leaves (groups[i]: leaf i's label) scaled by min(1, max_norm / its p-norm)."""
  out = []
  for x, label in zip(leaves, groups):
    n = global_norm([y for y, g in zip(leaves, groups) if g == label], p)
    out.append(np.asarray(x, np.float64) * (max_norm / n if n > max_norm else 1.0))
  return out


def clip_by_block_rms(leaves, threshold):
  out = []
  for x in leaves:
    x = np.asarray(x, np.float64)
    rms = math.sqrt(np.mean(x**2)) if x.size else 0.0
    out.append(x * (threshold / rms if rms > threshold else 1.0))
  return out


def _units(x: np.ndarray):
  """Reduction axes of AGC's units, from the NFNets definition."""
  if np.squeeze(x).ndim <= 1:
    return None
  return {2: (0,), 3: (0,), 4: (0, 1, 2)}[x.ndim]


def adaptive_grad_clip(grads, params, clipping, eps=1e-3, axis=None):
  """Each unit scaled to norm at most clipping * max(|w_unit|, eps).

  A unit spans `axis` (an int or a tuple) of every leaf, or by default the
  NFNets axes (`_units`).
  """
  out = []
  for g, w in zip(grads, params):
    g = np.asarray(g, np.float64)
    w = np.asarray(w, np.float64)
    axes = _units(g) if axis is None else axis
    gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    wn = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
    limit = clipping * np.maximum(wn, eps)
    scale = np.where(gn > limit, limit / np.where(gn > 0, gn, 1), 1.0)
    out.append(g * scale)
  return out


def per_example_clip(leaves, clip, per_layer=None, mean=False):
  """(clipped sum or mean of the examples, number of examples clipped).

  Every leaf has a leading batch axis. Each example is scaled to global norm at
  most `clip`, or with `per_layer`, each of its leaves to its budget: clip /
  sqrt(L) for L leaves ('uniform'), clip sqrt(D_i / D) by size ('proportional').
  """
  leaves = [np.asarray(x, np.float64) for x in leaves]
  batch = leaves[0].shape[0]
  sizes = [math.prod(x.shape[1:]) for x in leaves]
  if per_layer == "uniform":
    budgets = [clip / math.sqrt(len(leaves))] * len(leaves)
  else:
    budgets = [clip * math.sqrt(s / max(sum(sizes), 1)) for s in sizes]
  out = [np.zeros(x.shape[1:]) for x in leaves]
  clipped = 0
  for b in range(batch):
    ex = [x[b] for x in leaves]
    norms = [np.linalg.norm(e.ravel()) for e in ex]
    if per_layer is None:
      total = math.sqrt(sum(n**2 for n in norms))
      scales = [min(1.0, clip / total) if total > 0 else 1.0] * len(ex)
    else:
      scales = [min(1.0, c / n) if n > 0 else 1.0 for c, n in zip(budgets, norms)]
    clipped += any(s < 1 for s in scales)
    for i, (e, s) in enumerate(zip(ex, scales)):
      out[i] += e * s
  if mean:
    out = [o / batch for o in out]
  return out, clipped


def example_norms(leaves) -> np.ndarray:
  """Each example's global L2 norm (every leaf has a leading batch axis)."""
  leaves = [np.asarray(x, np.float64) for x in leaves]
  batch = leaves[0].shape[0]
  return np.sqrt(sum(np.sum(x.reshape(batch, -1) ** 2, axis=1) for x in leaves))


def per_example_clip_tree(per_example: dict, clip: float) -> tuple[dict, np.ndarray]:
  """The float64 clipped sum (a dict like the gradients) and each example's norm."""
  keys = sorted(per_example)
  leaves = [per_example[k] for k in keys]
  return dict(zip(keys, per_example_clip(leaves, clip)[0])), example_norms(leaves)
