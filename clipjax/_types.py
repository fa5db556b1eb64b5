"""Type aliases of the public API and of the plumbing between modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from jax.typing import ArrayLike, DTypeLike

# A pytree of arrays (gradients, parameters, states): optax.Params / optax.Updates.
PyTree: TypeAlias = Any
# A hyperparameter: a Python number, or a scalar array (traced when it is scheduled
# with optax.inject_hyperparams).
Scalar: TypeAlias = ArrayLike
# What a clipper does with non-finite gradients (see clipjax.chain).
NonFinite: TypeAlias = Literal["propagate", "skip", "zero", "raise"]
# How unit norms are reduced: "cond" (plain sums and one rarely taken branch),
# "multiscale" (three sums in one pass, no branch), or "auto" (= "cond").
Implementation: TypeAlias = Literal["auto", "cond", "multiscale"]
# How zclip turns its z-score into a threshold.
ZClipMode: TypeAlias = Literal["zscore", "percentile"]
# A norm's order: a number >= 1, inf, "inf", or None (2).
Ord: TypeAlias = int | float | str | None
# A mapped axis (shard_map / pmap), a tuple of them, or None (replicated).
AxisName: TypeAlias = str | tuple[str, ...] | None
# One axis name for every leaf, or a function of the updates that returns a
# pytree (same structure) of per-leaf axis names; None marks a leaf replicated
# over the mapped axes (counted once, not once per shard).
AxisSpec: TypeAlias = AxisName | Callable[[PyTree], PyTree]

__all__ = [
    "ArrayLike",
    "AxisName",
    "AxisSpec",
    "DTypeLike",
    "Implementation",
    "NonFinite",
    "Ord",
    "PyTree",
    "Scalar",
    "ZClipMode",
]
