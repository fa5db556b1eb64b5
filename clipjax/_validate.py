"""Validation of static hyperparameters and of the gradient pytree.

Hyperparameters are checked in Python when the transform is built, so bad
input fails with a ValueError naming the argument instead of a silent NaN.
Traced values (e.g. from ``optax.inject_hyperparams`` inside ``jit``) cannot
be inspected and are passed through unchanged.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, get_args

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import _axes
from clipjax._types import Implementation, NonFinite

NONFINITE_POLICIES = get_args(NonFinite)


def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def is_real(value: Any) -> bool:
  """Whether `value` is a real (integer or floating, not bool, complex or text)
  number or array of them; traced values included."""
  if value is None or isinstance(value, (str, bytes)):
    return False
  try:
    dtype = jnp.result_type(value)
  except (TypeError, ValueError):
    return False
  return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def scalar(
    value: Any,
    name: str,
    *,
    low: float | None = 0.0,
    low_inclusive: bool = True,
    high: float | None = None,
    high_inclusive: bool = True,
) -> Any:
  """Checks that `value` is a finite real scalar within [low, high].

  Returns the value unchanged (Python number or array) so that it can still be
  traced by ``optax.inject_hyperparams``.
  """
  if is_traced(value):
    return value
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a real number, got a bool ({value!r}).")
  try:
    arr = np.asarray(value)
  except Exception as e:  # noqa: BLE001 - anything unconvertible is a type error
    raise TypeError(f"{name} must be a real number, got {value!r}.") from e
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}.")
  if not is_real(arr):
    raise TypeError(f"{name} must be a real number, got {value!r} of dtype {arr.dtype}.")
  v = float(arr)
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}.")
  if low is not None and (v < low or (v == low and not low_inclusive)):
    op = ">=" if low_inclusive else ">"
    raise ValueError(f"{name} must be {op} {low}, got {v}.")
  if high is not None and (v > high or (v == high and not high_inclusive)):
    op = "<=" if high_inclusive else "<"
    raise ValueError(f"{name} must be {op} {high}, got {v}.")
  return value


def integer(value: Any, name: str, *, low: int = 1, high: int | None = None) -> int:
  """A static Python int in [low, high] (sizes of buffers: never traced)."""
  if is_traced(value):
    raise ValueError(
        f"{name} sets an array size and must be a static int; with "
        f"optax.inject_hyperparams pass static_args=('{name}',)."
    )
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}.")
  if high is not None and value > high:
    raise ValueError(f"{name} must be <= {high}, got {value}.")
  return int(value)


def norm_ord(ord: Any, name: str = "ord") -> float:  # noqa: A002 - mirrors numpy's name
  """Returns the norm order as a float: any p >= 1 or inf (None means 2)."""
  if ord is None:
    return 2.0
  if is_traced(ord):
    raise ValueError(
        f"{name} must be a static Python number; with optax.inject_hyperparams "
        f"pass static_args=('{name}',)."
    )
  if isinstance(ord, (bool, np.bool_)):  # (float(True) is 1: a p = 1 nobody meant)
    raise ValueError(f"{name} must be a number >= 1 or inf, got the bool {ord!r}.")
  if isinstance(ord, str):
    if ord.lower() in ("inf", "infinity"):
      return math.inf
    raise ValueError(f"{name} must be a number >= 1 or inf, got {ord!r}.")
  try:
    p = float(np.asarray(ord))
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{name} must be a number >= 1 or inf, got {ord!r}.") from e
  if math.isnan(p) or p < 1:
    raise ValueError(f"{name} must be a number >= 1 or inf, got {ord!r}.")
  return p


def axis_name(value: Any, name: str = "axis_name") -> Any:
  """'auto', None, a mapped-axis name, a tuple of names, a PartitionSpec prefix tree
  of the updates, or a callable giving names or specs per leaf (see clipjax._axes)."""
  names_ok = _axes.is_axis_name(value) and value != () and value != ""
  if isinstance(value, tuple):
    names_ok = names_ok and "" not in value
  if callable(value) or names_ok or _axes.is_spec_tree(value):
    return value
  raise ValueError(
      f"{name} must be 'auto', None, an axis name, a non-empty tuple of axis names, a "
      "PartitionSpec (or a pytree of them, one per leaf or subtree), or a function of the "
      f"updates returning one of those per leaf (None per replicated leaf); got {value!r}."
  )


def transformation(value: Any, name: str) -> None:
  """TypeError unless `value` is an optax GradientTransformation (has init and update)."""
  if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
    raise TypeError(
        f"{name} must be an optax.GradientTransformation (with init and update), " f"got {value!r}."
    )


def nonfinite_policy(policy: Any) -> NonFinite:
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}.")
  return policy


IMPLEMENTATIONS = get_args(Implementation)


def implementation(value: Any, who: str) -> Implementation:
  """The deprecated ``implementation=`` of `who`: 'auto' when not given (None).

  Given, it still works for this release, with a DeprecationWarning: the norms
  are computed one way on every backend, and the forms are clipjax's business
  (`clipjax._forms`).
  """
  if value is None:
    return "auto"
  if value not in IMPLEMENTATIONS:  # (numbers and other types included)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {value!r}.")
  warnings.warn(
      f"{who}: implementation= is deprecated and will be removed in the next release "
      "(the norms are computed one way on every backend); drop the argument.",
      DeprecationWarning,
      stacklevel=3,
  )
  return value


def norm_dtype(dtype: Any, name: str = "norm_dtype") -> jnp.dtype:
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{name} must be a floating dtype, got {dtype!r}.") from e
  if not jnp.issubdtype(dt, jnp.floating) or dt.itemsize < 4:
    raise ValueError(
        f"{name} must be a floating dtype of at least 32 bits (float32 or float64), got {dt}."
    )
  if dt.itemsize > 4 and not jax.config.read("jax_enable_x64"):
    raise ValueError(f"{name}={dt} needs jax_enable_x64; enable it or use float32.")
  return dt


def check_gradient_leaves(tree: Any, who: str) -> None:
  """Raises TypeError for leaves that cannot be gradients (called at trace time)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      raise TypeError(
          f"{who}: leaf {jax.tree_util.keystr(path)} is {type(leaf).__name__}, "
          "not an array; gradients must be floating-point arrays."
      )
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{who}: leaf {jax.tree_util.keystr(path)} has dtype {dtype}; gradients "
          "must be floating point (mask integer leaves out with optax.masked)."
      )
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(
          f"{who}: leaf {jax.tree_util.keystr(path)} is complex ({dtype}); "
          "complex gradients are not supported."
      )
    pending = _axes.unreduced(leaf)
    if pending:
      raise ValueError(
          f"{who}: leaf {jax.tree_util.keystr(path)} is unreduced over "
          f"{', '.join(map(repr, sorted(pending)))} (its sum over the devices is still "
          "pending), and a norm needs the sum: reduce it first, with "
          "jax.sharding.reshard(g, its PartitionSpec without unreduced) under jit, or "
          "jax.lax.psum inside shard_map."
      )
