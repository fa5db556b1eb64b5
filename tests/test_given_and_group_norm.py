"""clip_by_given_norm (the norm comes from elsewhere) and clip_by_group_norm (a norm per group)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from tests.conftest import use_implementation


@pytest.fixture(autouse=True, params=["cond", "multiscale", "gpu"])
def norm_implementation(request, monkeypatch):
  use_implementation(monkeypatch, request.param)
  return request.param


def tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "encoder": {"w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32)},
      "head": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32),
  }


def f64(t):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_given_the_global_norm_it_equals_clip_by_global_norm(max_norm):
  g = tree(0, 10.0)
  ours = clipjax.clip_by_given_norm(max_norm)
  theirs = clipjax.clip_by_global_norm(max_norm)
  step = jax.jit(lambda g, s, n: ours.update(g, s, grad_norm=n))
  out, state = step(g, ours.init(g), clipjax.global_norm(g))
  expected, expected_state = jax.jit(theirs.update)(g, theirs.init(g))
  for a, b in zip(f64(out), f64(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for field in ("pre_clip_norm", "clip_scale", "clipped", "num_clipped"):
    np.testing.assert_allclose(getattr(state, field), getattr(expected_state, field), rtol=1e-6)


def test_the_norm_of_other_leaves_scales_every_leaf_by_one_factor():
  g = tree(1, 5.0)
  n = float(np.linalg.norm(f64(g["encoder"])[0]))
  tx = clipjax.clip_by_given_norm(1.0)
  out, state = jax.jit(lambda g, n: tx.update(g, tx.init(g), grad_norm=n))(g, n)
  for a, b in zip(f64(out), f64(g)):
    np.testing.assert_allclose(a, b * min(1.0, 1.0 / n), rtol=1e-6)
  np.testing.assert_allclose(float(state.pre_clip_norm), n, rtol=1e-6)
  assert bool(state.clipped) == (n > 1.0)


def test_in_a_chain_and_under_inject_hyperparams_the_keyword_reaches_it():
  g, params = tree(2, 30.0), tree(3)
  n = clipjax.global_norm(g)
  opt = optax.chain(clipjax.clip_by_given_norm(1.0, norm_arg="norm"), optax.adam(0.1))
  ref = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(0.1))
  u, _ = jax.jit(lambda g, s, n: opt.update(g, s, params, norm=n))(g, opt.init(params), n)
  r, _ = jax.jit(ref.update)(g, ref.init(params), params)
  for a, b in zip(f64(u), f64(r)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  sched = optax.inject_hyperparams(clipjax.clip_by_given_norm, static_args=("norm_arg",))(
      max_norm=2.0, norm_arg="grad_norm"
  )
  out, _ = jax.jit(sched.update)(g, sched.init(g), grad_norm=n)
  np.testing.assert_allclose(float(optax.tree.norm(out)), 2.0, rtol=1e-5)


def test_vmapped_over_examples_with_their_own_norms():
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree(s, 10.0 ** (s - 1)) for s in range(3)])
  norms = jax.jit(jax.vmap(clipjax.global_norm))(batch)  # (eager, it compiles op by op)
  tx = clipjax.clip_by_given_norm(1.0)
  out, states = jax.jit(jax.vmap(lambda g, n: tx.update(g, tx.init(g), grad_norm=n)))(batch, norms)
  for i in range(3):
    leaves = [x[i] for x in f64(out)]
    np.testing.assert_allclose(
        np.sqrt(sum(np.sum(x**2) for x in leaves)), min(1.0, float(norms[i])), rtol=1e-5
    )
  assert states.pre_clip_norm.shape == (3,)


def test_non_finite_and_negative_norms():
  g = tree(4)
  tx = clipjax.clip_by_given_norm(1.0)
  # As clip_by_global_norm with inf gradients: a non-finite step, finite entries zeroed.
  out, state = tx.update(g, tx.init(g), grad_norm=jnp.inf)
  assert all(np.all(x == 0) for x in f64(out)) and int(state.num_nonfinite) == 1
  for bad in (jnp.nan, -1.0):
    out, state = tx.update(g, tx.init(g), grad_norm=bad)
    assert all(np.all(np.isnan(x)) for x in f64(out)) and int(state.num_nonfinite) == 1
  opt = clipjax.chain(clipjax.clip_by_given_norm(1.0, nonfinite="skip"), optax.adam(0.1))
  state = opt.init(g)
  updates, new_state = opt.update(g, state, g, grad_norm=-3.0)
  assert bool(new_state[0].skipped) and all(np.all(x == 0) for x in f64(updates))
  jax.tree.map(np.testing.assert_array_equal, new_state[1], state[1])  # Adam untouched


def test_bad_arguments_are_clear_errors():
  g = tree(5)
  with pytest.raises(ValueError, match="max_norm"):
    clipjax.clip_by_given_norm(-1.0)
  with pytest.raises(ValueError, match="norm_arg"):
    clipjax.clip_by_given_norm(1.0, norm_arg="grad norm")
  tx = clipjax.clip_by_given_norm(1.0)
  with pytest.raises(ValueError, match="grad_norm=norm"):
    tx.update(g, tx.init(g))
  with pytest.raises(ValueError, match="scalar"):
    tx.update(g, tx.init(g), grad_norm=jnp.ones(2))
  with pytest.raises(TypeError, match="clip_by_given_norm"):
    tx.update(g, clipjax.autoclip().init(g), grad_norm=1.0)


# ------------------------------------------------------------------ group norms


def group_reference(leaves, names, limits, p=2.0):
  """NumPy float64: each group scaled by min(1, limit / its global p-norm)."""
  out = []
  for x, name in zip(leaves, names):
    members = [y for y, n in zip(leaves, names) if n == name]
    flat = np.concatenate([y.ravel() for y in members])
    norm = np.max(np.abs(flat)) if np.isinf(p) else np.sum(np.abs(flat) ** p) ** (1 / p)
    limit = limits[name] if isinstance(limits, dict) else limits
    out.append(x * (min(1.0, limit / norm) if norm > 0 else 1.0))
  return out


def three_groups(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "enc": {"w": rng.normal(size=(4, 3)) * scale, "b": rng.normal(size=(3,)) * scale},
      "dec": {"w": rng.normal(size=(3, 2)) * scale * 1e3},
      "head": rng.normal(size=(2,)) * scale * 1e-3,
  }


LABELS = {"enc": "body", "dec": "body", "head": "head"}
# Leaf order of jax.tree.leaves: dec/w, enc/b, enc/w, head.
LEAF_LABELS = ["body", "body", "body", "head"]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, np.inf])
@pytest.mark.parametrize("limits", [0.5, {"body": 2.0, "head": 1e-4}])
@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_group_norm_matches_the_float64_reference(p, limits, scale):
  g64 = three_groups(0, scale)
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g64)
  tx = clipjax.clip_by_group_norm(limits, LABELS, ord=p)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  expected = group_reference(f64(g), LEAF_LABELS, limits, p)
  for a, e in zip(f64(out), expected):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-30)
  flat = np.concatenate([x.ravel() for x in f64(g)])
  total = np.max(np.abs(flat)) if np.isinf(p) else np.sum(np.abs(flat) ** p) ** (1 / p)
  np.testing.assert_allclose(float(state.pre_clip_norm), total, rtol=2e-5)
  assert int(state.num_nonfinite) == 0


def test_one_group_is_the_global_clip_and_one_group_per_leaf_is_the_per_leaf_clip():
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), three_groups(1, 10.0))
  one = clipjax.clip_by_group_norm(1.0, lambda u: jax.tree.map(lambda _: "all", u))
  each = clipjax.clip_by_group_norm(1.0, {"enc": {"w": 0, "b": 1}, "dec": 2, "head": 3})
  pairs = [(one, clipjax.clip_by_global_norm(1.0)), (each, clipjax.clip_by_norm(1.0))]
  for ours, theirs in pairs:
    a, _ = jax.jit(ours.update)(g, ours.init(g))
    b, _ = jax.jit(theirs.update)(g, theirs.init(g))
    for x, y in zip(f64(a), f64(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.mark.parametrize(
    "labels",
    [
        ["body", "head", "body"],
        lambda u: ["body", "head", "body"],
        {"a": ["body", "head"], "b": "body"},
    ],
    ids=["list", "function", "list in a dict"],
)
def test_group_labels_of_list_structured_updates(labels):
  """Labels shaped like a list of leaves (``[w, b]`` parameters) are one label per leaf.

  They were read as one label holding a list (TypeError: unhashable type: 'list').
  """
  rng = np.random.default_rng(4)
  leaves = [jnp.asarray(rng.normal(size=s) * 3, jnp.float32) for s in [(4, 3), (5,), (2,)]]
  g = {"a": leaves[:2], "b": leaves[2]} if isinstance(labels, dict) else leaves
  tx = clipjax.clip_by_group_norm(1.0, labels)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  expected = group_reference(f64(leaves), ["body", "head", "body"], 1.0)
  for a, e in zip(f64(out), expected):
    np.testing.assert_allclose(a, e, rtol=2e-5)


def test_a_nan_poisons_its_own_group_only_under_propagate():
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), three_groups(2))
  g["head"] = g["head"].at[0].set(jnp.nan)
  tx = clipjax.clip_by_group_norm(1.0, LABELS)
  out, state = tx.update(g, tx.init(g))
  assert np.all(np.isnan(np.asarray(out["head"])))
  assert all(np.all(np.isfinite(x)) for x in f64(out["enc"]) + f64(out["dec"]))
  assert int(state.num_nonfinite) == 1
  zeroed, _ = clipjax.clip_by_group_norm(1.0, LABELS, nonfinite="zero").update(g, tx.init(g))
  assert all(np.all(x == 0) for x in f64(zeroed))


def test_group_norm_under_inject_hyperparams():
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), three_groups(3, 10.0))
  tx = optax.inject_hyperparams(clipjax.clip_by_group_norm, static_args=("labels",))(
      max_norm=1.0, labels=LABELS
  )
  state = tx.init(g)
  state.hyperparams["max_norm"] = jnp.float32(0.25)
  out, _ = jax.jit(tx.update)(g, state)
  expected = group_reference(f64(g), LEAF_LABELS, 0.25)
  for a, e in zip(f64(out), expected):
    np.testing.assert_allclose(a, e, rtol=2e-5)


def test_group_norm_bad_arguments_are_clear_errors():
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), three_groups(4))
  with pytest.raises(ValueError, match="max_norm"):
    clipjax.clip_by_group_norm(-1.0, LABELS)
  with pytest.raises(ValueError, match=r"max_norm\['head'\]"):
    clipjax.clip_by_group_norm({"body": 1.0, "head": -2.0}, LABELS)
  with pytest.raises(ValueError, match="non-empty"):
    clipjax.clip_by_group_norm({}, LABELS)
  with pytest.raises(ValueError, match="labels"):
    clipjax.clip_by_group_norm(1.0, None)
  tx = clipjax.clip_by_group_norm({"body": 1.0}, LABELS)
  with pytest.raises(ValueError, match="no entry for the labels 'head'"):
    tx.update(g, tx.init(g))
  tx = clipjax.clip_by_group_norm(1.0, {"enc": "a", "dec": "b"})
  with pytest.raises(ValueError, match="structure of the updates"):
    tx.update(g, tx.init(g))
