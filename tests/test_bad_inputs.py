"""The catalogue of bad inputs: one table of (what is done, error type, message fragment).

Every row must fail with a clear error naming what is wrong, at construction
where the input is static, at the first (trace-time) update otherwise. Traced
hyperparameters cannot raise: what they do instead is tested in
test_robustness.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax

G = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}


def update(tx, grads=G, state=None, params=None, **extra):
  return tx.update(grads, tx.init(grads) if state is None else state, params, **extra)


def state_of(tx, grads=G):
  return tx.init(grads)


def _skip_update(**kw):
  g = {"w": jnp.ones((2, 2))}
  tx = clipjax.skip_spikes(optax.sgd(0.1))
  return tx.update(g, tx.init(g), **kw)


def _agc_update(params):
  g = {"w": jnp.ones((2, 2))}
  tx = clipjax.adaptive_grad_clip(0.1)
  return tx.update(g, tx.init(g), params)


CATALOGUE = [
    # --- static hyperparameters (construction)
    (
        "global_norm max_norm<0",
        lambda: clipjax.clip_by_global_norm(-1.0),
        ValueError,
        "max_norm must be >= 0",
    ),
    (
        "global_norm max_norm nan",
        lambda: clipjax.clip_by_global_norm(float("nan")),
        ValueError,
        "max_norm must be finite",
    ),
    (
        "global_norm ord 0.5",
        lambda: clipjax.clip_by_global_norm(1.0, ord=0.5),
        ValueError,
        "ord must be a number >= 1 or inf",
    ),
    (
        "global_norm ord string",
        lambda: clipjax.clip_by_global_norm(1.0, ord="fro"),
        ValueError,
        "ord must be a number >= 1 or inf",
    ),
    (
        "norm nonfinite",
        lambda: clipjax.clip_by_norm(1.0, nonfinite="ignore"),
        ValueError,
        "nonfinite must be one of",
    ),
    (
        "value max_delta array",
        lambda: clipjax.clip_by_value(np.ones(2)),
        ValueError,
        "max_delta must be a scalar",
    ),
    (
        "block_rms threshold bool",
        lambda: clipjax.clip_by_block_rms(True),
        TypeError,
        "threshold must be a real number",
    ),
    ("agc clipping 0", lambda: clipjax.adaptive_grad_clip(0.0), ValueError, "clipping must be > 0"),
    (
        "agc axis string",
        lambda: clipjax.adaptive_grad_clip(0.1, axis="rows"),
        TypeError,
        "axis must be None, an int or a tuple",
    ),
    (
        "norm_dtype float16",
        lambda: clipjax.clip_by_global_norm(1.0, norm_dtype="float16"),
        ValueError,
        "norm_dtype must be a floating dtype of at least 32 bits",
    ),
    (
        "axis_name empty tuple",
        lambda: clipjax.clip_by_global_norm(1.0, axis_name=()),
        ValueError,
        "axis_name must be 'auto', None",
    ),
    (
        "autoclip percentile 150",
        lambda: clipjax.autoclip(150.0),
        ValueError,
        "percentile must be <= 100",
    ),
    ("autoclip history 0", lambda: clipjax.autoclip(history=0), ValueError, "history must be >= 1"),
    (
        "autoclip history float",
        lambda: clipjax.autoclip(history=10.0),
        TypeError,
        "history must be an int",
    ),
    ("zclip alpha 1", lambda: clipjax.zclip(alpha=1.0), ValueError, "alpha must be < 1"),
    ("zclip mode", lambda: clipjax.zclip(mode="mad"), ValueError, "mode must be one of"),
    ("zclip z_thresh 0", lambda: clipjax.zclip(z_thresh=0.0), ValueError, "z_thresh must be > 0"),
    (
        "skip_spikes inner None",
        lambda: clipjax.skip_spikes(None),
        TypeError,
        "skip_spikes: inner must be an optax.GradientTransformation",
    ),
    (
        "skip_spikes inner function",
        lambda: clipjax.skip_spikes(optax.adam),
        TypeError,
        "skip_spikes: inner must be an optax.GradientTransformation",
    ),
    (
        "skip_spikes window 1",
        lambda: clipjax.skip_spikes(optax.sgd(0.1), window=1),
        ValueError,
        "window must be >= 2",
    ),
    (
        "skip_spikes warmup > window",
        lambda: clipjax.skip_spikes(optax.sgd(0.1), window=4, warmup=5),
        ValueError,
        "warmup must be <= 4",
    ),
    (
        "skip_spikes min_relative_std < 0",
        lambda: clipjax.skip_spikes(optax.sgd(0.1), min_relative_std=-0.1),
        ValueError,
        "min_relative_std must be >= 0",
    ),
    (
        "chain None",
        lambda: clipjax.chain(optax.sgd(0.1), None),
        TypeError,
        "chain: transform 1 must be an optax.GradientTransformation",
    ),
    # --- the public norm
    (
        "global_norm p=0.5",
        lambda: clipjax.global_norm({"a": jnp.array([3.0, 4.0])}, p=0.5),
        ValueError,
        "p must be a number >= 1 or inf",
    ),
    (
        "global_norm p=0",
        lambda: clipjax.global_norm({"a": jnp.array([3.0, 4.0])}, p=0),
        ValueError,
        "p must be a number >= 1 or inf",
    ),
    (
        "global_norm integer leaf",
        lambda: clipjax.global_norm({"a": jnp.arange(3)}),
        TypeError,
        "must be floating point",
    ),
    (
        "clip_by_global_norm ord=True",
        lambda: clipjax.clip_by_global_norm(1.0, ord=True),
        ValueError,
        "ord must be a number >= 1 or inf, got the bool True",
    ),
    (
        "skip_spikes loss='abc'",
        lambda: _skip_update(loss="abc"),
        TypeError,
        "skip_spikes: loss must be a real number or array",
    ),
    (
        "adaptive_grad_clip with an extra params leaf",
        lambda: _agc_update({"w": jnp.ones((2, 2)), "extra": jnp.ones(2)}),
        ValueError,
        "adaptive_grad_clip: params must have the updates' structure",
    ),
    (
        "global_norm implementation='gpu'",
        lambda: clipjax.global_norm({"a": jnp.array([3.0, 4.0])}, implementation="gpu"),
        ValueError,
        "implementation must be one of ('auto', 'cond', 'multiscale')",
    ),
    (
        "clip_by_norm implementation=2",
        lambda: clipjax.clip_by_norm(1.0, implementation=2),
        ValueError,
        "implementation must be one of",
    ),
    (
        "zclip implementation='CPU'",
        lambda: clipjax.zclip(implementation="CPU"),
        ValueError,
        "implementation must be one of",
    ),
    (
        "leaf_norms p=0.5",
        lambda: clipjax.leaf_norms({"a": jnp.array([3.0, 4.0])}, p=0.5),
        ValueError,
        "p must be a number >= 1 or inf",
    ),
    (
        "leaf_norms integer leaf",
        lambda: clipjax.leaf_norms({"a": jnp.arange(3)}),
        TypeError,
        "must be floating point",
    ),
    # --- gradients and states (first update)
    (
        "integer gradient",
        lambda: update(clipjax.clip_by_global_norm(1.0), {"w": jnp.arange(3)}),
        TypeError,
        "int32",
    ),
    (
        "complex gradient",
        lambda: update(clipjax.clip_by_norm(1.0), {"w": jnp.ones(2, jnp.complex64)}),
        TypeError,
        "complex",
    ),
    (
        "agc without params",
        lambda: update(clipjax.adaptive_grad_clip(0.1)),
        ValueError,
        "needs the current parameters",
    ),
    (
        "agc params shape",
        lambda: update(
            clipjax.adaptive_grad_clip(0.1), params={"w": jnp.ones((3, 2)), "b": jnp.ones(3)}
        ),
        ValueError,
        "params and updates differ",
    ),
    (
        "agc rank 5 without axis",
        lambda: update(
            clipjax.adaptive_grad_clip(0.1),
            {"w": jnp.ones((2, 1, 1, 1, 2))},
            params={"w": jnp.ones((2, 1, 1, 1, 2))},
        ),
        ValueError,
        "Pass axis=",
    ),
    (
        "autoclip state of another history",
        lambda: update(clipjax.autoclip(history=8), state=state_of(clipjax.autoclip(history=16))),
        ValueError,
        "history=8",
    ),
    (
        "zclip state of another warm-up",
        lambda: update(clipjax.zclip(warmup_steps=5), state=state_of(clipjax.zclip())),
        ValueError,
        "warmup_steps=5",
    ),
    (
        "skip_spikes state of another window",
        lambda: update(
            clipjax.skip_spikes(optax.sgd(0.1), window=8, use_loss=False),
            state=state_of(clipjax.skip_spikes(optax.sgd(0.1), use_loss=False)),
        ),
        ValueError,
        "window=8",
    ),
    (
        "zclip state to autoclip",
        lambda: update(clipjax.autoclip(), state=state_of(clipjax.zclip())),
        TypeError,
        "expected AutoClipState",
    ),
    (
        "autoclip state to zclip",
        lambda: update(clipjax.zclip(), state=state_of(clipjax.autoclip())),
        TypeError,
        "expected ZClipState",
    ),
    (
        "autoclip state to global norm",
        lambda: update(clipjax.clip_by_global_norm(1.0), state=state_of(clipjax.autoclip())),
        TypeError,
        "expected ClipState",
    ),
    (
        "zclip state to value",
        lambda: update(clipjax.clip_by_value(1.0), state=state_of(clipjax.zclip())),
        TypeError,
        "expected ClipState",
    ),
    (
        "global norm state to autoclip",
        lambda: update(clipjax.autoclip(), state=state_of(clipjax.clip_by_global_norm(1.0))),
        TypeError,
        "expected AutoClipState",
    ),
    (
        "optax state to clipper",
        lambda: update(clipjax.clip_by_norm(1.0), state=optax.EmptyState()),
        TypeError,
        "expected ClipState",
    ),
    (
        "skip_spikes without loss",
        lambda: update(clipjax.skip_spikes(optax.sgd(0.1))),
        ValueError,
        "needs update(..., loss=loss)",
    ),
    (
        "skip_spikes loss of a batch",
        lambda: update(clipjax.skip_spikes(optax.sgd(0.1)), loss=jnp.ones(3)),
        ValueError,
        "loss must be a scalar",
    ),
    (
        "axis_name function of the wrong structure",
        lambda: update(clipjax.clip_by_global_norm(1.0, axis_name=lambda g: {"w": None})),
        ValueError,
        "axis_name(updates) must return a prefix of the updates' structure",
    ),
]


@pytest.mark.parametrize(
    "action,exc,fragment", [row[1:] for row in CATALOGUE], ids=[row[0] for row in CATALOGUE]
)
def test_bad_input_gets_a_clear_error(action, exc, fragment):
  with pytest.raises(exc) as info:
    action()
  assert fragment in str(info.value)


def test_states_of_the_fixed_threshold_clippers_are_interchangeable():
  # They share ClipState (the same counters, the same meaning): no error.
  state = state_of(clipjax.clip_by_value(1.0))
  for tx in (
      clipjax.clip_by_norm(1.0),
      clipjax.clip_by_global_norm(1.0),
      clipjax.clip_by_block_rms(1.0),
  ):
    _, new = tx.update(G, state)
    assert int(new.num_steps) == 1
