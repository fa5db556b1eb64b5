"""Shared plumbing of every clipper: hyperparameters, scaling, policy, state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipjax import _norms, _policy, _state, _validate

# clip_fn(updates, params) -> (clipped updates, pre-clip norm (a Split), scale, clipped)
ClipFn = Callable[[Any, Any], tuple[Any, jax.Array, jax.Array, jax.Array]]


def hyper(value, dtype, low: float | None = 0.0, high: float | None = None) -> jax.Array:
  """A (possibly traced) hyperparameter as a `dtype` scalar clamped into [low, high].

  Python values were validated at construction; a traced one (a schedule
  through ``optax.inject_hyperparams``) cannot be, so it is clamped instead: a
  max_norm scheduled below 0 acts as 0 rather than flipping the update's sign.
  NaN stays NaN; the clippers turn it into a non-finite step (see `poison`).
  """
  v = jnp.asarray(value, dtype)
  if low is not None:
    v = jnp.maximum(v, jnp.asarray(low, dtype))
  if high is not None:
    v = jnp.minimum(v, jnp.asarray(high, dtype))
  return v


def poison(x: jax.Array, *hypers) -> jax.Array:
  """x, or NaN where any of `hypers` is NaN: a NaN hyperparameter is never silently ignored."""
  bad = jnp.zeros([], jnp.bool_)
  for h in hypers:
    bad = bad | jnp.any(jnp.isnan(jnp.asarray(h)))
  return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def check_state(state, expected: type, who: str, buffer: tuple[str, str, int] | None = None):
  """Raises unless `state` is what this transform's init returned (at trace time).

  TypeError for another transform's state; ValueError when `buffer` =
  (field, argument, size) names a buffer whose length is not that argument's
  `size` (a state from the same transform built with another history length).
  """
  if type(state) is not expected:
    raise TypeError(
        f"{who}: got a state of type {type(state).__name__}, expected {expected.__name__}; "
        f"pass the state returned by this transform's init (or restored from it).")
  if buffer is not None:
    field, arg, size = buffer
    shape = getattr(state, field).shape
    if shape != (size,):
      raise ValueError(
          f"{who}: the state's {field} has shape {shape}, but this {who} has {arg}={size}; "
          f"pass the state its own init returned.")


def scale_leaf(u: jax.Array, f1: jax.Array, f2: jax.Array) -> jax.Array:
  """u * f2 * f1 computed in the wider of the dtypes, returned in u's dtype.

  f2 (from `_norms.clip_factors`) is a power of two at most 1, applied first:
  the two factors carry scales too small for one float (1 / 1e38) exactly.
  """
  ct = jnp.promote_types(u.dtype, f1.dtype)
  return (u.astype(ct) * f2.astype(ct) * f1.astype(ct)).astype(u.dtype)


def safe_ratio(num, den, use):
  """num / den where `use`, else 1; never divides by a value `use` rules out."""
  return jnp.where(use, num / jnp.where(use, den, 1), jnp.ones_like(den))


def clip_each_leaf(leaves, treedef, norms: _norms.Split, measure: _norms.Split, limit, p: float):
  """Scales leaf i by min(1, limit / measure[i]), all factors computed at once.

  Returns clip_fn's (updates, global p-norm from `norms`, smallest scale,
  clipped).
  """
  f1, f2, clipped = _norms.clip_factors(limit, measure)
  new = [scale_leaf(u, f1[i], f2[i]) for i, u in enumerate(leaves)]
  min_scale = jnp.min(f1 * f2, initial=1.0)
  return (jax.tree.unflatten(treedef, new), _norms.combine(norms, p), min_scale,
          jnp.any(clipped))


def scale_to_threshold(leaves, norm: _norms.Split, threshold):
  """Scales all leaves by min(1, threshold / norm). Returns (leaves, scale, clipped)."""
  f1, f2, clipped = _norms.clip_factors(threshold, norm)
  return [scale_leaf(u, f1, f2) for u in leaves], f1 * f2, clipped


def flat_global_norm(updates, who: str, axis_name: _norms.AxisSpec):
  """Validates `updates`; returns (leaves, treedef, global L2 norm as a Split)."""
  _validate.check_gradient_leaves(updates, who)
  leaves, treedef = jax.tree.flatten(updates)
  axes = _norms.leaf_axes(axis_name, updates, who)
  return leaves, treedef, _norms.tree_norms(leaves, 2.0, jnp.float32, axes)


def clip_to_threshold(state, leaves, treedef, norm: _norms.Split, threshold, policy: str,
                      who: str):
  """Scales to `threshold`, applies the non-finite policy; returns (updates, ClipState fields)."""
  new, scale, clipped = scale_to_threshold(leaves, norm, threshold)
  return apply_policy_and_count(state, jax.tree.unflatten(treedef, new), norm, scale, clipped,
                                policy, who)


def apply_policy_and_count(state, updates, norm: _norms.Split, scale, clipped, policy: str,
                           who: str):
  """The non-finite policy on clipped `updates`, and the next ClipState (fields)."""
  finite = norm.finite() & ~jnp.isnan(scale)  # a NaN threshold is a non-finite step
  updates, skipped = _policy.apply_policy(policy, updates, finite, who)
  return updates, _state.next_clip_state(state, norm=norm.value(jnp.float32), scale=scale,
                                         clipped=clipped, finite=finite, skipped=skipped)


def make_clipper(
    name: str,
    clip_fn: ClipFn,
    nonfinite: str,
    *,
    needs_params: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a clipper whose state is a :class:`clipjax.ClipState`."""

  def init_fn(params):
    del params
    return _state.init_clip_state()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_state(state, _state.ClipState, name)
    _validate.check_gradient_leaves(updates, name)
    if needs_params and params is None:
      raise ValueError(f"{name} needs the current parameters: call update(updates, state, params).")
    clipped_updates, norm, scale, clipped = clip_fn(updates, params)
    return apply_policy_and_count(state, clipped_updates, norm, scale, clipped, nonfinite, name)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
