"""Which mapped axes each leaf's reductions run over, read or checked against its type.

Inside ``shard_map`` a leaf is either a *piece* of a larger array (its type says
it varies over the mesh axes it is split along) or the same value on every
device (its type says it is invariant: a replicated parameter's gradient comes
back already summed over the devices). A norm sums the pieces (``psum``) and
must count an invariant leaf once. JAX's ``psum`` of an invariant value
multiplies it by the axis size, silently; so a clipper asks the type:

- ``axis_name='auto'``: each leaf is reduced over the manual axes its type
  varies over, and over none outside ``shard_map`` (under ``jit``, XLA inserts
  the cross-device sums itself);
- a name, a tuple of names, a PartitionSpec prefix tree of the updates (the
  ``in_specs`` of the gradients), or a function of the updates returning one:
  checked against each leaf's type, and a leaf that does not vary over an axis
  it is to be reduced over is refused with a one-line error.

Where ``shard_map(..., check_vma=False)`` erased the types, every leaf reads as
invariant: the axes given are trusted, and ``'auto'`` is refused.

The axes are read and checked at trace time, once per trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.sharding import PartitionSpec

from clipjax._types import AxisName

AUTO = "auto"


def _mesh() -> Any:
  return jax.sharding.get_abstract_mesh()


def manual_axes() -> tuple[str, ...]:
  """The mesh axes the current trace is manual over (shard_map), in mesh order."""
  mesh = _mesh()
  if mesh is None or mesh.empty:
    return ()
  return tuple(a for a in mesh.axis_names if a in set(mesh.manual_axes))


def types_checked() -> bool:
  """Whether the current shard_map tracks which axes values vary over (``check_vma``)."""
  # No public accessor in jax 0.10: shard_map sets this config state while tracing.
  from jax._src import config  # noqa: PLC0415

  state = getattr(config, "_check_vma", None)
  return True if state is None else bool(state.value)


def varying(x: Any) -> frozenset[str]:
  """The manual mesh axes x's type varies over (empty outside shard_map)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(t, "vma", ()))  # jax before 0.10


