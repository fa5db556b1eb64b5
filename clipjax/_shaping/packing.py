"""Small arrays packed into a few blocks, and arrays grouped for the rescue branch.

Each reduction of its own is a kernel launch and an output buffer, and XLA's
CPU compile time grows faster than linearly with their number (README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _axes
from clipjax._forms import Forms
from clipjax._shaping.arrays import Reduce, cast, concat, reduced_axes, reduced_shape, reshaped
from clipjax._types import AxisName, DTypeLike

# On CPU, arrays of at most _PACK_LEAF_ELEMENTS entries whose units are rows,
# and of at most _PACK_COLUMN_ELEMENTS whose units are not, are packed into
# blocks (see `packed`).
_PACK_LEAF_ELEMENTS = 2**11


_PACK_COLUMN_ELEMENTS = 2**10


# On a GPU, arrays of at most JOIN_ELEMENTS entries are reduced together,
# JOIN_ARRAYS at a time: XLA fuses a concatenation of that many into the
# reduction that reads it (no copy), but not one of 98 (GPT-2 small's vectors).
JOIN_ELEMENTS = 2**16
JOIN_ARRAYS = 64


def join_groups(
    xs: Sequence[jax.Array], axes: list[AxisName]
) -> tuple[list[tuple[AxisName, list[int]]], list[int]]:
  """The arrays of `xs` a GPU form reduces together, and the others.

  Groups (their mapped axes, their indices) of at most JOIN_ARRAYS arrays of
  at most JOIN_ELEMENTS entries with the same mapped axes; an array split by
  its type (an Explicit mesh) stays alone: joining it would gather it.
  """
  small: dict[Any, list[int]] = {}
  alone = []
  for i, (x, a) in enumerate(zip(xs, axes)):
    if x.size <= JOIN_ELEMENTS and not _axes.is_sharded(x):
      small.setdefault(a, []).append(i)
    else:
      alone.append(i)
  groups = [
      (a, idx[j : j + JOIN_ARRAYS])
      for a, idx in small.items()
      for j in range(0, len(idx), JOIN_ARRAYS)
  ]
  return groups, alone


def packed(
    xs: Sequence[jax.Array],
    red: Sequence[Reduce],
    axes: list[AxisName],
    dtype: DTypeLike,
    forms: Forms,
    blocks: Blocks | None = None,
) -> tuple[list[jax.Array], list[Reduce], list[AxisName], np.ndarray | None]:
  """On CPU, the small arrays of `xs` packed into blocks that hold their units.

  Returns (arrays, their reductions, their mapped axes, the permutation that
  takes the values of their units to the order of the units of `xs`, or None
  where that is the identity). The arrays of one kind (see `row_groups`)
  become one (A, R, B) or (A, R) block of `dtype` (their `_unit_block`s concatenated),
  reduced over its middle axis, in the place of the first of them; the other
  arrays are as they were.

  Each reduction of its own is a kernel launch and an output buffer, and XLA's
  CPU compile time grows faster than linearly with their number; the rescue
  branch reads the same blocks. The size limits are where the copy stops
  paying at run time (README.md has the measurements). Only with
  `Forms.packed`. The blocks are made by `blocks` (a fresh `Blocks` if None).
  """
  if not forms.packed:
    return list(xs), list(red), axes, None
  blocks = Blocks() if blocks is None else blocks
  packs = {m[0]: m for m in _packs(xs, red, axes)}
  in_packs = {i for m in packs.values() for i in m}
  starts = _unit_starts(xs, red)
  ys: list[jax.Array] = []
  red_y: list[Reduce] = []
  axes_y: list[AxisName] = []
  position = []
  for i, x in enumerate(xs):
    if i in packs:
      ys.append(blocks.block([xs[j] for j in packs[i]], [red[j] for j in packs[i]], dtype))
      red_y.append(1)
    elif i not in in_packs:
      ys.append(x)
      red_y.append(red[i])
    else:
      continue
    axes_y.append(axes[i])
    position += [np.arange(starts[j], starts[j + 1]) for j in packs.get(i, [i])]
  return ys, red_y, axes_y, _unit_order(np.concatenate(position))


def _packs(xs: Sequence[jax.Array], red: Sequence[Reduce], axes: list[AxisName]) -> list[list[int]]:
  """The groups of arrays `packed` concatenates into blocks (`packed_values` too,
  so that one `Blocks` hands both the same block)."""
  groups = row_groups(
      xs, red, axes, _PACK_LEAF_ELEMENTS, transpose=False, column_limit=_PACK_COLUMN_ELEMENTS
  )
  return [m for (kind, _), m in groups.items() if kind != "alone" and len(m) > 1]


def _unit_starts(xs: Sequence[jax.Array], red: Sequence[Reduce]) -> np.ndarray:
  """Where each array's units start in the flat vector of all the arrays' units (and the end)."""
  return np.cumsum([0] + [math.prod(reduced_shape(x.shape, r, True)) for x, r in zip(xs, red)])


def _unit_order(position: np.ndarray) -> np.ndarray | None:
  """The gather that takes values at the units `position` back to the units' order
  (None where they are in order)."""
  return None if np.array_equal(position, np.arange(position.size)) else np.argsort(position)


def packed_values(
    xs: Sequence[jax.Array],
    dtype: DTypeLike,
    rows_fn: Callable[[jax.Array], tuple[jax.Array, ...]],
    forms: Forms,
    blocks: Blocks | None = None,
) -> tuple[tuple[jax.Array, ...] | None, list[int]]:
  """For XLA's CPU backend: `rows_fn` over the small arrays of `xs`, packed as in `packed`.

  Each array is one row (in `dtype`) of a matrix per size, and ``rows_fn(rows)``
  gives one or more values per row (a tuple of vectors). Returns (those values
  of the packed arrays, each in no particular order but the same for all, or
  None if none was packed; the indices of the others). Asking for every value
  in one call traces one copy of the rows, not one per value; with the
  `blocks` a norm of the same arrays was given (same `dtype`), not even that.
  """
  if not forms.packed:
    return None, list(range(len(xs)))
  blocks = Blocks() if blocks is None else blocks
  packed = _packs(xs, [None] * len(xs), [None] * len(xs))
  alone = sorted(set(range(len(xs))) - {i for m in packed for i in m})
  if not packed:
    return None, alone
  values = [rows_fn(blocks.block([xs[i] for i in m], [None] * len(m), dtype)) for m in packed]
  return lax.optimization_barrier(tuple(concat(v, 0) for v in zip(*values))), alone


class Blocks:
  """The blocks of `packed` made while tracing one update, each made once.

  A clipper that reduces the same small arrays for its norm and for values of
  its own (`packed_values`) passes one `Blocks` to both, and both read one
  traced block: XLA merges copies only after tracing, lowering and its first
  passes, which cost compile time (README.md). Keyed by the arrays'
  identities, which it keeps alive: make one per update, never share it
  between traces.
  """

  def __init__(self) -> None:
    self._made: dict[Hashable, tuple[list[jax.Array], jax.Array]] = {}

  def block(self, xs: Sequence[jax.Array], red: Sequence[Reduce], dtype: DTypeLike) -> jax.Array:
    """The `_unit_block`s of `xs` (reduced over `red`) in `dtype`, concatenated."""
    key = (tuple(map(id, xs)), tuple(red), jnp.dtype(dtype))
    if key not in self._made:
      made = concat([_unit_block(x, r, dtype) for x, r in zip(xs, red)], 0)
      self._made[key] = (list(xs), made)
    return self._made[key][1]


def row_groups(
    xs: Sequence[jax.Array],
    red: Sequence[Reduce],
    axes: list[AxisName],
    leaf_limit: int,
    transpose: bool = True,
    column_limit: int | None = None,
) -> dict[Any, list[int]]:
  """Arrays whose units can be reduced together: {(kind, number): members}.

  A kind is ((R, B), mapped axes), (A, R, B) the array's `_unit_block`:
  the arrays of a kind are concatenated along A and reduced over R. Arrays
  reduced over different mapped axes are never mixed (see psum_grouped). An
  array whose type says how it is sharded is ``"alone"`` (its block could not
  be formed without gathering it), and so is one of more than `leaf_limit`
  entries (`column_limit`, if given, where its units are not rows: B is not 1):
  copying it would cost more than reducing it on its own. So is one whose
  block needs a transposing copy (its reduced axes are not adjacent), unless
  `transpose`. A group holds at most _GROUP_ELEMENTS entries.
  """
  groups: dict[Any, list[int]] = {}
  filled: dict[Any, tuple[int, int]] = {}  # per kind of unit: (group number, elements in it)
  for i, (x, r, a) in enumerate(zip(xs, red, axes)):
    block = _block_shape(x.shape, r)
    columns = block is not None and block[2] != 1
    limit = leaf_limit if column_limit is None or not columns else column_limit
    if (
        _axes.is_sharded(x)
        or x.size > min(limit, _GROUP_ELEMENTS)
        or not (transpose or block is not None)
    ):
      groups[("alone", i)] = [i]
      continue
    if block is None:  # the reduced axes are not adjacent: `_unit_block` transposes to rows
      unit = (math.prod(x.shape[j] for j in reduced_axes(x.ndim, r)), 1)
    else:
      unit = block[1:]
    # (inside shard_map, a leaf that varies over other axes than its neighbour
    # would make the block, and so the neighbour's results, vary over them too)
    kind = (unit, a, _axes.varying(x))
    number, size = filled.get(kind, (0, 0))
    if size + x.size > _GROUP_ELEMENTS:
      number, size = number + 1, 0
    filled[kind] = (number, size + x.size)
    groups.setdefault((kind, number), []).append(i)
  return groups


def reduce_groups(
    xs: Sequence[jax.Array],
    red: Sequence[Reduce],
    axes: list[AxisName],
    dtype: DTypeLike,
    groups: dict[Any, list[int]],
    rows_fn: Callable[[jax.Array, np.ndarray], jax.Array],
    alone_fn: Callable[[int, np.ndarray], jax.Array],
) -> jax.Array:
  """A value per unit, as one flat vector in the order of `flat_norms`.

  The members of a group are reduced by ``rows_fn(block, idx)``, ``block``
  their `_unit_block`s concatenated, (A, R, B) or (A, R), which gives a vector
  of the values of its units in order; an array alone by ``alone_fn(i, idx)``,
  a vector of a value per unit. ``idx`` is where those units are in the flat
  vector. Each part is psum-reduced over its arrays' mapped axes.
  """
  starts = _unit_starts(xs, red)
  parts, part_axes, order = [], [], []
  for (kind, _), members in groups.items():
    idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
    if idx.size == 0:  # arrays with no units (an AGC leaf of shape (3, 0))
      continue
    if kind == "alone":
      parts.append(alone_fn(members[0], idx))
    else:
      parts.append(rows_fn(concat([_unit_block(xs[i], red[i], dtype) for i in members], 0), idx))
    part_axes.append(axes[members[0]])
    order.append(idx)
  if not parts:
    return jnp.zeros((0,), dtype)
  parts = _axes.psum_grouped(parts, part_axes)
  flat = concat(parts, 0) if len(parts) > 1 else parts[0]
  back = _unit_order(np.concatenate(order))
  return flat if back is None else flat[back]


# The rescue branch groups leaves of at most GROUP_LEAF_ELEMENTS entries, into
# matrices of at most _GROUP_ELEMENTS (64 MiB in float32).
GROUP_LEAF_ELEMENTS = 2**16


_GROUP_ELEMENTS = 2**24


def _block_shape(shape: tuple[int, ...], r: Reduce) -> tuple[int, int, int] | None:
  """(A, R, B) when reducing an array of `shape` over `r` is reducing its
  reshape to (A, R, B) over the middle axis (the reduced axes are adjacent),
  else None (the units' entries are interleaved: only a transposing copy
  makes them rows).

  Units are then numbered as ``reduced_shape(shape, r, True)`` flattened:
  (a, b) is unit a * B + b.
  """
  red_axes = reduced_axes(len(shape), r)
  if not red_axes:
    return math.prod(shape), 1, 1
  lo, hi = red_axes[0], red_axes[-1] + 1
  if red_axes != list(range(lo, hi)):
    return None
  return math.prod(shape[:lo]), math.prod(shape[lo:hi]), math.prod(shape[hi:])


def _unit_block(x: jax.Array, r: Reduce, dtype: DTypeLike) -> jax.Array:
  """x as an (A, R, B) array of `dtype` whose units are its [a, :, b] (see
  `_block_shape`); as (A, R) where B is 1.

  Where the reduced axes are not adjacent, x is transposed to (units, R).
  (Rows stay a matrix: their reduction compiles as it did before blocks.)
  """
  block = _block_shape(x.shape, r)
  if block is None:
    red_axes = reduced_axes(x.ndim, r)
    kept = [a for a in range(x.ndim) if a not in red_axes]
    x = jnp.transpose(x, kept + red_axes)
    block = (math.prod(x.shape[: len(kept)]), math.prod(x.shape[len(kept) :]), 1)
  return reshaped(cast(x, dtype), block if block[2] != 1 else block[:2])
