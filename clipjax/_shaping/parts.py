"""Each array's part of per-array vectors (clip factors), cut so that XLA's CPU
backend compiles one kernel per kind of array, not one per array (README.md)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax._forms import Forms
from clipjax._shaping.arrays import cast, reshaped, take, unflatten


def _chunk_width(n: int) -> int:
  """Parts per chunk for the n arrays of one kind (see `split_per_array`).

  About sqrt(n / 8), a power of two from 1 to 64: the chunks (buffers) number
  n / width and the distinct scaling loops width, and the compile time is
  flat around it (README.md).
  """
  return 1 << min(6, max(0, round(math.log2(math.sqrt(n / 8)))))


# The most outputs of one cutting reduction (see `_separate`): more in one
# compiles slower (clip_by_norm + Adam, 500 leaves, CPU: 500 in one 6.8 s, 128 4.8 s).
_OUTPUTS_PER_REDUCE = 128


def split_per_array(
    vectors: Sequence[jax.Array],
    shapes: list[tuple[int, ...]],
    kinds: Sequence[Hashable],
    forms: Forms,
) -> list[tuple[jax.Array, ...]]:
  """Array i's part of each of `vectors`, as `unflatten` cuts them.

  For clip factors (`clip_factors`) and per-array statistics. XLA's CPU backend
  compiles a kernel per distinct fused loop, and a slice is fused into the loop
  that reads it, its offset included: read as slices, every array's scaling
  loop (and the optimizer's loop it fuses into) is a kernel of its own,
  although the arrays share a shape (README.md).

  With `Forms.chunked` the parts of arrays of one kind (`kinds[i]`: the callers pass what
  else makes their loops differ, the array's shape and dtype) are cut into
  chunks of `_chunk_width` parts, each a buffer of its own (an output of a
  variadic reduction, which XLA does not fuse into its readers), and an array
  reads its chunk at its position in it: the loops of arrays of one kind at
  one position are one kernel, a chunk's width of them for the kind (cheaper
  to compile than a buffer per part). Otherwise the parts are slices.
  """

  def sliced(*vectors: jax.Array) -> list[tuple[jax.Array, ...]]:
    return list(zip(*(unflatten(v, shapes) for v in vectors)))

  def chunked(*vectors: jax.Array) -> list[tuple[jax.Array, ...]]:
    rows = jnp.stack(vectors)  # (vectors, entries)
    sizes = [math.prod(shape) for shape in shapes]
    starts = np.cumsum([0] + sizes)
    by_kind: dict[Any, list[int]] = {}
    for i, key in enumerate(zip(shapes, kinds)):
      by_kind.setdefault(key, []).append(i)
    # The kinds of one part size and chunk width are cut by the same reductions.
    by_cut: dict[tuple[int, int], list[list[int]]] = {}
    for members in by_kind.values():
      by_cut.setdefault((sizes[members[0]], _chunk_width(len(members))), []).append(members)
    out: list[tuple[jax.Array, ...]] = [()] * len(shapes)
    for (size, width), groups in by_cut.items():
      chunks = iter(_chunks(rows, starts, size, groups, width))
      for members in groups:
        for parts in _grouped(members, width):
          chunk = next(chunks)
          # Vector j's parts of the chunk, (1, 1, size) each, cut in one split.
          pieces = [
              lax.split(lax.slice_in_dim(chunk, j, j + 1), [1] * chunk.shape[1], axis=1)
              for j in range(len(vectors))
          ]
          for position, i in enumerate(parts):
            out[i] = tuple(
                cast(reshaped(p[position], shapes[i]), v.dtype) for p, v in zip(pieces, vectors)
            )
    return out

  return chunked(*vectors) if forms.chunked else sliced(*vectors)


def _grouped(items: list[int], n: int) -> list[list[int]]:
  return [items[c : c + n] for c in range(0, len(items), n)]


def _chunks(
    rows: jax.Array, starts: np.ndarray, size: int, groups: list[list[int]], width: int
) -> list[jax.Array]:
  """The parts (`size` entries each) of each group's members, `width` at a time, in order.

  Each is a (vectors, parts, size) array. With several, each is a buffer of its
  own, and each group's last chunk is padded to `width` parts (with parts that
  are never read), so that they all share a shape.
  """
  k = rows.shape[0]
  if len(groups) == 1 and len(groups[0]) <= width:
    padded_members = groups[0]
  else:
    padded_members = []
    for members in groups:
      padded_members += members + [members[0]] * (-len(members) % width)
  idx = np.concatenate(
      [np.arange(starts[i], starts[i] + size, dtype=np.int64) for i in padded_members]
  )
  picked = lax.reshape(take(rows, idx, 1), (k, len(padded_members), size))
  if len(padded_members) <= width:
    return [picked]
  return _separate(picked, len(padded_members) // width, width, 1)


def _separate(x: jax.Array, n: int, width: int, axis: int) -> list[jax.Array]:
  """x's first n slices of `width` along `axis`, each an output of a variadic
  reduction (of at most _OUTPUTS_PER_REDUCE): on CPU, each a buffer of its
  own, which its readers read whole.

  The reduction adds a zero (behind a barrier: XLA would fold it) along a new
  last axis, appended once for all the slices: the values exactly, but for
  -0.0, which becomes 0.0.
  """
  pad = lax.optimization_barrier(jnp.zeros((*x.shape, 1), x.dtype))
  both = lax.concatenate([lax.expand_dims(x, (x.ndim,)), pad], x.ndim)
  zero = jnp.zeros([], x.dtype)
  out: list[jax.Array] = []
  for first in range(0, n, _OUTPUTS_PER_REDUCE):
    count = min(_OUTPUTS_PER_REDUCE, n - first)
    operands = [
        lax.slice_in_dim(both, j * width, (j + 1) * width, axis=axis)
        for j in range(first, first + count)
    ]
    out += lax.reduce(
        operands, [zero] * count, lambda a, b: tuple(u + v for u, v in zip(a, b)), (x.ndim,)
    )
  return out
