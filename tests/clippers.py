"""The catalogue of clippers the common suite runs, with their references."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import clipjax
from tests import reference as ref


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable[..., Any]  # factory(threshold) -> transformation
  threshold_arg: str  # the hyperparameter that inject_hyperparams schedules
  threshold: float
  reference: Callable[..., list]  # (grads, params) -> clipped grads, float64
  static: dict = dataclasses.field(default_factory=dict)  # e.g. {"ord": 1}
  needs_params: bool = False
  # (grads) -> the keywords its update needs besides (updates, state, params).
  extra: Callable[[Any], dict] | None = None

  def extra_args(self, grads) -> dict:
    return {} if self.extra is None else self.extra(grads)

  def build(self, **kw):
    kw.setdefault(self.threshold_arg, self.threshold)
    return self.make(**self.static, **kw)

  def injected(self, threshold):
    """The factory through optax.inject_hyperparams, the threshold scheduled."""
    factory = optax.inject_hyperparams(self.make, static_args=tuple(self.static))
    return factory(**self.static, **{self.threshold_arg: threshold})


def _two_groups(updates):
  return {k: k in ("dense", "bias") for k in updates}


CASES = [
    Case("value", clipjax.clip_by_value, "max_delta", 0.5, lambda g, p: ref.clip_by_value(g, 0.5)),
    Case("norm", clipjax.clip_by_norm, "max_norm", 1.0, lambda g, p: ref.clip_by_norm(g, 1.0)),
    Case(
        "norm_l1",
        clipjax.clip_by_norm,
        "max_norm",
        2.0,
        lambda g, p: ref.clip_by_norm(g, 2.0, 1.0),
        {"ord": 1},
    ),
    Case(
        "global_norm",
        clipjax.clip_by_global_norm,
        "max_norm",
        1.0,
        lambda g, p: ref.clip_by_global_norm(g, 1.0),
    ),
    Case(
        "global_norm_l1",
        clipjax.clip_by_global_norm,
        "max_norm",
        3.0,
        lambda g, p: ref.clip_by_global_norm(g, 3.0, 1.0),
        {"ord": 1},
    ),
    Case(
        "global_norm_inf",
        clipjax.clip_by_global_norm,
        "max_norm",
        0.3,
        lambda g, p: ref.clip_by_global_norm(g, 0.3, float("inf")),
        {"ord": "inf"},
    ),
    Case(
        "global_norm_p3",
        clipjax.clip_by_global_norm,
        "max_norm",
        0.7,
        lambda g, p: ref.clip_by_global_norm(g, 0.7, 3.0),
        {"ord": 3},
    ),
    # The norm given is the gradients' own: it clips as clip_by_global_norm.
    Case(
        "given_norm",
        clipjax.clip_by_given_norm,
        "max_norm",
        1.0,
        lambda g, p: ref.clip_by_global_norm(g, 1.0),
        extra=lambda g: {"grad_norm": clipjax.global_norm(g)},
    ),
    # Two groups, by key, for the common suite's dict trees: leaves sorted by key
    # (bias, conv, dense, heads, scalar) are labelled dense/bias vs the rest.
    Case(
        "group_norm",
        clipjax.clip_by_group_norm,
        "max_norm",
        0.8,
        lambda g, p: ref.clip_by_group_norm(g, 0.8, [True, False, True, False, False]),
        {"labels": _two_groups},
    ),
    Case(
        "block_rms",
        clipjax.clip_by_block_rms,
        "threshold",
        0.3,
        lambda g, p: ref.clip_by_block_rms(g, 0.3),
    ),
    Case(
        "agc",
        clipjax.adaptive_grad_clip,
        "clipping",
        0.05,
        lambda g, p: ref.adaptive_grad_clip(g, p, 0.05),
        needs_params=True,
    ),
    # Stateful clippers: from a fresh state the first step is never clipped
    # (AutoClip's history holds only the current norm; ZClip is warming up).
    # Their multi-step behaviour is checked against NumPy loops in test_adaptive.
    Case("autoclip", clipjax.autoclip, "percentile", 10.0, lambda g, p: g, {"history": 16}),
    Case("zclip", clipjax.zclip, "z_thresh", 2.5, lambda g, p: g, {"warmup_steps": 3}),
    # AdaGC's warm-up (the suite's few steps) is global clipping at lambda_abs.
    Case(
        "adagc",
        clipjax.adagc,
        "lambda_abs",
        1.0,
        lambda g, p: ref.clip_by_global_norm(g, 1.0),
        {"warmup_steps": 10},
    ),
]

CASE_IDS = [c.name for c in CASES]


# Transforms judged over several steps (wrappers and recorders), for the suites
# that run each transform through a setup (sharding): built with the keywords
# given (e.g. axis_name), run over `steps` gradient trees, the last a spike.
@dataclasses.dataclass(frozen=True)
class Sequence:
  name: str
  make: Callable[..., Any]  # (**kw) -> transformation
  steps: int = 4
  spike: float = 50.0  # the last step's gradients are this many times larger


SEQUENCES = [
    Sequence("record_leaf_norms", lambda **kw: clipjax.record_leaf_norms(**kw)),
    Sequence(
        "skip_spikes",
        lambda **kw: clipjax.skip_spikes(
            optax.sgd(0.1), window=4, warmup=2, sigma=2.0, use_loss=False, **kw
        ),
    ),
    # Clipping from step 2 against Adam's second moment: the spike's entries clip.
    Sequence(
        "spam",
        lambda **kw: clipjax.spam(
            optax.adam(0.1), theta=4.0, clip_delay=2, reset_interval=100, warmup_steps=1, **kw
        ),
    ),
]
