"""Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipjax import _clipper, _norms, _validate


def _unit_axes(x: jax.Array, axis: Any, path: str) -> tuple[int, ...] | None:
  """The axes AGC reduces over for a leaf; None means the whole leaf."""
  if axis is not None and x.ndim >= 2:
    # An explicit axis is taken as given, as optax does: a (1, 8) kernel has 8
    # units when axis=0, not one (squeezing first would merge them).
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
      if not -x.ndim <= a < x.ndim:
        raise ValueError(
            f"adaptive_grad_clip: axis={axis} is out of range for leaf {path} of shape {x.shape}.")
    return tuple(a % x.ndim for a in axes)
  if jnp.squeeze(x).ndim <= 1:  # scalars, vectors (biases, gains)
    return None
  if x.ndim in (2, 3):  # dense (in, out) or multi-head (in, heads, out): per output unit
    return (0,)
  if x.ndim == 4:  # conv kernels HWIO: per output channel
    return (0, 1, 2)
  raise ValueError(
      f"adaptive_grad_clip: leaf {path} has rank {x.ndim} (shape {x.shape}); the default "
      "units are defined for ranks 0-4. Pass axis= to say which axes form a unit.")


def adaptive_grad_clip(
    clipping: Any,
    *,
    eps: Any = 1e-3,
    axis: Any = None,
    nonfinite: str = "propagate",
    norm_dtype: Any = "float32",
    axis_name: _norms.AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each unit's gradient relative to the norm of its parameters.

  For every unit :math:`i` (an output neuron / channel; a whole vector or scalar
  leaf):

  .. math::
    g_i \leftarrow g_i \cdot \min\left(1, \lambda\,
      \frac{\max(\|W_i\|, \epsilon)}{\|g_i\|}\right)

  Units follow optax/NFNets: rank <= 1 (after squeezing) is one unit; rank 2
  and 3 reduce over axis 0 (dense ``(in, out)`` and multi-head kernels); rank 4
  over ``(0, 1, 2)`` (HWIO conv). Other ranks need `axis`. An explicit `axis`
  applies to every leaf of rank >= 2 as it is, without squeezing (a ``(1, 8)``
  kernel with ``axis=0`` has 8 units).

  Args:
    clipping: the ratio :math:`\lambda` > 0 (NFNets use 0.01 to 0.16).
    eps: floor on the parameter norm, > 0, so zero-initialised units can move.
    axis: int or tuple of ints: the axes that are reduced for rank >= 2 leaves,
      overriding the defaults above.
    nonfinite: ``'propagate'``, ``'zero'``, ``'skip'`` or ``'raise'``.
    norm_dtype: accumulation dtype (float32 default).
    axis_name: inside ``shard_map``, the mapped axes that each leaf's *reduced*
      axes (the ones forming a unit) are sharded over, so that unit norms of
      gradients and parameters are all-reduced; or a function of the updates
      giving them per leaf (None: the leaf's units are whole on every shard,
      e.g. replicated, or sharded along the output axis). The reported
      ``pre_clip_norm`` combines the units a shard holds.

  Returns:
    A ``GradientTransformationExtraArgs`` that needs ``params`` in ``update``;
    its :class:`clipjax.ClipState` holds the global L2 norm before clipping and
    the smallest unit scale.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.adaptive_grad_clip(0.1)
    >>> params = {'w': jnp.ones((2, 2))}            # unit (column) norms sqrt(2)
    >>> grads = {'w': jnp.array([[3.0, 0.0], [4.0, 0.1]])}
    >>> u, _ = tx.update(grads, tx.init(params), params)
    >>> [round(float(v), 4) for v in jnp.linalg.norm(u['w'], axis=0)]
    [0.1414, 0.1]

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
  """
  _validate.scalar(clipping, "clipping", low=0.0, low_inclusive=False)
  _validate.scalar(eps, "eps", low=0.0, low_inclusive=False)
  if axis is not None and not (
      isinstance(axis, int) or (isinstance(axis, tuple) and all(isinstance(a, int) for a in axis))):
    raise TypeError(
        f"axis must be None, an int or a tuple of ints, got {axis!r} (with "
        "optax.inject_hyperparams, list 'axis' in static_args).")
  policy = _validate.nonfinite_policy(nonfinite)
  dtype = _validate.norm_dtype(norm_dtype)
  _validate.axis_name(axis_name)

  def clip_fn(updates, params):
    g_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
    g_leaves = [g for _, g in g_paths]
    w_leaves = treedef.flatten_up_to(params)
    mapped = _norms.leaf_axes(axis_name, updates, "adaptive_grad_clip")
    units = []
    for (path, g), w in zip(g_paths, w_leaves):
      if w.shape != g.shape:
        raise ValueError(
            f"adaptive_grad_clip: params and updates differ at {jax.tree_util.keystr(path)}: "
            f"{w.shape} vs {g.shape}.")
      units.append(_unit_axes(g, axis, jax.tree_util.keystr(path)))
    # The unit norms of every gradient and parameter leaf as one flat vector (one
    # branch on CPU), and the scales computed on it in one go: a few operations
    # for the whole tree, not a few per leaf (XLA's compile time counts them).
    flat = _norms.flat_norms(g_leaves + w_leaves, 2.0, dtype, mapped + mapped, units + units)
    half = flat.r.size // 2
    g_norm = _norms.Split(flat.r[:half], flat.e[:half])
    w_norm = _norms.Split(flat.r[half:], flat.e[half:]).value()
    acc = flat.r.dtype
    limit = _clipper.hyper(clipping, acc) * jnp.maximum(w_norm, _clipper.hyper(eps, acc))
    f1, f2, clipped = _norms.clip_factors(limit, g_norm)
    shapes = [_norms.reduced_shape(g.shape, u, True) for g, u in zip(g_leaves, units)]
    new = [_clipper.scale_leaf(g, a, b) for g, a, b in
           zip(g_leaves, _norms.unflatten(f1, shapes), _norms.unflatten(f2, shapes))]
    total = _norms.combine(g_norm, 2.0)
    min_scale = jnp.min(f1 * f2, initial=1.0)
    return jax.tree.unflatten(treedef, new), total, min_scale, jnp.any(clipped)

  return _clipper.make_clipper("adaptive_grad_clip", clip_fn, policy, needs_params=True)
