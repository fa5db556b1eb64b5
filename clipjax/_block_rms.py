"""Clipping each leaf (block) by its root-mean-square value."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipjax import _clipper, _norms, _validate


def clip_by_block_rms(
    threshold: Any,
    *,
    nonfinite: str = "propagate",
    norm_dtype: Any = "float32",
    axis_name: _norms.AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales each leaf so that its RMS, :math:`\|g_i\|_2/\sqrt{n_i}`, is at most `threshold`.

  Scale-free across layer sizes, unlike :func:`clipjax.clip_by_norm`. The RMS
  of a zero-size leaf is 0.

  Args:
    threshold: the largest allowed RMS of each leaf, >= 0.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    norm_dtype: accumulation dtype (float32 default).
    axis_name: mapped axes the leaves are sharded over inside ``shard_map``,
      or a function of the updates giving them per leaf (None: replicated);
      see :func:`clipjax.clip_by_global_norm`.

  Returns:
    A ``GradientTransformationExtraArgs``; its :class:`clipjax.ClipState`
    holds the global L2 norm before clipping and the smallest per-leaf scale.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_block_rms(1.0)
    >>> g = {'w': jnp.array([2.0, -2.0, 2.0, -2.0])}  # RMS 2
    >>> tx.update(g, tx.init(g))[0]['w']
    Array([ 1., -1.,  1., -1.], dtype=float32)

  References:
    ``optax.clip_by_block_rms``; Shazeer & Stern, `Adafactor
    <https://arxiv.org/abs/1804.04235>`_, 2018 (update clipping by RMS).
  """
  _validate.scalar(threshold, "threshold", low=0.0)
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)

  def clip_fn(updates, params):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _norms.leaf_axes(axis_name, updates, "clip_by_block_rms")
    norms = _norms.flat_norms(leaves, 2.0, dtype, axes, [None] * len(leaves))
    sizes = [u.size if a is None else jax.lax.psum(u.size, a) for u, a in zip(leaves, axes)]
    # The RMS of a zero-size leaf is 0 (its norm is 0): divide by 1 there.
    acc = norms.r.dtype
    roots = jnp.sqrt(jnp.maximum(jnp.stack([jnp.asarray(n, acc) for n in sizes]), 1)) \
        if sizes else jnp.ones((0,), acc)
    rms = _norms.Split(norms.r / roots, norms.e)
    return _clipper.clip_each_leaf(leaves, treedef, norms, rms, _clipper.hyper(threshold, acc),
                                   2.0)

  return _clipper.make_clipper("clip_by_block_rms", clip_fn, policy)
