"""SPAM: spike-aware clipping against the optimizer's second moment, periodic momentum resets."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _axes, _base, _forms, _validate
from clipjax._stats import register_stats_type
from clipjax._types import AxisSpec, PyTree, Scalar

# The inner states whose moments SPAM reads (nu) and resets (mu, nu).
MOMENT_STATES: tuple[type, ...] = (optax.ScaleByAdamState,)


@register_stats_type
class SpamState(NamedTuple):
  """State of :func:`clipjax.spam`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    num_steps: steps taken so far.
    num_resets: momentum resets so far.
    entries_clipped: how many gradient entries were clipped at the last step.
    lr_scale: the warm-up factor applied to the last update.
  """

  inner_state: Any
  num_steps: jax.Array
  num_resets: jax.Array
  entries_clipped: jax.Array
  lr_scale: jax.Array


def _is_moments(x: Any) -> bool:
  return isinstance(x, MOMENT_STATES)


def _moment_nodes(state: Any) -> list[Any]:
  return [n for n in jax.tree.leaves(state, is_leaf=_is_moments) if _is_moments(n)]


def spam(
    inner: optax.GradientTransformation,
    *,
    theta: Scalar = 5000.0,
    reset_interval: int | None = None,
    warmup_steps: int | None = None,
    clip_delay: int | None = None,
    axis_name: AxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SPAM around an Adam-family optimizer: spike-aware clipping and momentum resets.

  With :math:`v` the inner optimizer's second-moment estimate (before this
  step's update) and step :math:`t` counted from 1:

  - **spike-aware clipping**: an entry with :math:`g^2 > \theta v` is set to
    :math:`\operatorname{sign}(g)\sqrt{\theta v}`; it starts at step
    `clip_delay` and pauses for the first `clip_delay` steps after each reset
    (:math:`t \bmod T \ge` `clip_delay`, T = `reset_interval`). Against a
    zero :math:`v` every nonzero entry is clipped to 0, as in the reference:
    with `clip_delay` below 2, step 1 clips against the initial
    :math:`v = 0`, so :math:`v` stays 0 and nothing moves until the first
    reset: it must be >= 2;
  - **momentum reset**: at every step with :math:`t \bmod T = 0`, the first
    and second moments are zeroed (their step count, and so Adam's bias
    correction, is kept);
  - **warm-up**: after a reset the update is scaled by
    :math:`1 - 0.99\,(1 + \cos(\pi (k + 1) / (W + 1)))/2` for the k-th step
    since it (k < W = `warmup_steps`), then by 1.

  These are the rules of the SPAM optimizer as pytorch-optimizer implements it
  (with its default density 1, i.e. no sparse masks), as a wrapper over any
  optax optimizer whose state holds ``optax.ScaleByAdamState`` moments (adam,
  adamw, ... also inside chains, ``inject_hyperparams`` or ``MultiSteps``). The
  clipping reads the first such state's ``nu``; every such state is reset.

  Args:
    inner: the optimizer; its state must contain an ``optax.ScaleByAdamState``
      (a ValueError at ``init`` otherwise).
    theta: the spike threshold on :math:`g^2 / v`, >= 0 (0: no clipping). May be
      scheduled.
    reset_interval: T, static int >= 1 and >= `warmup_steps`; None means 500.
    warmup_steps: W, static int >= 0; None means 50.
    clip_delay: static int >= 2 (below 2 the first step clips every entry to
      0 against the initial zero second moment, and the run stalls until the
      first reset); None means 20.
    axis_name: inside ``shard_map``, the mapped axes the gradients are sharded
      over, as in :func:`clipjax.clip_by_global_norm` (``'auto'``, names or
      the gradients' PartitionSpecs). The clipping is element-wise and needs
      none; with it, ``entries_clipped`` counts over the whole model on every
      device instead of on each shard.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`SpamState`.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> opt = clipjax.spam(optax.adam(1e-3), clip_delay=2)  # theta 5000
    >>> params = {'w': jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> for g in ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1e4, 1.0]):  # a spike in entry 1
    ...   u, state = opt.update({'w': jnp.array(g)}, state, params)
    >>> int(state.entries_clipped)  # 1e8 > 5000 v; 1 < 5000 v (v ~ 0.002)
    1

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025; pytorch-optimizer's
    ``SPAM``.
  """
  _validate.transformation(inner, "spam: inner")
  _validate.scalar(theta, "theta", low=0.0)
  gap = _validate.integer(500 if reset_interval is None else reset_interval, "reset_interval")
  warmup = _validate.integer(50 if warmup_steps is None else warmup_steps, "warmup_steps", low=0)
  # Below 2, step 1 clips every entry to 0 against the initial v = 0, so v
  # stays 0 and the run does not move until the first reset.
  delay = _validate.integer(20 if clip_delay is None else clip_delay, "clip_delay", low=2)
  if gap < warmup:
    raise ValueError(
        f"spam: reset_interval ({gap}) is shorter than warmup_steps ({warmup}): the "
        "learning rate would never get back to full scale between resets."
    )
  _validate.axis_name(axis_name)
  inner = optax.with_extra_args_support(inner)
  who = "spam"

  def init_fn(params: PyTree) -> SpamState:
    inner_state = inner.init(params)
    if not _moment_nodes(inner_state):
      raise ValueError(
          f"{who}: the inner optimizer's state holds no "
          f"{', '.join(t.__name__ for t in MOMENT_STATES)} (first and second moments to clip "
          "against and reset): use an Adam-family optimizer."
      )
    return SpamState(
        inner_state=inner_state,
        num_steps=jnp.zeros([], jnp.int32),
        num_resets=jnp.zeros([], jnp.int32),
        entries_clipped=jnp.zeros([], jnp.int32),
        lr_scale=jnp.ones([], jnp.float32),
    )

  def update_fn(
      updates: PyTree, state: SpamState, params: PyTree | None = None, **extra: Any
  ) -> tuple[PyTree, SpamState]:
    _base.check_state(state, SpamState, who)
    _validate.check_gradient_leaves(updates, who)
    step = state.num_steps + 1
    reset = step % gap == 0

    def on_moments(inner_state: Any, fn: Any) -> Any:
      def moments(node: Any) -> Any:
        if not _is_moments(node):
          return node
        return node._replace(mu=jax.tree.map(fn, node.mu), nu=jax.tree.map(fn, node.nu))

      return jax.tree.map(moments, inner_state, is_leaf=_is_moments)

    def branch(inner_state: Any) -> Any:
      # XLA's CPU backend materializes a select of the moments (a read and a
      # write of both every step), so there a branch leaves them untouched on
      # the other T - 1 steps.
      return jax.lax.cond(reset, lambda s: on_moments(s, jnp.zeros_like), lambda s: s, inner_state)

    def select(inner_state: Any) -> Any:
      # On a GPU the select fuses into the optimizer's own read of the moments,
      # while the branch's pass-through copies both of them on every step (an
      # H200, GPT-2 small: 296 copies, 0.96 ms, where Adam's whole step is 1.1 ms
      # of kernels; with the select, 206 kernels and 1.66 ms).
      return on_moments(inner_state, lambda m: jnp.where(reset, jnp.zeros_like(m), m))

    reset_forms = {"branch": branch, "select": select}
    inner_state = reset_forms[_forms.for_trace().spam_reset](state.inner_state)
    nu = _moment_nodes(inner_state)[0].nu
    nu_def: Any = jax.tree.structure(nu)
    if nu_def != jax.tree.structure(updates):
      raise ValueError(f"{who}: the inner optimizer's moments do not have the updates' structure")

    th = _base.hyper(theta, jnp.float32)
    # (theta = inf, like 0, clips nothing: inf * v would be NaN where v = 0)
    active = (th > 0) & (th < jnp.inf) & (step >= delay) & (step % gap >= delay)

    def clip(g: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
      # g^2 > theta v, set to sign(g) sqrt(theta v), is |g| > b clipped to +-b
      # with b = sqrt(theta v); in that form the clip and the count share one
      # bound and one test, and XLA's CPU backend no longer copies the old nu
      # (the select form kept it alive past nu's in-place update): 3.7-4.2x ->
      # 2.5-3.0x Adam on CPU (benchmarks/RESULTS.md). It still writes the
      # count's mask and b out (one pass each).
      ct = jnp.promote_types(g.dtype, jnp.float32)
      g32 = g.astype(ct)
      bound = jnp.where(active, jnp.sqrt(th.astype(ct) * v.astype(ct)), jnp.inf)
      out = jnp.clip(g32, -bound, bound).astype(g.dtype)
      return out, jnp.sum(jnp.abs(g32) > bound, dtype=jnp.int32)

    leaves, treedef = jax.tree.flatten(updates)
    results = [clip(g, v) for g, v in zip(leaves, jax.tree.leaves(nu))]
    counts = _axes.psum_grouped([r[1] for r in results], _axes.leaf_axes(axis_name, updates, who))
    clipped = jax.tree.unflatten(treedef, [r[0] for r in results])
    out, new_inner = inner.update(clipped, inner_state, params, **extra)

    # The warm-up clock: steps since the reset (k = step mod T from the first
    # reset on; before it, past the warm-up). The reference restarts its clock at
    # the end of step max(T, 2) - 1, i.e. from step max(T, 2).
    k = jnp.where(step >= max(gap, 2), step % gap, warmup)
    death = jnp.where(
        k >= warmup,
        0.0,
        0.99 * (1 + jnp.cos(math.pi * (k + 1).astype(jnp.float32) / (warmup + 1))) / 2,
    )
    # A NaN theta makes the step non-finite (through the scale every entry takes).
    lr_scale = _base.poison((1.0 - death).astype(jnp.float32), th)
    out = jax.tree.map(lambda u: (u * lr_scale.astype(u.dtype)).astype(u.dtype), out)
    return out, _base.in_place(
        state,
        SpamState(
            inner_state=new_inner,
            num_steps=step,
            num_resets=step // gap,
            entries_clipped=sum(counts, jnp.zeros([], jnp.int32)),
            lr_scale=lr_scale,
        ),
        skip=("inner_state",),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
