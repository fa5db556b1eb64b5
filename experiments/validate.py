"""Checks a run's config before anything is written: `validate_config(config)`.

Every bad value gets one :class:`experiments.rundir.ConfigError` naming the
field (``config.optimizer.learning_rate must be ...``), so a launch fails before
it creates a workdir, writes config.json or compiles anything.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from experiments import data as data_lib
from experiments import models, optim
from experiments.rundir import ConfigError

TASKS = ("digit_sum", "adding", "temporal_order")
MIN_LENGTH = {"adding": 2, "temporal_order": 10}
REDUCTIONS = ("sum", "mean")
# jax.default_matmul_precision: "default" (backend's choice), "high", "highest" (float32).
MATMUL_PRECISIONS = ("default", "high", "highest")
SRN_INITS = ("zeros", "xavier")
OPTIMIZERS = ("sgd", "adam")
NONFINITE = ("propagate", "skip", "zero", "raise")


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(config, key: str, low: int) -> int:
  v = _get(config, key)
  if not _is_int(v) or v < low:
    raise ConfigError(f"config.{key} must be an integer >= {low}, got {v!r}.")
  return int(v)


def _positive(config, key: str, *, allow_zero: bool = False, below: float | None = None):
  v = _get(config, key)
  ok = _is_real(v) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
  if ok and below is not None:
    ok = v < below
  if not ok:
    bound = (">= 0" if allow_zero else "> 0") + (f" and < {below}" if below is not None else "")
    raise ConfigError(f"config.{key} must be a finite number {bound}, got {v!r}.")
  return float(v)


def _choice(config, key: str, choices) -> str:
  v = _get(config, key)
  if v not in choices:
    raise ConfigError(f"config.{key} must be one of {', '.join(map(repr, choices))}, got {v!r}.")
  return v


def _flag(config, key: str, default: bool | None = None) -> bool:
  """A True/False field; a missing one is `default`, or an error when that is None."""
  try:
    v = _get(config, key)
  except ConfigError:
    if default is None:
      raise
    v = default
  if not isinstance(v, bool):
    raise ConfigError(f"config.{key} must be True or False, got {v!r}.")
  return v


def _get(config, key: str):
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError):
      raise ConfigError(f"config.{key} is missing.") from None
  return node


def validate_config(config) -> None:
  """Raises ConfigError for the first field of `config` that cannot run."""
  task = _choice(config, "task", TASKS)
  length = _int(config, "length", 1)
  if task == "digit_sum" and length not in data_lib.NNDL_LENGTHS:
    raise ConfigError(
        f"config.length must be one of {data_lib.NNDL_LENGTHS} for digit_sum "
        f"(the book's data), got {length}."
    )
  if task in MIN_LENGTH and length < MIN_LENGTH[task]:
    raise ConfigError(f"config.length must be >= {MIN_LENGTH[task]} for {task}, got {length}.")
  _int(config, "data_seed", 0)
  _int(config, "seed", 0)
  if task != "digit_sum":
    _int(config, "n_train", 1)
    _int(config, "n_eval", 1)
  _int(config, "batch_size", 1)
  _int(config, "num_epochs", 1)
  _int(config, "eval_every", 0)
  _choice(config, "loss_reduction", REDUCTIONS)
  _choice(config, "matmul_precision", MATMUL_PRECISIONS)

  _choice(config, "model.cell", tuple(models.CELLS))
  _int(config, "model.embed_size", 1)
  _int(config, "model.hidden_size", 1)
  _choice(config, "model.srn_init", SRN_INITS)
  _flag(config, "model.freeze_embedding", default=False)  # (configs before it lack it)

  _choice(config, "optimizer.name", OPTIMIZERS)
  _positive(config, "optimizer.learning_rate")
  _positive(config, "optimizer.momentum", allow_zero=True, below=1.0)

  _choice(config, "clip.name", ("none", *optim.CLIPPERS))
  threshold = _get(config, "clip.threshold")
  if not (_is_real(threshold) and math.isfinite(threshold)):
    raise ConfigError(f"config.clip.threshold must be a finite number, got {threshold!r}.")
  _choice(config, "clip.nonfinite", NONFINITE)
  _flag(config, "clip.skip_spikes")
  mesh = config.get("mesh", {}).get("data", 1)
  if not _is_int(mesh) or not (mesh == -1 or mesh >= 1):
    raise ConfigError(
        f"config.mesh.data must be -1 (all devices) or an integer >= 1, " f"got {mesh!r}."
    )
  if mesh > 0 and config.batch_size % mesh:
    raise ConfigError(
        f"config.batch_size ({config.batch_size}) must be divisible by "
        f"config.mesh.data ({mesh})."
    )
  halt = config.get("halt_after_step", -1)
  if not _is_int(halt):
    raise ConfigError(f"config.halt_after_step must be an integer, got {halt!r}.")
  # The clipper's own checks (its threshold's range, clip.kwargs): built once here.
  try:
    optim.make_optimizer(config)
  except (ValueError, TypeError) as e:
    field = "config.clip.kwargs" if "keyword argument" in str(e) else "config.clip"
    raise ConfigError(f"{field}: {e}") from None
