"""Hypothesis properties of the norm clippers."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import clipjax

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, max_side=6)
arrays = hnp.arrays(np.float32, shapes, elements=finite)
trees = st.lists(arrays, min_size=1, max_size=4)
thresholds = st.floats(1e-3, 1e3)
orders = st.sampled_from([1.0, 2.0, 3.0, np.inf])


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in tree])


def _run(tx, tree):
  tree = [jnp.asarray(x) for x in tree]
  out, _ = tx.update(tree, tx.init(tree))
  return out


def _pnorm(v, p):
  return np.max(np.abs(v), initial=0) if np.isinf(p) else np.sum(np.abs(v) ** p) ** (1 / p)


@given(trees, thresholds, orders)
def test_global_clip_bounds_the_norm_and_keeps_the_direction(tree, max_norm, p):
  out = _flat(_run(clipjax.clip_by_global_norm(max_norm, ord=p), tree))
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
  out = _run(clipjax.clip_by_global_norm(max_norm, ord=p), scaled)
  np.testing.assert_array_equal(_flat(out), _flat(scaled))


@given(trees, thresholds)
def test_idempotent(tree, max_norm):
  for tx in (
      clipjax.clip_by_global_norm(max_norm),
      clipjax.clip_by_norm(max_norm),
      clipjax.clip_by_block_rms(max_norm),
      clipjax.clip_by_value(max_norm),
  ):
    once = _run(tx, tree)
    twice = _run(tx, once)
    np.testing.assert_allclose(_flat(twice), _flat(once), rtol=2e-6, atol=1e-30)


@given(trees, thresholds)
def test_per_leaf_clip_bounds_every_leaf(tree, max_norm):
  out = _run(clipjax.clip_by_norm(max_norm), tree)
  for o in jax.tree.leaves(out):
    assert np.linalg.norm(np.asarray(o, np.float64)) <= max_norm * (1 + 1e-6)
