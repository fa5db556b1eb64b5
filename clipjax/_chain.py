"""A drop-in for ``optax.chain`` that honours skipped steps."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from clipjax import _policy, _validate


def skip_flag(state: Any) -> jax.Array | None:
  """OR of every ``skipped`` field in `state`, or None if it has none (static)."""
  found = [v for _, v in optax.tree.get_all_with_path(state, "skipped")]
  if not found:
    return None
  return jnp.any(jnp.stack([jnp.asarray(v, jnp.bool_).reshape(()) for v in found]))


def chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Like ``optax.chain``, but a step one link marks ``skipped`` stops the chain there.

  When a link's state has a true ``skipped`` field (a clipper built with
  ``nonfinite='skip'``, or :func:`clipjax.skip_spikes`), the links after it are
  not run for that step (``lax.cond``): their states are returned unchanged and
  the update is zero, so e.g. Adam's moments and step count do not move. With
  no skipping link it behaves exactly like ``optax.chain``; its state is the
  same tuple of link states.

  Args:
    *transforms: the links, applied in order.

  Returns:
    A ``GradientTransformationExtraArgs``; extra keyword arguments to
    ``update`` (e.g. ``loss=``) go to every link that accepts them.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> opt = clipjax.chain(clipjax.clip_by_global_norm(1.0, nonfinite='skip'),
    ...                     optax.adam(0.1))
    >>> params = {'w': jnp.ones(2)}
    >>> state = opt.init(params)
    >>> bad = {'w': jnp.array([jnp.nan, 1.0])}
    >>> updates, new_state = opt.update(bad, state, params)
    >>> updates['w'], int(new_state[1][0].count)
    (Array([0., 0.], dtype=float32), 0)
  """
  for i, t in enumerate(transforms):
    _validate.transformation(t, f"chain: transform {i}")
  links = tuple(optax.with_extra_args_support(t) for t in transforms)

  def init_fn(params):
    return tuple(t.init(params) for t in links)

  def run(i: int, updates, states: Sequence[Any], params, extra) -> tuple[Any, tuple]:
    if i == len(links):
      return updates, ()
    # A link with links after it in this chain has its skips honoured; the last
    # one is as honoured as this chain is where it stands (e.g. inside optax.chain).
    honoured = _policy.skip_honoured() if i + 1 < len(links) else contextlib.nullcontext()
    with honoured:
      updates, new_state = links[i].update(updates, states[i], params, **extra)
    skip = skip_flag(new_state) if i + 1 < len(links) else None
    if skip is None:
      updates, rest = run(i + 1, updates, states, params, extra)
      return updates, (new_state, *rest)

    def skipped(operands):
      u, _ = operands
      return jax.tree.map(jnp.zeros_like, u), tuple(states[i + 1:])

    def not_skipped(operands):
      u, p = operands
      return run(i + 1, u, states, p, extra)

    updates, rest = lax.cond(skip, skipped, not_skipped, (updates, params))
    return updates, (new_state, *rest)

  def update_fn(updates, state, params=None, **extra_args):
    return run(0, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
