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
  its state untouched for this step, without computing it.
- ``raise``: a ``jax.experimental.checkify`` check. Under ``jit`` the step must
  be functionalized with ``checkify.checkify`` (``errors=checkify.user_checks``)
  and the returned error thrown with ``err.throw()``; no host sync is added to
  the step itself. Outside ``jit`` the check raises at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify


def apply_policy(policy: str, updates, finite: jax.Array, who: str):
  """Returns (updates, skipped) after applying the non-finite `policy`."""
  if policy == "propagate":
    return updates, jnp.zeros([], jnp.bool_)
  if policy == "raise":
    checkify.check(finite, f"{who}: non-finite gradient norm (inf or NaN gradients).")
    return updates, jnp.zeros([], jnp.bool_)
  zeroed = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
  skipped = ~finite if policy == "skip" else jnp.zeros([], jnp.bool_)
  return zeroed, skipped
