"""Optimizer from config: sgd/adam, optionally behind any clipjax clipper by name."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import clipjax


def by_module(updates: Any) -> dict[str, str]:
  """Group labels for clip_by_group_norm: each top-level module (embedding, rnn, head) its own."""
  return {name: name for name in updates}


# name -> (factory, name of its main hyperparameter, set by config.clip.threshold)
CLIPPERS: dict[str, tuple[Any, str]] = {
    "value": (clipjax.clip_by_value, "max_delta"),
    "norm": (clipjax.clip_by_norm, "max_norm"),
    "global_norm": (clipjax.clip_by_global_norm, "max_norm"),
    "group_norm": (functools.partial(clipjax.clip_by_group_norm, labels=by_module), "max_norm"),
    "block_rms": (clipjax.clip_by_block_rms, "threshold"),
    "agc": (clipjax.adaptive_grad_clip, "clipping"),
    "autoclip": (clipjax.autoclip, "percentile"),
    "zclip": (clipjax.zclip, "z_thresh"),
    "adagc": (clipjax.adagc, "lambda_abs"),
    # A wrapper around the optimizer, not a link before it (see make_optimizer).
    "spam": (clipjax.spam, "theta"),
}

# Clippers that wrap the base optimizer (factory(base, threshold=..., **kwargs)).
WRAPPERS = ("spam",)


def threshold_arg(name: str) -> str:
  """The name of the hyperparameter that config.clip.threshold sets for clipper `name`."""
  return CLIPPERS[name][1]


def make_clipper(name: str, threshold: Any, **kwargs) -> optax.GradientTransformation | None:
  """The clipper called `name` with its main hyperparameter set to `threshold` (may be traced)."""
  if name in ("none", "", None):
    return None
  if name not in CLIPPERS:
    raise ValueError(f"clip.name must be 'none' or one of {sorted(CLIPPERS)}, got {name!r}.")
  if name in WRAPPERS:
    raise ValueError(f"clip.name={name!r} wraps the optimizer: build it with make_optimizer.")
  factory, arg = CLIPPERS[name]
  return factory(**{arg: threshold}, **kwargs)


def wrap_base(
    name: str, base: optax.GradientTransformation, optimizer: str, threshold: Any, **kwargs
) -> optax.GradientTransformationExtraArgs:
  """The wrapper clipper called `name` (e.g. SPAM) around `base`, built on `optimizer`."""
  if optimizer != "adam":
    # SPAM clips against Adam's second moment and resets its moments.
    raise ValueError(f"clip.name={name!r} needs optimizer.name='adam', got {optimizer!r}.")
  if "nonfinite" in kwargs:
    raise ValueError(
        f"clip.name={name!r} has no non-finite policy: leave clip.nonfinite at 'propagate'."
    )
  factory, arg = CLIPPERS[name]
  return factory(base, **{arg: threshold}, **kwargs)


def make_base(name: str, learning_rate: Any, momentum: float = 0.0) -> optax.GradientTransformation:
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"optimizer.name must be 'sgd' or 'adam', got {name!r}.")


class RecordNormsState(NamedTuple):
  """Per-leaf L2 norms of the updates that passed through (i.e. after clipping)."""

  clipped_grad_norms: Any


def record_norms() -> optax.GradientTransformation:
  """Identity that stores each leaf's L2 norm (float32, overflow-safe) in its state, for logging."""

  def init(params):
    return RecordNormsState(clipjax.leaf_norms(jax.tree.map(jnp.zeros_like, params)))

  def update(updates, state, params=None):
    del state, params
    return updates, RecordNormsState(clipjax.leaf_norms(updates))

  return optax.GradientTransformation(init, update)


def make_optimizer(config, threshold: Any = None) -> optax.GradientTransformationExtraArgs:
  """clipjax.chain(clipper, record_norms, base) from `config.optimizer` and `config.clip`.

  A wrapper clipper (clip.name='spam') wraps the rest instead:
  spam(clipjax.chain(record_norms, base)), so that record_norms sees the
  gradients after SPAM's element-wise clip, as it sees any clipper's output.

  With config.clip.skip_spikes, that chain is wrapped in clipjax.skip_spikes
  (fed the step's loss).

  `threshold` overrides config.clip.threshold (a traced value in vmapped sweeps).
  """
  clip_cfg = config.clip
  thr = clip_cfg.threshold if threshold is None else threshold
  kwargs = dict(clip_cfg.get("kwargs", {}) or {})
  if clip_cfg.get("nonfinite", "propagate") != "propagate":
    kwargs["nonfinite"] = clip_cfg.nonfinite
  base = make_base(
      config.optimizer.name, config.optimizer.learning_rate, config.optimizer.get("momentum", 0.0)
  )
  if clip_cfg.name in WRAPPERS:
    inner = clipjax.chain(record_norms(), base)
    opt = wrap_base(clip_cfg.name, inner, config.optimizer.name, thr, **kwargs)
  else:
    clipper = make_clipper(clip_cfg.name, thr, **kwargs)
    opt = clipjax.chain(*([clipper] if clipper is not None else []), record_norms(), base)
  if clip_cfg.get("skip_spikes", False):
    # Skip steps whose gradient norm or loss spikes; the clipper still runs on the others.
    return clipjax.skip_spikes(opt)
  return opt
