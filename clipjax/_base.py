"""Plumbing shared by every clipper: its state, the non-finite policy, and the update skeleton."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from clipjax import _numerics, _shaping, _validate
from clipjax._forms import Forms
from clipjax._types import ArrayLike, DTypeLike, NonFinite, PyTree

# ------------------------------------------------------------ state
# The state every clipper carries: what it did at the last step, and counts.


class ClipState(NamedTuple):
  """State of the stateless clippers (value, norm, global norm, block RMS, AGC).

  Every field is a fixed-shape array, so the state can be jitted, vmapped,
  carried through ``lax.scan`` and checkpointed. Read a field with
  ``optax.tree.get(opt_state, "pre_clip_norm")`` or collect them all with
  :func:`clipjax.clip_stats`.

  Attributes:
    pre_clip_norm: float32 norm of the incoming updates at the last step (the
      global norm of the clipper's ``ord``; L2 for per-leaf/unit clippers).
    clip_scale: float32 factor applied at the last step: the global factor for
      global-norm clipping, the smallest per-leaf/per-unit factor otherwise, and
      post-clip norm / pre-clip norm for value clipping. 1 when nothing was
      clipped.
    clipped: bool, whether anything was clipped at the last step.
    skipped: bool, whether the last step was skipped (``nonfinite='skip'``);
      :func:`clipjax.chain` then leaves the transforms after this one untouched.
    num_steps: int32 count of updates seen.
    num_clipped: int32 count of steps where something was clipped.
    num_nonfinite: int32 count of steps whose gradients held inf or NaN.
  """

  pre_clip_norm: jax.Array
  clip_scale: jax.Array
  clipped: jax.Array
  skipped: jax.Array
  num_steps: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array


@jax.tree_util.register_pytree_with_keys_class
class PerLeaf:
  """One value per leaf of the updates, held as one vector, with the leaves' paths.

  A state field of per-leaf statistics (:func:`clipjax.adagc`'s ``gamma``,
  :func:`clipjax.record_leaf_norms`' norms). One vector is one buffer: as a
  pytree of scalars the field made each step take and return one array per
  leaf, and XLA's CPU backend computed each in a kernel of its own (record_leaf_norms
  + global-norm clip + Adam at 2000 leaves: 118 ms a step against 66 ms without
  it). The paths are static (the pytree's auxiliary data), so two states of
  different trees have different structures.

  Attributes:
    values: float32 array of shape ``(n,)`` (batch axes first under ``vmap``),
      in the order of ``jax.tree.leaves`` of the updates.
    paths: the leaves' paths, ``'/'``-joined as :func:`clipjax.clip_stats` names
      them (``'encoder/w'``).

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.record_leaf_norms()
    >>> g = {'w': jnp.array([3.0, 4.0]), 'b': jnp.array([12.0])}
    >>> _, state = tx.update(g, tx.init(g))
    >>> {k: float(v) for k, v in state.leaf_norms.as_dict().items()}
    {'b': 12.0, 'w': 5.0}
  """

  def __init__(self, values: jax.Array, paths: tuple[str, ...]):
    self.values = values
    self.paths = tuple(paths)

  @classmethod
  def zeros(cls, tree: PyTree) -> PerLeaf:
    """Zeros for every leaf of `tree`."""
    paths = leaf_paths(tree)
    return cls(jnp.zeros((len(paths),), jnp.float32), paths)

  def as_dict(self) -> dict[str, jax.Array]:
    """``{path: value}``, in leaf order."""
    return {p: self.values[..., i] for i, p in enumerate(self.paths)}

  def tree_flatten_with_keys(self) -> tuple[tuple[tuple[Any, jax.Array], ...], tuple[str, ...]]:
    return ((jax.tree_util.GetAttrKey("values"), self.values),), self.paths

  @classmethod
  def tree_unflatten(cls, paths: tuple[str, ...], children: Sequence[Any]) -> PerLeaf:
    obj = object.__new__(cls)  # children may be tracers, None or sentinels (tree utilities)
    obj.values, obj.paths = children[0], paths
    return obj

  def __repr__(self) -> str:
    return f"PerLeaf(values={self.values!r}, paths={self.paths!r})"


def key_str(key: Any) -> str:
  """One part of a pytree path, as clip_stats writes it (a dict key, attribute or index)."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def is_nnx_variable(value: Any) -> bool:
  """Whether `value` is a Flax NNX variable (``nnx.Optimizer`` keeps its state in them)."""
  return type(value).__module__.startswith("flax.") and hasattr(value, "get_value")


def leaf_paths(tree: PyTree) -> tuple[str, ...]:
  """The '/'-joined path of every leaf of `tree`, in leaf order.

  A Flax NNX variable counts as the leaf it holds: ``nnx.Optimizer`` initializes
  with the parameters' variables and updates with plain gradients, and both
  must name a leaf alike.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_nnx_variable)[0]
  return unique_names([[key_str(k) for k in path] for path, _ in flat], "the leaves")


def unique_names(paths: Sequence[Sequence[str]], what: str) -> tuple[str, ...]:
  """Each path '/'-joined; ValueError in one line if two come out the same.

  A key that contains '/' beside a nested path (``{'a/b': x, 'a': {'b': y}}``)
  would give two statistics one name, and a dict of them would keep one value
  silently.
  """
  names = tuple("/".join(path) for path in paths)
  seen: set[str] = set()
  for name in names:
    if name in seen:
      raise ValueError(same_name(name, what))
    seen.add(name)
  return names


def same_name(name: str, what: str) -> str:
  """The one-line refusal of two statistics with one name."""
  return (
      f"two of {what} are both named {name!r} in the statistics (a key containing '/' "
      "beside a nested path); rename one of the keys."
  )


def check_per_leaf(field: PerLeaf, updates: PyTree, who: str) -> None:
  """Raises ValueError unless `field` was made for a tree with the leaves of `updates`."""
  paths = leaf_paths(updates)
  if paths != field.paths:
    raise ValueError(
        f"{who}: the state's per-leaf statistics are for the leaves {list(field.paths)[:8]}, "
        f"the updates have {list(paths)[:8]}; pass the state its own init returned for "
        "these parameters."
    )


def init_clip_state() -> ClipState:
  return ClipState(
      pre_clip_norm=jnp.zeros([], jnp.float32),
      clip_scale=jnp.ones([], jnp.float32),
      clipped=jnp.zeros([], jnp.bool_),
      skipped=jnp.zeros([], jnp.bool_),
      num_steps=jnp.zeros([], jnp.int32),
      num_clipped=jnp.zeros([], jnp.int32),
      num_nonfinite=jnp.zeros([], jnp.int32),
  )


def next_clip_state(
    state: Any,
    *,
    norm: ArrayLike,
    scale: ArrayLike,
    clipped: ArrayLike,
    finite: jax.Array,
    skipped: ArrayLike,
) -> ClipState:
  """The ClipState after one more step, from a state holding the three counts."""
  clipped = jnp.asarray(clipped) & finite
  steps, n_clipped, n_nonfinite = counters(
      state.num_steps, state.num_clipped, state.num_nonfinite, clipped=clipped, finite=finite
  )
  return ClipState(
      pre_clip_norm=jnp.asarray(norm, jnp.float32),
      clip_scale=jnp.asarray(scale, jnp.float32),
      clipped=clipped,
      skipped=jnp.asarray(skipped, jnp.bool_),
      num_steps=steps,
      num_clipped=n_clipped,
      num_nonfinite=n_nonfinite,
  )


def counters(
    num_steps: jax.Array,
    num_clipped: jax.Array,
    num_nonfinite: jax.Array,
    *,
    clipped: ArrayLike,
    finite: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three running counts after one more step."""
  return (
      num_steps + 1,
      num_clipped + jnp.asarray(clipped).astype(jnp.int32),
      num_nonfinite + (~finite).astype(jnp.int32),
  )


# ------------------------------------------------------------ state written in place
# jax.jit drops the inputs a program does not read (keep_unused=False). A state
# field that a transform only writes (a statistic: the last pre-clip norm, scale,
# clipped flag) is then no input of the compiled step, so its donated buffer
# cannot hold the new value: every call allocates a fresh output. On a GPU the
# step runs as one CUDA graph (XLA command buffer) that is re-recorded whenever
# a buffer it writes moves: 0.7-1.2 ms per step on an H200 for GPT-2 small (148
# leaves), where Adam's whole step takes 2.9-4.3 ms (benchmarks/RESULTS.md).
# Tied to its old value by a select that XLA folds away, the field stays an
# input, is aliased to its output, and keeps its address.

_State = TypeVar("_State", bound=tuple)


def _tie(old: Any, new: Any) -> Any:
  if not isinstance(new, jax.core.Tracer) or jnp.shape(old) != jnp.shape(new):
    return new  # nothing is donated outside a trace
  return jax.lax.select(
      jnp.zeros(jnp.shape(new), jnp.bool_), jnp.asarray(old).astype(new.dtype), new
  )


def in_place(old: _State, new: _State, *, skip: tuple[str, ...] = ()) -> _State:
  """`new` (a NamedTuple state), each field tied to its value in `old` (see above).

  Fields named in `skip` (a wrapped optimizer's state) are left as they are.
  """
  fields = {}
  for name in new._fields:  # type: ignore[attr-defined]
    o, n = getattr(old, name), getattr(new, name)
    o_def: Any = jax.tree.structure(o)  # (Any: the stub of PyTreeDef has no __eq__)
    if name not in skip and o_def == jax.tree.structure(n):
      n = jax.tree.map(_tie, o, n)
    fields[name] = n
  return type(new)(**fields)


# ------------------------------------------------------------ policy
# What a clipper does with non-finite gradients.
#
# - ``propagate`` (default): nothing special; inf/NaN flow into the update as in
#   PyTorch's ``clip_grad_norm_(error_if_nonfinite=False)`` and optax. For the
#   norm clippers: a NaN norm gives a NaN scale, so every entry (of the update,
#   or of the leaf or unit for per-leaf clippers) becomes NaN; an inf norm gives
#   a scale of 0, so finite entries become 0 and inf entries NaN. clip_by_value
#   clips entry by entry: NaN entries stay NaN, the others are clipped (as
#   optax.clip). Cheapest; pair with ``optax.apply_if_finite`` or check the
#   ``num_nonfinite`` count.
# - ``zero``: the update is replaced by zeros; downstream transforms still run
#   (Adam's moments decay and its step count advances).
# - ``skip``: like ``zero``, and the state's ``skipped`` flag is set, so
#   :func:`clipjax.chain` leaves every later transform (e.g. the optimizer) and
#   its state untouched for this step, without computing it. A plain
#   ``optax.chain`` cannot honour the flag (the optimizer still sees a zero
#   update: Adam's moments decay and its count advances), so a ``'skip'``
#   clipper traced outside :func:`clipjax.chain` warns once per trace.
# - ``raise``: a ``jax.experimental.checkify`` check. Under ``jit`` the step must
#   be functionalized with ``checkify.checkify`` (``errors=checkify.user_checks``)
#   and the returned error thrown with ``err.throw()``; no host sync is added to
#   the step itself. Outside ``jit`` the check raises at once.


# True while clipjax.chain traces its links: a skipped step then stops the chain.
_SKIP_HONOURED = contextvars.ContextVar("clipjax_skip_honoured", default=False)


@contextlib.contextmanager
def skip_honoured() -> Iterator[None]:
  """Marks the transforms updated inside the block as links of a skip-aware chain."""
  token = _SKIP_HONOURED.set(True)
  try:
    yield
  finally:
    _SKIP_HONOURED.reset(token)


def apply_policy(
    policy: NonFinite, updates: PyTree, finite: jax.Array, who: str
) -> tuple[PyTree, jax.Array]:
  """Returns (updates, skipped) after applying the non-finite `policy`."""
  if policy == "skip" and not _SKIP_HONOURED.get():
    warnings.warn(
        f"{who}(nonfinite='skip') is updated outside clipjax.chain: on a skipped step the "
        "transforms after it (e.g. the optimizer) still run on a zero update, so Adam's "
        "moments decay and its step count advances. Build the optimizer with "
        "clipjax.chain(...) instead of optax.chain(...) to leave them untouched.",
        UserWarning,
        stacklevel=4,
    )
  if policy == "propagate":
    return updates, jnp.zeros([], jnp.bool_)
  if policy == "raise":
    checkify.check(finite, f"{who}: non-finite gradient norm (inf or NaN gradients).")
    return updates, jnp.zeros([], jnp.bool_)
  zeroed = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
  skipped = ~finite if policy == "skip" else jnp.zeros([], jnp.bool_)
  return zeroed, skipped


# ------------------------------------------------------------ clipper
# Shared plumbing of every clipper: hyperparameters, scaling, policy, state.


# clip_fn(updates, params) -> (clipped updates, pre-clip norm (a Split), scale, clipped)
# (with takes_extra_args, also update's extra keyword arguments)
ClipFn = Callable[..., tuple[PyTree, _numerics.Split, jax.Array, jax.Array]]


def hyper(
    value: ArrayLike, dtype: DTypeLike, low: float | None = 0.0, high: float | None = None
) -> jax.Array:
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


def poison(x: jax.Array, *hypers: ArrayLike) -> jax.Array:
  """x, or NaN where any of `hypers` is NaN: a NaN hyperparameter is never silently ignored."""
  bad = jnp.zeros([], jnp.bool_)
  for h in hypers:
    bad = bad | jnp.any(jnp.isnan(jnp.asarray(h)))
  return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def check_state(
    state: Any, expected: type, who: str, buffer: tuple[str, str, int] | None = None
) -> None:
  """Raises unless `state` is what this transform's init returned (at trace time).

  TypeError for another transform's state; ValueError when `buffer` =
  (field, argument, size) names a buffer whose length is not that argument's
  `size` (a state from the same transform built with another history length).
  """
  if type(state) is not expected:
    raise TypeError(
        f"{who}: got a state of type {type(state).__name__}, expected {expected.__name__}; "
        f"pass the state returned by this transform's init (or restored from it)."
    )
  if buffer is not None:
    field, arg, size = buffer
    shape = getattr(state, field).shape
    if shape != (size,):
      raise ValueError(
          f"{who}: the state's {field} has shape {shape}, but this {who} has {arg}={size}; "
          f"pass the state its own init returned."
      )


def scale_leaf(u: jax.Array, f1: jax.Array, f2: jax.Array) -> jax.Array:
  """u * f2 * f1 computed in the wider of the dtypes, returned in u's dtype.

  f2 (from `_numerics.clip_factors`) is a power of two at most 1, applied first:
  the two factors carry scales too small for one float (1 / 1e38) exactly.
  """
  ct = jnp.promote_types(u.dtype, f1.dtype)
  return (u.astype(ct) * f2.astype(ct) * f1.astype(ct)).astype(u.dtype)


def scale_each_leaf(
    leaves: Sequence[jax.Array],
    f1: jax.Array,
    f2: jax.Array,
    shapes: list[tuple[int, ...]] | None,
    forms: Forms,
) -> list[jax.Array]:
  """Scales leaf i by its part of the factor vectors f1, f2 (one factor per leaf by default).

  `shapes` are the parts' shapes (broadcasting against their leaves: AGC's units);
  each leaf reads its part as `_shaping.split_per_array` hands it out.
  """
  shapes = [()] * len(leaves) if shapes is None else shapes
  kinds = [(u.shape, u.dtype) for u in leaves]
  parts = _shaping.split_per_array([f1, f2], shapes, kinds, forms)
  return [scale_leaf(u, a, b) for u, (a, b) in zip(leaves, parts)]


def safe_ratio(num: jax.Array, den: jax.Array, use: jax.Array) -> jax.Array:
  """num / den where `use`, else 1; never divides by a value `use` rules out."""
  return jnp.where(use, num / jnp.where(use, den, 1), jnp.ones_like(den))


def clip_each_leaf(
    leaves: Sequence[jax.Array],
    treedef: Any,
    norms: _numerics.Split,
    measure: _numerics.Split,
    limit: jax.Array,
    p: float,
    forms: Forms,
) -> tuple[PyTree, _numerics.Split, jax.Array, jax.Array]:
  """Scales leaf i by min(1, limit / measure[i]), all factors computed at once.

  Returns clip_fn's (updates, global p-norm from `norms`, smallest scale,
  clipped).
  """
  f1, f2, clipped = _numerics.clip_factors(limit, measure, forms)
  new = scale_each_leaf(leaves, f1, f2, None, forms)
  min_scale = jnp.min(f1 * f2, initial=1.0)
  return (
      jax.tree.unflatten(treedef, new),
      _numerics.combine(norms, p),
      min_scale,
      jnp.any(clipped),
  )


def scale_to_threshold(
    leaves: Sequence[jax.Array],
    norm: _numerics.Split,
    threshold: ArrayLike,
    forms: Forms,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """Scales all leaves by min(1, threshold / norm). Returns (leaves, scale, clipped)."""
  f1, f2, clipped = _numerics.clip_factors(threshold, norm, forms)
  return [scale_leaf(u, f1, f2) for u in leaves], f1 * f2, clipped


def clip_to_threshold(
    state: Any,
    leaves: Sequence[jax.Array],
    treedef: Any,
    norm: _numerics.Split,
    threshold: ArrayLike,
    policy: NonFinite,
    who: str,
    forms: Forms,
) -> tuple[PyTree, ClipState]:
  """Scales to `threshold`, applies the non-finite policy; returns (updates, ClipState fields)."""
  new, scale, clipped = scale_to_threshold(leaves, norm, threshold, forms)
  return apply_policy_and_count(
      state, jax.tree.unflatten(treedef, new), norm, scale, clipped, policy, who
  )


def apply_policy_and_count(
    state: Any,
    updates: PyTree,
    norm: _numerics.Split,
    scale: jax.Array,
    clipped: jax.Array,
    policy: NonFinite,
    who: str,
) -> tuple[PyTree, ClipState]:
  """The non-finite policy on clipped `updates`, and the next ClipState (fields)."""
  finite = norm.finite() & ~jnp.isnan(scale)  # a NaN threshold is a non-finite step
  updates, skipped = apply_policy(policy, updates, finite, who)
  return updates, next_clip_state(
      state,
      norm=norm.value(jnp.float32),
      scale=scale,
      clipped=clipped,
      finite=finite,
      skipped=skipped,
  )


def make_clipper(
    name: str,
    clip_fn: ClipFn,
    nonfinite: NonFinite,
    *,
    needs_params: bool = False,
    takes_extra_args: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a clipper whose state is a :class:`clipjax.ClipState`.

  With `takes_extra_args`, ``clip_fn`` also gets ``update``'s extra keyword
  arguments (e.g. a norm computed elsewhere); otherwise they are ignored.
  """

  def init_fn(params: PyTree) -> ClipState:
    del params
    return init_clip_state()

  def update_fn(
      updates: PyTree, state: ClipState, params: PyTree | None = None, **extra_args: Any
  ) -> tuple[PyTree, ClipState]:
    check_state(state, ClipState, name)
    _validate.check_gradient_leaves(updates, name)
    if needs_params and params is None:
      raise ValueError(f"{name} needs the current parameters: call update(updates, state, params).")
    extra = extra_args if takes_extra_args else {}
    clipped_updates, norm, scale, clipped = clip_fn(updates, params, **extra)
    new, new_state = apply_policy_and_count(
        state, clipped_updates, norm, scale, clipped, nonfinite, name
    )
    return new, in_place(state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
