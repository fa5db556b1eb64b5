"""Clipping each leaf by its own norm (Keras ``clipnorm``, ``tf.clip_by_norm``)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from clipjax import _clipper, _norms, _validate


def clip_by_norm(
    max_norm: Any,
    *,
    ord: Any = None,  # noqa: A002
    nonfinite: str = "propagate",
    norm_dtype: Any = "float32",
    axis_name: _norms.AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each leaf separately so that its norm is at most `max_norm`.

  .. math::
    g_i \leftarrow g_i \cdot \min\left(1, \frac{\text{max\_norm}}{\|g_i\|_p}\right)

  Norms are float32-accumulated and overflow-safe (see
  :func:`clipjax.clip_by_global_norm`).

  Args:
    max_norm: the largest allowed norm of each leaf, >= 0.
    ord: the norm's order: any p >= 1, or ``inf``; None means 2. Static.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    norm_dtype: accumulation dtype (float32 default).
    axis_name: mapped axes the leaves are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.

  Returns:
    A ``GradientTransformationExtraArgs``; its :class:`clipjax.ClipState`
    holds the global p-norm before clipping and the smallest per-leaf scale.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_norm(1.0)
    >>> g = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.5])}
    >>> u, s = tx.update(g, tx.init(g))
    >>> u['a'], u['b']
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    >>> round(float(s.clip_scale), 6)
    0.2

  References:
    Chollet et al., Keras ``Optimizer(clipnorm=...)``;
    ``tf.clip_by_norm``.
  """
  _validate.scalar(max_norm, "max_norm", low=0.0)
  p = _validate.norm_ord(ord)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)

  def clip_fn(updates, params):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _norms.leaf_axes(axis_name, updates, "clip_by_norm")
    norms = _norms.flat_norms(leaves, p, dtype, axes, [None] * len(leaves))
    return _clipper.clip_each_leaf(leaves, treedef, norms, norms,
                                   _clipper.hyper(max_norm, norms.r.dtype), p)

  return _clipper.make_clipper("clip_by_norm", clip_fn, policy)
