"""How a clipper's program is shaped for XLA: one `Forms` per trace, the only switch.

What a clipper computes is fixed by its definition; how it is written for XLA
is not. Some forms exist only because a backend compiles them better: packed
sums and chunked factors for XLA's CPU backend; on a GPU, norms summed in
float64 (no rescue branch, no conditional), small leaves reduced together and
`clip_by_value`'s statistics in Adam's read; the TPU gets the reference
program. Each clipper's update asks `for_trace` once, at its start, and
passes the `Forms` down to every function whose program depends on it;
nothing below reads the backend again. Every form computes the same values
(to the summation order and the last bit of a float32 norm): `PLAIN` is the
reference program, a test runs every clipper of the catalogue under each form
and compares them, and the numerics tests run under the GPU's forms too.

The forms follow ``jax.default_device`` when it is set (a deviceless compile
for a GPU or TPU, `benchmarks/accel_programs.py`, traces under the target
device), else the default backend. Tests and benchmarks pick a form with `use`.
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

NormsForm = Literal["cond", "multiscale", "wide"]


@dataclasses.dataclass(frozen=True)
class Forms:
  """The program forms of one trace.

  Attributes:
    name: ``'plain'``, ``'cpu'``, ``'gpu'`` or ``'tpu'`` (for messages and tests).
    norms: ``'cond'`` (plain sums, one rarely taken rescue branch),
      ``'multiscale'`` (three scaled sums, no branch) or ``'wide'`` (sums of
      float32/bfloat16/float16 powers accumulated in float64, which can neither
      overflow nor underflow: no branch, one read; a GPU runs float64 at full
      memory speed, a TPU emulates it); numerics, not shaping, but chosen here
      too (the deprecated ``implementation=``).
    factor_branch: per-unit clip factors behind a conditional skipped when no
      unit is clipped (XLA's CPU backend then fuses no chain of slices into
      each leaf's loop); else computed directly (no conditional: on a GPU one
      costs a host round trip).
    packed: small leaves' sums and maxima from rows packed into a few blocks
      (`_shaping.packing.packed`): fewer kernels for XLA's CPU compile time.
    chunked: per-leaf factors handed out in chunks that are buffers of their
      own (`_shaping.split_per_array`): one CPU kernel per kind of leaf, not per
      leaf.
    folded_columns: float64 sums over leading axes that keep few entries
      read the array as rows side by side (`_shaping.arrays.leading_sum`):
      XLA's GPU backend then fuses the conversion into the reduction.
    value_stats: where `clip_by_value` reads its statistics (norm, maxima,
      post-clip sums): ``'siblings'`` (reductions of the gradients beside the
      norm's), ``'output'`` (the post-clip sums over its output, fused into
      the loop that writes it on CPU) or ``'rows'`` (per-row partial sums that
      XLA's GPU backend computes in the optimizer's own read of the gradients,
      the clipped values not waiting for them; one reduction of all partials).
    spam_reset: `spam`'s moment reset: ``'branch'`` (a conditional; leaves the
      moments untouched on CPU) or ``'select'`` (fuses into the optimizer's
      read on a GPU).
  """

  name: str
  norms: NormsForm = "cond"
  factor_branch: bool = True
  packed: bool = False
  chunked: bool = False
  value_stats: Literal["siblings", "output", "rows"] = "siblings"
  folded_columns: bool = False
  spam_reset: Literal["branch", "select"] = "select"

  def with_norms(self, implementation: Implementation | NormsForm | None) -> Forms:
    """These forms with a clipper's ``implementation=`` ('auto' or None keeps them)."""
    if implementation is None or implementation == "auto" or implementation == self.norms:
      return self
    return dataclasses.replace(self, norms=implementation)


PLAIN = Forms("plain")
CPU = Forms("cpu", packed=True, chunked=True, value_stats="output", spam_reset="branch")
GPU = Forms("gpu", norms="wide", factor_branch=False, folded_columns=True, value_stats="rows")
TPU = Forms("tpu")
NAMED = {f.name: f for f in (PLAIN, CPU, GPU, TPU)}
# Each platform's forms; any other platform gets the reference program.
BY_PLATFORM = {"cpu": CPU, "gpu": GPU, "cuda": GPU, "rocm": GPU, "tpu": TPU}

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
    chosen = BY_PLATFORM.get(platform(), PLAIN)
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
