"""Shared plumbing of the stateless clippers: validation, policy, state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipjax import _norms, _policy, _state, _validate

# clip_fn(updates, params) -> (clipped updates, pre-clip norm, scale, clipped flag)
ClipFn = Callable[[Any, Any], tuple[Any, jax.Array, jax.Array, jax.Array]]


def scale_leaf(u: jax.Array, scale: jax.Array) -> jax.Array:
  """u * scale computed in the wider of the two dtypes, returned in u's dtype."""
  ct = jnp.promote_types(u.dtype, scale.dtype)
  return (u.astype(ct) * scale.astype(ct)).astype(u.dtype)


def safe_ratio(num, den, use):
  """num / den where `use`, else 1; never divides by a value `use` rules out."""
  return jnp.where(use, num / jnp.where(use, den, 1), jnp.ones_like(den))


def clip_each_leaf(leaves, treedef, norms, measure, limit, p: float, dtype):
  """Scales leaf i by min(1, limit / measure[i]), all scales computed at once.

  Returns clip_fn's (updates, global p-norm from `norms`, smallest scale,
  clipped). The barrier keeps XLA from recomputing the scales' few elementwise
  operations inside every leaf's scaling loop (compile time grew fast with the
  number of leaves).
  """
  scales = jax.lax.optimization_barrier(safe_ratio(limit, measure, measure > limit))
  new = [scale_leaf(u, scales[i]) for i, u in enumerate(leaves)]
  min_scale = jnp.min(scales, initial=1.0)
  return (jax.tree.unflatten(treedef, new), _norms.combine_norms([norms], p, dtype), min_scale,
          min_scale < 1)


def scale_to_threshold(leaves, norm, threshold):
  """Scales all leaves by min(1, threshold / norm). Returns (leaves, scale, clipped)."""
  clipped = norm > threshold
  scale = safe_ratio(threshold, norm, clipped)
  return [scale_leaf(u, scale) for u in leaves], scale, clipped


def flat_global_norm(updates, who: str, axis_name: _norms.AxisSpec):
  """Validates `updates`; returns (leaves, treedef, float32 global L2 norm)."""
  _validate.check_gradient_leaves(updates, who)
  leaves, treedef = jax.tree.flatten(updates)
  axes = _norms.leaf_axes(axis_name, updates, who)
  _, norm = _norms.tree_norms(leaves, 2.0, jnp.float32, axes)
  return leaves, treedef, norm


def clip_to_threshold(state, leaves, treedef, norm, threshold, policy: str, who: str):
  """Scales to `threshold`, applies the non-finite policy; returns (updates, ClipState fields)."""
  finite = jnp.isfinite(norm)
  new, scale, clipped = scale_to_threshold(leaves, norm, threshold)
  new, skipped = _policy.apply_policy(policy, jax.tree.unflatten(treedef, new), finite, who)
  clip = _state.next_clip_state(state, norm=norm, scale=scale, clipped=clipped, finite=finite,
                                skipped=skipped)
  return new, clip


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
    _validate.check_gradient_leaves(updates, name)
    if needs_params and params is None:
      raise ValueError(f"{name} needs the current parameters: call update(updates, state, params).")
    clipped_updates, norm, scale, clipped = clip_fn(updates, params)
    finite = jnp.isfinite(norm)
    clipped_updates, skipped = _policy.apply_policy(nonfinite, clipped_updates, finite, name)
    new_state = _state.next_clip_state(
        state, norm=norm, scale=scale, clipped=clipped, finite=finite, skipped=skipped)
    return clipped_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
