"""What a clipper does with non-finite gradients.

- ``propagate`` (default): nothing special; inf/NaN flow into the update as in
  PyTorch's ``clip_grad_norm_(error_if_nonfinite=False)`` and optax. For the
  global-norm clipper: a NaN norm compares false with the threshold, so the
  update is passed unscaled with its NaN entries; an inf norm gives a scale of 0,
  so finite entries become 0 and inf entries NaN. Cheapest; pair with
  ``optax.apply_if_finite`` or check the ``num_nonfinite`` count.
- ``zero``: the update is replaced by zeros; downstream transforms still run
  (Adam's moments decay and its step count advances).
- ``skip``: like ``zero``, and the state's ``skipped`` flag is set, so
  :func:`clipjax.chain` leaves every later transform (e.g. the optimizer) and
  its state untouched for this step, without computing it. A plain
  ``optax.chain`` cannot honour the flag (the optimizer still sees a zero
  update: Adam's moments decay and its count advances), so a ``'skip'``
  clipper traced outside :func:`clipjax.chain` warns once per trace.
- ``raise``: a ``jax.experimental.checkify`` check. Under ``jit`` the step must
  be functionalized with ``checkify.checkify`` (``errors=checkify.user_checks``)
  and the returned error thrown with ``err.throw()``; no host sync is added to
  the step itself. Outside ``jit`` the check raises at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import checkify

# True while clipjax.chain traces its links: a skipped step then stops the chain.
_SKIP_HONOURED = contextvars.ContextVar("clipjax_skip_honoured", default=False)


@contextlib.contextmanager
def skip_honoured():
  """Marks the transforms updated inside the block as links of a skip-aware chain."""
  token = _SKIP_HONOURED.set(True)
  try:
    yield
  finally:
    _SKIP_HONOURED.reset(token)


def apply_policy(policy: str, updates, finite: jax.Array, who: str):
  """Returns (updates, skipped) after applying the non-finite `policy`."""
  if policy == "skip" and not _SKIP_HONOURED.get():
    warnings.warn(
        f"{who}(nonfinite='skip') is updated outside clipjax.chain: on a skipped step the "
        "transforms after it (e.g. the optimizer) still run on a zero update, so Adam's "
        "moments decay and its step count advances. Build the optimizer with "
        "clipjax.chain(...) instead of optax.chain(...) to leave them untouched.",
        UserWarning, stacklevel=4)
  if policy == "propagate":
    return updates, jnp.zeros([], jnp.bool_)
  if policy == "raise":
    checkify.check(finite, f"{who}: non-finite gradient norm (inf or NaN gradients).")
    return updates, jnp.zeros([], jnp.bool_)
  zeroed = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
  skipped = ~finite if policy == "skip" else jnp.zeros([], jnp.bool_)
  return zeroed, skipped