def unreduced(x: Any) -> frozenset[str]:
  """The mesh axes over which x's cross-device sum is pending (explicit sharding)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  names = frozenset(getattr(mat, "unreduced", ()) or ())
  return names | frozenset(getattr(_type_spec(x), "unreduced", ()) or ())


def spec_entries(spec: Any) -> tuple[Any, ...]:
  """A PartitionSpec's per-dimension entries (without iterating it: JAX refuses
  that for a spec with unreduced axes)."""
  partitions = getattr(spec, "partitions", None)
  if partitions is None:
    partitions = getattr(spec, "_partitions", None) or ()
  return tuple(partitions)


def spec_axes(spec: PartitionSpec, dims: Sequence[int] | None = None) -> AxisName:
  """The mesh axes a PartitionSpec splits an array over (only its `dims`, if given)."""
  names: list[str] = []
  for d, entry in enumerate(spec_entries(spec)):
    if dims is not None and d not in dims:
      continue
    for a in (entry,) if isinstance(entry, str) else entry or ():
      if a not in names:
        names.append(a)
  return _as_axis(names)


def _as_axis(names: Sequence[str]) -> AxisName:
  return None if not names else names[0] if len(names) == 1 else tuple(names)


def names(a: AxisName) -> tuple[str, ...]:
  return () if a is None else (a,) if isinstance(a, str) else tuple(a)


def is_spec_tree(value: Any) -> bool:
  """Whether `value` is a pytree of PartitionSpecs (and Nones), at least one of them."""
  leaves = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return bool(leaves) and all(isinstance(x, PartitionSpec) for x in leaves)


def _entries_per_leaf(spec: Any, tree: Any) -> list[Any]:
  """The entry of prefix tree `spec` (names, a PartitionSpec or None) for each leaf of `tree`."""
  per_leaf = jax.tree.map(
      lambda s, sub: [s] * len(jax.tree.leaves(sub)), spec, tree, is_leaf=_is_entry
  )
  return [
      s for group in jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, list)) for s in group
  ]


def _is_entry(x: Any) -> bool:
  return isinstance(x, PartitionSpec) or is_axis_name(x)


def _from_tree(
    spec: Any, tree: Any, who: str, dims: Sequence[Sequence[int] | None] | None, what: str
) -> list[AxisName]:
  """Per-leaf axes from a prefix tree of the updates holding names, PartitionSpecs or None."""
  try:
    entries = _entries_per_leaf(spec, tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{who}: {what} a prefix of the updates' structure "
        f"({jax.tree.structure(tree)}), holding an axis name, a tuple of names, a "
        f"PartitionSpec or None per leaf or subtree; got {spec!r}."
    ) from e
  axes: list[AxisName] = []
  for s in entries:
    if isinstance(s, PartitionSpec):
      axes.append(spec_axes(s, None if dims is None else dims[len(axes)]))
    elif is_axis_name(s):
      axes.append(s or None)
    else:
      raise ValueError(
          f"{who}: {what.split(' must')[0]} gave {s!r} for a leaf; each entry must be "
          "an axis name, a tuple of axis names, a PartitionSpec or None (replicated)."
      )
  return axes


def is_axis_name(value: Any) -> bool:
  """None, a mapped-axis name or a tuple of names (what psum accepts)."""
  return (
      value is None
      or isinstance(value, str)
      or (isinstance(value, tuple) and all(isinstance(a, str) for a in value))
  )


def leaf_axes(
    axis_name: Any, tree: Any, who: str, dims: Sequence[Sequence[int] | None] | None = None
) -> list[AxisName]:
  """Per-leaf mapped axes of `tree` (at trace time) from a clipper's `axis_name`.

  See the module docstring: ``'auto'`` reads them from the leaves' types; any
  other form is checked against the types where shard_map tracks them.
  `dims`, if given, are the dimensions each leaf is reduced over (None: all):
  a PartitionSpec then gives only the axes that split those, and ``'auto'``,
  which cannot tell which dimension a leaf is split along, is refused.
  """
  paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [x for _, x in paths_leaves]
  manual = manual_axes()
  if axis_name == AUTO and dims is not None:
    raise ValueError(
        f"{who}: axis_name='auto' cannot tell which dimension of a leaf is split over "
        "the devices, and only the reduced ones count here: pass the gradients' "
        "PartitionSpecs (a prefix tree of the updates) or the axes per leaf."
    )
  if axis_name == AUTO:
    _check_types_readable(who, "pass the axes (a name, or the gradients' PartitionSpecs)")
    return [_as_axis(_varying_manual(x)) for x in leaves]
  if is_axis_name(axis_name):
    axes: list[AxisName] = [axis_name or None] * len(leaves)
  else:
    spec = axis_name(tree) if callable(axis_name) else axis_name
    what = "axis_name(updates) must return" if callable(axis_name) else "axis_name must be"
    axes = _from_tree(spec, tree, who, dims, what)
  if manual and types_checked():
    for (path, x), a in zip(paths_leaves, axes):
      missing = _not_varying(x, a)
      if missing:
        raise ValueError(
            f"{who}: leaf {jax.tree_util.keystr(path)} ({jax.typeof(x).str_short()}) does "
            f"not vary over {', '.join(map(repr, missing))} inside shard_map, so it is "
            "the same on every device and a psum would count it once per device (a "
            "replicated parameter's gradient comes back summed); give it None, or pass "
            "axis_name='auto'."
        )
  return axes


def global_shapes(axis_name: Any, tree: Any) -> list[tuple[int, ...]]:
  """Inside shard_map, each leaf's whole shape from a PartitionSpec tree `axis_name`
  (its local shape times the sizes of the axes splitting each dimension); else
  the leaves' own shapes."""
  leaves = jax.tree.leaves(tree)
  if not manual_axes() or not is_spec_tree(axis_name) or callable(axis_name):
    return [x.shape for x in leaves]
  sizes = dict(zip(_mesh().axis_names, _mesh().axis_sizes))
  shapes = []
  for x, spec in zip(leaves, _entries_per_leaf(axis_name, tree)):
    entries = spec_entries(spec) if isinstance(spec, PartitionSpec) else ()
    shape = list(x.shape)
    for d, entry in enumerate(entries[: x.ndim]):
      for a in (entry,) if isinstance(entry, str) else entry or ():
        shape[d] *= sizes[a]
    shapes.append(tuple(shape))
  return shapes


def kept_axes(
    axis_name: Any,
    tree: Any,
    kept: Sequence[Sequence[int]],
    reduced_axes: Sequence[AxisName],
) -> list[AxisName]:
  """Inside shard_map, the mesh axes that split each leaf along its *kept* dims.

  A unit-wise clipper (AGC) reduces each unit over `reduced_axes`; a leaf split
  along a kept dimension holds other units on each device, so what it reports
  about all units (the global norm, the least scale) must still be combined
  over these axes. From a PartitionSpec tree they are the axes of the `kept`
  dims; where shard_map checks types, the leaf's varying axes less the
  reduced ones; otherwise (names under ``check_vma=False``) unknown: none.
  """
  leaves = jax.tree.leaves(tree)
  if not manual_axes():
    return [None] * len(leaves)
  spec = axis_name(tree) if callable(axis_name) else axis_name
  if is_spec_tree(spec):
    entries = _entries_per_leaf(spec, tree)
    return [
        spec_axes(s, k) if isinstance(s, PartitionSpec) else None for s, k in zip(entries, kept)
    ]
  if not types_checked():
    return [None] * len(leaves)
  return [
      _as_axis([a for a in _varying_manual(x) if a not in names(r)])
      for x, r in zip(leaves, reduced_axes)
  ]


