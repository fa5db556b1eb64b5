"""How a clipper's program is shaped for XLA: one `Forms` per trace, the only switch.

What a clipper computes is fixed by its definition; how it is written for XLA
is not. Some forms exist only because a backend compiles them better (packed
sums and chunked factors for XLA's CPU backend, a select of the moments on a
GPU). Each clipper's update asks `for_trace` once, at its start, and passes
the `Forms` down to every function whose program depends on it; nothing
below reads the backend again. Every form computes the same values (to the
summation order): `PLAIN` is the reference program, and a test runs every
clipper of the catalogue under each form and compares them.

The forms follow ``jax.default_device`` when it is set (the deviceless
accelerator tool traces under the target device), else the default backend.
Tests and benchmarks pick a form with `use`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import optax

from clipjax._types import Implementation

NormsForm = Literal["cond", "multiscale"]


@dataclasses.dataclass(frozen=True)
class Forms:
  """The program forms of one trace.

  Attributes:
    name: ``'plain'``, ``'cpu'`` or ``'accelerator'`` (for messages and tests).
    norms: ``'cond'`` (plain sums, one rarely taken rescue branch) or
      ``'multiscale'`` (three scaled sums, no branch); numerics, not shaping,
      but chosen here too (the deprecated ``implementation=``).
    packed: small leaves' sums and maxima from rows packed into a few blocks
      (`_shaping.packing.packed`): fewer kernels for XLA's CPU compile time.
    chunked: per-leaf factors handed out in chunks that are buffers of their
      own (`_shaping.split_per_array`): one CPU kernel per kind of leaf, not per
      leaf.
    value_sums_from_output: `clip_by_value`'s post-clip sums over its output
      (fused into the loop that writes it on CPU) rather than as siblings of
      the norm's sums (one pass on a GPU).
    spam_reset: `spam`'s moment reset: ``'branch'`` (a conditional; leaves the
      moments untouched on CPU) or ``'select'`` (fuses into the optimizer's
      read on a GPU).
  """

  name: str
  norms: NormsForm = "cond"
  packed: bool = False
  chunked: bool = False
  value_sums_from_output: bool = False
  spam_reset: Literal["branch", "select"] = "select"

  def with_norms(self, implementation: Implementation | None) -> Forms:
    """These forms with a clipper's ``implementation=`` ('auto' or None keeps them)."""
    if implementation is None or implementation == "auto" or implementation == self.norms:
      return self
    return dataclasses.replace(self, norms=implementation)


PLAIN = Forms("plain")
CPU = Forms("cpu", packed=True, chunked=True, value_sums_from_output=True, spam_reset="branch")
ACCELERATOR = Forms("accelerator")

_CHOSEN: contextvars.ContextVar[Forms | None] = contextvars.ContextVar(
    "clipjax_forms", default=None
)


def platform() -> str:
  """The platform a trace is for: ``jax.default_device``'s if set, else the default backend's."""
  device = getattr(jax.config, "jax_default_device", None)
  if device is not None:
    return device if isinstance(device, str) else device.platform
  return jax.default_backend()


def for_trace(implementation: Implementation | None = None) -> Forms:
  """The forms for the update being traced (see the module docstring).

  Decided when tracing. `lax.platform_dependent` would decide when lowering,
  but traces every form: `clip_by_norm` alone on 10,000 leaves took 13.3 s to
  trace and lower that way, 8.9 s this way. A program lowered for another
  platform (`jax.export`) gets this one's forms: the same values, only slower.
  """
  chosen = _CHOSEN.get()
  if chosen is None:
    chosen = CPU if platform() == "cpu" else ACCELERATOR
  return chosen.with_norms(implementation)


@contextlib.contextmanager
def use(forms: Forms) -> Iterator[Forms]:
  """Traces the updates inside the block with `forms` (tests and benchmarks).

  A clipper's own ``implementation=`` other than 'auto' still picks its norms.
  """
  token = _CHOSEN.set(forms)
  try:
    yield forms
  finally:
    _CHOSEN.reset(token)


def with_forms(
    tx: optax.GradientTransformation, forms: Forms | Callable[[], Forms]
) -> optax.GradientTransformationExtraArgs:
  """`tx` whose updates are traced under `forms` (or `forms()`, called when tracing).

  The one entry point for benchmarks and tests that compare forms, e.g. the
  multiscale norms: ``with_forms(tx, lambda: for_trace().with_norms('multiscale'))``.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
    with use(forms() if callable(forms) else forms):
      return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def with_norms(tx: optax.GradientTransformation, norms: Implementation) -> Any:
  """`tx` with its norms computed as `norms` and the forms this trace would get otherwise."""
  return with_forms(tx, lambda: for_trace().with_norms(norms))
