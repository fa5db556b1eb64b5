"""Hypothesis properties of the norm clippers and of per-example clipping."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import clipjax
from clipjax import _forms
from tests import reference as ref

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)
# Tree layouts come from a fixed list (scalars, vectors, a size-1 axis, rank 3,
# an empty leaf), so that each clipper is compiled once per layout rather than
# once per example: the values, not the shapes, are what the properties vary.
LAYOUTS = (
    ((3,),),
    ((), (5,)),
    ((2, 3), (4,)),
    ((4, 1, 2), (), (6,)),
    ((2, 2, 2), (3,), (1,), (5, 5)),
    ((0,), (3, 2)),
)


@st.composite
def _trees(draw):
  layout = draw(st.sampled_from(LAYOUTS))
  return [draw(hnp.arrays(np.float32, shape, elements=finite)) for shape in layout]


trees = _trees()
thresholds = st.floats(1e-3, 1e3)
orders = st.sampled_from([1.0, 2.0, 3.0, np.inf])
FACTORIES = {
    "global_norm": clipjax.clip_by_global_norm,
    "norm": clipjax.clip_by_norm,
    "block_rms": clipjax.clip_by_block_rms,
    "value": clipjax.clip_by_value,
}


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in tree])


@functools.cache
def _jitted(name, **static):
  """jit(update) of clipper `name` with its threshold traced: one compile per tree layout."""

  def run(tree, threshold):
    tx = FACTORIES[name](threshold, **static)
    return tx.update(tree, tx.init(tree))[0]

  return jax.jit(run)


def _run(name, tree, threshold, **static):
  return _jitted(name, **static)([jnp.asarray(x) for x in tree], jnp.float32(threshold))


def _pnorm(v, p):
  return np.max(np.abs(v), initial=0) if np.isinf(p) else np.sum(np.abs(v) ** p) ** (1 / p)


@given(trees, thresholds, orders)
def test_global_clip_bounds_the_norm_and_keeps_the_direction(tree, max_norm, p):
  out = _flat(_run("global_norm", tree, max_norm, ord=p))
  g = _flat(tree)
  assert _pnorm(out, p) <= max_norm * (1 + 1e-6) + 1e-30
  if np.linalg.norm(g) > 0:
    # out = s * g with 0 < s <= 1: direction kept.
    s = np.dot(out, g) / np.dot(g, g)
    assert 0 <= s <= 1 + 1e-6
    np.testing.assert_allclose(out, s * g, rtol=1e-5, atol=1e-6 * np.abs(g).max())


@given(trees, thresholds, orders)
def test_identity_below_threshold(tree, max_norm, p):
  g = _flat(tree)
  if _pnorm(g, p) > max_norm * (1 - 1e-6):
    scaled = [x * np.float32(0.5 * max_norm / max(_pnorm(g, p), 1e-30)) for x in tree]
  else:
    scaled = tree
  out = _run("global_norm", scaled, max_norm, ord=p)
  # Exact, except that XLA flushes subnormal results to zero (docs/numerics.md).
  expected = _flat(scaled)
  expected = np.where(np.abs(expected) < np.finfo(np.float32).tiny, 0, expected)
  np.testing.assert_array_equal(_flat(out), expected)


@given(trees, thresholds)
def test_idempotent(tree, max_norm):
  for name in FACTORIES:
    once = _run(name, tree, max_norm)
    twice = _run(name, once, max_norm)
    np.testing.assert_allclose(_flat(twice), _flat(once), rtol=2e-6, atol=1e-30)


@given(trees, thresholds)
def test_per_leaf_clip_bounds_every_leaf(tree, max_norm):
  out = _run("norm", tree, max_norm)
  for o in jax.tree.leaves(out):
    assert np.linalg.norm(np.asarray(o, np.float64)) <= max_norm * (1 + 1e-6)


# Per-example clipping: the layouts above with a leading batch axis of 3 (an empty
# leaf too); each example's clipped gradient has norm <= C (or its leaf <= its
# budget), so the sum has norm <= 3 C, and an example below C passes unchanged.
@functools.cache
def _per_example(per_layer):
  def run(tree, clip):
    tx = clipjax.per_example_clip(clip, per_layer=per_layer, reduction="sum")
    return tx.update(tree, tx.init(None))

  return jax.jit(run)


@given(trees, thresholds, st.sampled_from([None, "uniform", "proportional"]))
def test_per_example_clip_bounds_each_example(tree, clip, per_layer):
  batch = [np.stack([x, -0.5 * x, 0.01 * x]) for x in tree]  # 3 examples
  out, state = _per_example(per_layer)([jnp.asarray(x) for x in batch], jnp.float32(clip))
  expected, _ = ref.per_example_clip(batch, clip, per_layer)
  got = _flat(out)
  np.testing.assert_allclose(got, _flat(expected), rtol=2e-5, atol=1e-6 * max(clip, 1))
  assert np.linalg.norm(got) <= 3 * clip * (1 + 1e-5)
  assert 0 <= int(state.examples_clipped) <= 3


# Leaves of every magnitude, zero and underflowing ones included, and thresholds
# as small as 1e-40: where the default norms keep a unit's plain (underflowed)
# sum, the clipper must still give what the exact multiscale norms give.
_MAGNITUDES = (0.0, 1e-40, 1e-30, 1e-17, 1.0, 1e19, 1e30, 1e37)
_LIMITED = {
    "global_norm": lambda t: clipjax.clip_by_global_norm(t),
    "norm": lambda t: clipjax.clip_by_norm(t),
    "norm_l1": lambda t: clipjax.clip_by_norm(t, ord=1),
    "block_rms": lambda t: clipjax.clip_by_block_rms(t),
    "group_norm": lambda t: clipjax.clip_by_group_norm(
        t, labels=lambda u: [i % 2 for i in range(len(u))]
    ),
    "agc": lambda t: clipjax.adaptive_grad_clip(t, eps=t),
    "per_example": lambda t: clipjax.per_example_clip(t, reduction="sum"),
}


@functools.cache
def _limited(name, impl):
  def run(grads, params, threshold):
    tx = _forms.with_norms(_LIMITED[name](threshold), impl)
    if name == "per_example":  # (the parameters have the shape of one example's gradient)
      params = [p[0] for p in params]
    return tx.update(grads, tx.init(params), params)

  return jax.jit(run)


@given(
    name=st.sampled_from(sorted(_LIMITED)),
    g_scales=st.lists(st.sampled_from(_MAGNITUDES), min_size=3, max_size=3),
    w_scales=st.lists(st.sampled_from(_MAGNITUDES), min_size=3, max_size=3),
    threshold=st.sampled_from([1e-40, 1e-30, 1e-12, 1e-3, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_default_norms_give_what_the_exact_multiscale_norms_give(
    name, g_scales, w_scales, threshold, seed
):
  rng = np.random.default_rng(seed)

  def tree(scales):
    return [jnp.asarray(rng.normal(size=(4, 3)) * s, jnp.float32) for s in scales]

  grads, params = tree(g_scales), tree(w_scales)
  t = jnp.float32(threshold)
  got = _limited(name, "auto")(grads, params, t)
  want = _limited(name, "multiscale")(grads, params, t)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-6)
