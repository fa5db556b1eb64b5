"""The tree API: global and per-leaf norms of a pytree (public `global_norm`, `leaf_norms`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clipjax import _axes, _forms, _validate
from clipjax._forms import Forms
from clipjax._numerics.split import Split
from clipjax._numerics.sums import flat_norms, tree_norms
from clipjax._types import AxisSpec, DTypeLike, Implementation, Ord, PyTree


def tree_global_norm(
    tree: PyTree,
    who: str,
    axis_name: AxisSpec = None,
    p: float = 2.0,
    dtype: DTypeLike = jnp.float32,
    *,
    forms: Forms,
) -> tuple[list[jax.Array], Any, Split]:
  """Checks `tree`'s leaves; returns (leaves, treedef, their global p-norm as a Split)."""
  _validate.check_gradient_leaves(tree, who)
  leaves, treedef = jax.tree.flatten(tree)
  axes = _axes.leaf_axes(axis_name, tree, who)
  return leaves, treedef, tree_norms(leaves, p, dtype, axes, forms)


def _public_norm_args(
    p: Ord, dtype: DTypeLike, axis_name: AxisSpec, implementation: Any, who: str
) -> tuple[float, jnp.dtype, Implementation]:
  """Validates the arguments of `global_norm` and `leaf_norms`."""
  _validate.axis_name(axis_name)
  return (
      _validate.norm_ord(p, "p"),
      _validate.norm_dtype(dtype, "dtype"),
      _validate.implementation(implementation, who),
  )


def global_norm(
    tree: PyTree,
    p: Ord = 2.0,
    dtype: DTypeLike = jnp.float32,
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> jax.Array:
  """Overflow-safe global p-norm of a pytree (float32 accumulation by default).

  Exact over the whole float range for every p >= 1: the result is inf only
  when the norm itself exceeds the accumulation dtype's range.

  Args:
    tree: a pytree of floating-point arrays.
    p: the norm's order, any p >= 1 or inf.
    dtype: accumulation dtype (float32, or float64 under x64; float64 leaves
      are accumulated in float64 in any case).
    axis_name: as in :func:`clipjax.clip_by_global_norm`: inside
      ``shard_map``, the mapped axes the leaves are sharded over (or a function
      of the tree giving them per leaf, None for replicated leaves).
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Raises:
    ValueError: `p` below 1 or not a number; TypeError for non-float leaves.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> norm = clipjax.global_norm({'a': jnp.array([3e20]), 'b': jnp.array([4e20])})
    >>> round(float(norm) / 1e20, 6)  # optax.tree.norm: inf
    5.0
    >>> float(clipjax.global_norm({'a': jnp.array([3.0, 4.0])}, p=200))
    4.0
  """
  p, dtype, impl = _public_norm_args(p, dtype, axis_name, implementation, "global_norm")
  forms = _forms.for_trace(impl)
  return tree_global_norm(tree, "global_norm", axis_name, p, dtype, forms=forms)[2].value()


def leaf_norms(
    tree: PyTree,
    p: Ord = 2.0,
    dtype: DTypeLike = jnp.float32,
    axis_name: AxisSpec = None,
    implementation: Implementation | None = None,
) -> PyTree:
  """Overflow-safe p-norm of each leaf of a pytree, as a pytree of scalars.

  The per-leaf counterpart of :func:`global_norm`, with the same guarantees
  and arguments: exact over the whole float range for every p >= 1 (inf only
  where a leaf's norm exceeds the accumulation dtype's range), all leaves
  reduced together (one branch on CPU, not one per leaf).

  Args:
    tree: a pytree of floating-point arrays.
    p: the norm's order, any p >= 1 or inf.
    dtype: accumulation dtype (float32, or float64 under x64; float64 leaves
      are accumulated in float64 in any case).
    axis_name: as in :func:`global_norm`.
    implementation: deprecated, removed in the next release (a
      DeprecationWarning when given): the norms are computed one way on
      every backend.

  Returns:
    A pytree with the structure of `tree` whose leaves are the norms, scalars
    of the accumulation dtype.

  Raises:
    ValueError: `p` below 1 or not a number; TypeError for non-float leaves.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> norms = clipjax.leaf_norms({'a': jnp.array([3e20, 4e20]), 'b': jnp.array([1.0])})
    >>> round(float(norms['a']) / 1e20, 6), float(norms['b'])  # jnp.linalg.norm: inf, 1.0
    (5.0, 1.0)
  """
  p, dtype, impl = _public_norm_args(p, dtype, axis_name, implementation, "leaf_norms")
  _validate.check_gradient_leaves(tree, "leaf_norms")
  leaves, treedef = jax.tree.flatten(tree)
  norms = flat_norms(
      leaves,
      p,
      dtype,
      _axes.leaf_axes(axis_name, tree, "leaf_norms"),
      [None] * len(leaves),
      _forms.for_trace(impl),
  ).value()
  return jax.tree.unflatten(treedef, list(norms))
