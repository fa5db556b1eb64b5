"""Clipping by the global norm of all leaves (PyTorch ``clip_grad_norm_``)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from clipjax import _clipper, _norms, _validate


def clip_by_global_norm(
    max_norm: Any,
    *,
    ord: Any = None,  # noqa: A002 - numpy/PyTorch name
    nonfinite: str = "propagate",
    norm_dtype: Any = "float32",
    axis_name: _norms.AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales all updates together when their global norm exceeds `max_norm`.

  .. math::
    g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\|g\|_p}\right)

  The updates are left untouched when the norm is at most `max_norm`, as in
  PyTorch's ``clip_grad_norm_`` (which adds 1e-6 to the norm; we divide
  exactly). Unlike optax and PyTorch, the norm is accumulated in float32 (or
  `norm_dtype`) whatever the gradient dtype and is overflow-safe: fp16
  gradients of 300 or fp32 gradients of 1e20 are clipped to the right norm and
  direction instead of being zeroed. Each leaf keeps its dtype.

  Args:
    max_norm: the largest allowed global norm, >= 0 (0 zeroes every update).
      May be scheduled with ``optax.inject_hyperparams``.
    ord: the norm's order: any p >= 1, or ``inf`` (max-abs); None means 2.
      Static: with ``optax.inject_hyperparams`` list it in ``static_args``.
    nonfinite: what to do when the gradients hold inf/NaN: ``'propagate'``,
      ``'zero'``, ``'skip'`` or ``'raise'`` (see :func:`clipjax.chain`).
    norm_dtype: accumulation dtype, float32 (default) or float64 under x64.
    axis_name: inside ``shard_map``/``pmap`` over gradients sharded along this
      mapped axis (or tuple of axes), reduce the norm across it so it is truly
      global. Leave it ``None`` under plain ``jit`` with sharded arrays (XLA
      reduces). When only some leaves are sharded, pass a function of the
      updates that returns a pytree of the same structure holding, per leaf,
      the axes that leaf is sharded over, or None for a leaf that is replicated
      (the same on every shard; summing it over shards would count it once per
      shard), e.g. ``lambda g: {'w': 'model', 'b': None}``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`clipjax.ClipState` (pre-clip norm, scale, clipped flag, counts).

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> tx = clipjax.clip_by_global_norm(1.0)
    >>> grads = {'w': jnp.array([3.0, 4.0])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates['w']
    Array([0.6, 0.8], dtype=float32)
    >>> float(state.pre_clip_norm), bool(state.clipped)
    (5.0, True)
    >>> huge = {'w': jnp.array([3e20, 4e20], jnp.float32)}  # optax: zeros
    >>> tx.update(huge, tx.init(huge))[0]['w'].round(6)
    Array([0.6, 0.8], dtype=float32)
    >>> opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3))

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  _validate.scalar(max_norm, "max_norm", low=0.0)
  p = _validate.norm_ord(ord)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)

  def clip_fn(updates, params):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _norms.leaf_axes(axis_name, updates, "clip_by_global_norm")
    norm = _norms.tree_norms(leaves, p, dtype, axes)
    new, scale, clipped = _clipper.scale_to_threshold(leaves, norm,
                                                      _clipper.hyper(max_norm, norm.r.dtype))
    return jax.tree.unflatten(treedef, new), norm, scale, clipped

  return _clipper.make_clipper("clip_by_global_norm", clip_fn, policy)
