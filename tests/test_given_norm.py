"""clip_by_given_norm: the norm comes from elsewhere (PyTorch's clip_grads_with_norm_)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from tests.conftest import use_implementation


@pytest.fixture(autouse=True, params=["cond", "multiscale"])
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
  norms = jax.vmap(clipjax.global_norm)(batch)
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