def _varying_manual(x: Any) -> tuple[str, ...]:
  """The manual axes x's type varies over, in mesh order."""
  return tuple(a for a in manual_axes() if a in varying(x))


def _not_varying(x: Any, a: AxisName) -> list[str]:
  """The manual axes named in `a` that x's type does not vary over."""
  manual = manual_axes()
  return [n for n in names(a) if n in manual and n not in varying(x)]


def _check_types_readable(who: str, instead: str) -> None:
  """Refuses ``axis_name='auto'`` inside shard_map(check_vma=False), where types are erased."""
  if manual_axes() and not types_checked():
    raise ValueError(
        f"{who}: axis_name='auto' reads the axes from the leaves' types, and inside "
        f"shard_map(check_vma=False) the types say nothing: {instead}, or use check_vma=True."
    )


def batch_axes(axis_name: Any, leaves: Sequence[Any], who: str) -> AxisName:
  """The mapped axes a batch is split over, for per-example clipping.

  Each per-example gradient must vary over them inside shard_map: one that
  does not is the sum of that example over the devices (the parameters were
  replicated, so the gradient came back psum'd).
  """
  manual = manual_axes()
  if axis_name == AUTO:
    if not manual:
      return None
    _check_types_readable(who, "name the batch axis")
    found = {_varying_manual(x) for x in leaves}
    if len(found) > 1:
      raise ValueError(
          f"{who}: axis_name='auto': the per-example gradients vary over different axes "
          f"({sorted(found)}); name the batch axis."
      )
    return _as_axis(found.pop() if found else ())
  if manual and types_checked():
    for i, x in enumerate(leaves):
      missing = _not_varying(x, axis_name)
      if missing:
        axes = ", ".join(map(repr, missing))
        raise ValueError(
            f"{who}: the per-example gradients of leaf {i} do not vary over {axes} inside "
            "shard_map: each is that example's gradient summed over the devices (the "
            "parameters are replicated, so their gradient comes back psum'd); cast the "
            f"parameters first: params = jax.lax.pcast(params, {axes}, to='varying')."
        )
  return axis_name


def _type_spec(x: Any) -> Any:
  """The PartitionSpec of x's type (None where it has none)."""
  return getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)


def is_sharded(x: Any) -> bool:
  """Whether x's type names mesh axes it is split over (explicit sharding)."""
  spec = _type_spec(x)
  return spec is not None and any(e is not None for e in spec_entries(spec))


def same_sharding(parts: Sequence[Any]) -> list[Any]:
  """`parts` to concatenate, the split ones replicated where their shardings differ.

  Under an Explicit mesh a concatenation's operands must have one sharding;
  the parts concatenated here are vectors of norms or sums (one value per
  leaf or unit), cheap to replicate.
  """
  parts = list(parts)
  specs = {_spec_key(x) for x in parts}
  if len(specs) <= 1:
    return parts
  return [replicated(x) for x in parts]


def replicated(x: Any) -> Any:
  """x, replicated over the mesh if its type says it is split (a few values only)."""
  if not is_sharded(x):
    return x
  # On the mesh of x's own type: no mesh context (jax.set_mesh) is needed.
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, PartitionSpec()))


def _spec_key(x: Any) -> Any:
  return spec_entries(_type_spec(x)) if is_sharded(x) else None


def cast_like(x: Any, *refs: Any) -> Any:
  """x (a pytree) typed to vary over every axis some leaf of `refs` varies over.

  The branches of a ``lax.cond`` must agree in type inside shard_map: a branch
  that returns a constant (invariant) where the other returns a value
  computed from varying data is a type error.
  """
  if not manual_axes() or not types_checked():
    return x
  axes = frozenset().union(*[varying(r) for r in jax.tree.leaves(refs)])
  if not axes:
    return x

  manual = manual_axes()

  def cast(v: Any) -> Any:
    extra = tuple(a for a in manual if a in axes and a not in varying(v))
    return jax.lax.pcast(v, extra, to="varying") if extra else v

  return jax.tree.map(cast, x)


def psum_grouped(
    values: list[jax.Array], axes: list[AxisName], op: Callable[..., Any] = lax.psum
) -> list[jax.Array]:
  """values[i] reduced by `op` over axes[i]: one collective per distinct axis spec.

  A group is reduced as a list, never stacked with another group's values, so
  that inside shard_map a replicated leaf's sum never mixes with a sharded
  one's (JAX then types each result as the same on every shard).
  """
  groups: dict[Any, list[int]] = {}
  for i, a in enumerate(axes):
    groups.setdefault(a, []).append(i)
  out = list(values)
  for a, idx in groups.items():
    if a is not None:
      for i, r in zip(idx, op([values[i] for i in idx], a)):
        out[i] = r
  return out
