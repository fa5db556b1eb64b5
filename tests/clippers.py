"""The catalogue of every public transform, with flags that the parametrised tests filter on.

`CATALOGUE` holds one or more cases per public transform (a test fails when a
transform of ``clipjax.__all__`` has none). `CASES` are the clippers judged on
one step against a float64 reference; the others are wrappers, recorders and
DP-SGD, judged over several steps or with batch-axis gradients. A new
transform is added here once, with its flags, and every suite picks it up.
"""

from __future__ import annotations

import dataclasses
import inspect
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
  # (grads, params) -> clipped grads, float64; None: no one-step reference (a
  # wrapper or recorder judged over several steps, or batch-axis gradients).
  reference: Callable[..., list] | None
  static: dict = dataclasses.field(default_factory=dict)  # e.g. {"ord": 1}
  needs_params: bool = False
  # (grads) -> the keywords its update needs besides (updates, state, params).
  extra: Callable[[Any], dict] | None = None
  # The public factory this case builds (None: `make` is it).
  factory: Callable[..., Any] | None = None
  # Flags the suites filter on:
  takes_axis_name: bool = True  # reduces over mapped axes inside shard_map
  rescue: bool = True  # its norms have the rescue branch (ord 1 or 2, computed here)
  per_leaf_factors: bool = False  # a factor per leaf or unit, handed out by split_per_array
  per_example: bool = False  # takes gradients with a leading batch axis
  sequence: bool = False  # a wrapper or recorder, judged over several steps

  def extra_args(self, grads) -> dict:
    return {} if self.extra is None else self.extra(grads)

  def build(self, **kw):
    kw.setdefault(self.threshold_arg, self.threshold)
    return self.make(**self.static, **kw)

  def injected(self, threshold):
    """The factory through optax.inject_hyperparams, the threshold scheduled."""
    make = self.make
    params = inspect.signature(make).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
      # (a catalogue lambda taking **kw: inject_hyperparams would pass kw={} on)
      arg, static = self.threshold_arg, dict(self.static)

      def only_the_threshold(**kw):
        return make(**static, **kw)

      only_the_threshold.__signature__ = inspect.Signature(
          [inspect.Parameter(arg, inspect.Parameter.KEYWORD_ONLY)]
      )
      return optax.inject_hyperparams(only_the_threshold)(**{arg: threshold})
    factory = optax.inject_hyperparams(make, static_args=tuple(self.static))
    return factory(**self.static, **{self.threshold_arg: threshold})

  @property
  def public(self) -> Callable[..., Any]:
    return self.make if self.factory is None else self.factory


def _two_groups(updates):
  return {k: k in ("dense", "bias") for k in updates}


CASES = [
    Case("value", clipjax.clip_by_value, "max_delta", 0.5, lambda g, p: ref.clip_by_value(g, 0.5)),
    Case(
        "norm",
        clipjax.clip_by_norm,
        "max_norm",
        1.0,
        lambda g, p: ref.clip_by_norm(g, 1.0),
        per_leaf_factors=True,
    ),
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
        rescue=False,
    ),
    Case(
        "global_norm_p3",
        clipjax.clip_by_global_norm,
        "max_norm",
        0.7,
        lambda g, p: ref.clip_by_global_norm(g, 0.7, 3.0),
        {"ord": 3},
        rescue=False,
    ),
    # The norm given is the gradients' own: it clips as clip_by_global_norm.
    Case(
        "given_norm",
        clipjax.clip_by_given_norm,
        "max_norm",
        1.0,
        lambda g, p: ref.clip_by_global_norm(g, 1.0),
        extra=lambda g: {"grad_norm": clipjax.global_norm(g)},
        takes_axis_name=False,
        rescue=False,
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
        per_leaf_factors=True,
    ),
    Case(
        "block_rms",
        clipjax.clip_by_block_rms,
        "threshold",
        0.3,
        lambda g, p: ref.clip_by_block_rms(g, 0.3),
        per_leaf_factors=True,
    ),
    Case(
        "agc",
        clipjax.adaptive_grad_clip,
        "clipping",
        0.05,
        lambda g, p: ref.adaptive_grad_clip(g, p, 0.05),
        needs_params=True,
        per_leaf_factors=True,
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
        per_leaf_factors=True,
    ),
]

CASE_IDS = [c.name for c in CASES]


def _unused(g, p):
  return g


# The wrappers and recorders (judged over several steps, a spike last, where a
# suite runs them through a setup), and DP-SGD (batch-axis gradients).
OTHERS = [
    Case(
        "record_leaf_norms",
        lambda **kw: clipjax.record_leaf_norms(**kw),
        "ord",
        2.0,
        None,
        factory=clipjax.record_leaf_norms,
        sequence=True,
    ),
    Case(
        "skip_spikes",
        lambda sigma, **kw: clipjax.skip_spikes(
            optax.sgd(0.1), window=4, warmup=2, sigma=sigma, use_loss=False, **kw
        ),
        "sigma",
        2.0,
        None,
        factory=clipjax.skip_spikes,
        sequence=True,
    ),
    # A fixed threshold alone (axlearn's drop_norm): the catalogue trees' norms are
    # about 20, the spike's about 1000.
    Case(
        "skip_spikes_max_norm",
        lambda max_norm, **kw: clipjax.skip_spikes(
            optax.sgd(0.1), sigma=None, max_norm=max_norm, use_loss=False, **kw
        ),
        "max_norm",
        100.0,
        None,
        factory=clipjax.skip_spikes,
        sequence=True,
    ),
    # Clipping from step 2 against Adam's second moment: the spike's entries clip.
    Case(
        "spam",
        lambda theta, **kw: clipjax.spam(
            optax.adam(0.1), theta=theta, clip_delay=2, reset_interval=100, warmup_steps=1, **kw
        ),
        "theta",
        4.0,
        None,
        factory=clipjax.spam,
        sequence=True,
    ),
    Case(
        "per_example_clip",
        lambda l2_norm_clip, **kw: clipjax.per_example_clip(
            l2_norm_clip, reduction="sum", noise_multiplier=0.5, **kw
        ),
        "l2_norm_clip",
        1.0,
        None,
        factory=clipjax.per_example_clip,
        per_example=True,
    ),
    Case(
        "dp_noise",
        lambda noise_multiplier, **kw: clipjax.dp_noise(1.0, noise_multiplier, batch_size=8, **kw),
        "noise_multiplier",
        0.5,
        None,
        factory=clipjax.dp_noise,
        rescue=False,
    ),
]

CATALOGUE = CASES + OTHERS
SEQUENCES = [c for c in CATALOGUE if c.sequence]
# A spike's size, relative to the other steps' gradients, for the sequences.
SPIKE = 50.0
