"""Inputs a hostile but realistic user sends: float-range edges, any p, traced
hyperparameters out of range, mixed magnitudes, states, float64.

Each test here failed before the fix it names (issue 13 of the tracker).
"""

from __future__ import annotations

import pathlib
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from tests import reference as ref
from tests.conftest import run_process, shared_jit, traced_update, use_implementation


@pytest.fixture(autouse=True, params=["cond", "multiscale", "gpu"])
def norm_implementation(request, monkeypatch):
  use_implementation(monkeypatch, request.param)
  return request.param


def clip(tx, grads, params=None):
  return jax.jit(tx.update)(grads, tx.init(grads), params)


def f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_clipped_to(out, grads, max_norm, rtol=1e-6):
  """Right norm and direction, against float64."""
  o = np.concatenate([x.ravel() for x in f64(out)])
  g = np.concatenate([x.ravel() for x in f64(grads)])
  np.testing.assert_allclose(np.linalg.norm(o), max_norm, rtol=rtol)
  np.testing.assert_allclose(o / np.linalg.norm(o), g / np.linalg.norm(g), atol=rtol)


# ------------------------------------------------- 8: the top of the float range


@pytest.mark.parametrize("values", [[1e38], [3e38, 3e38], [3.4e38] * 7, [1e38, 1.0, -1e30]])
@pytest.mark.parametrize("max_norm", [1.0, 1e-20, 1e20])
def test_finite_gradients_near_the_float_max_are_clipped_right(values, max_norm):
  grads = {"w": jnp.asarray(values, jnp.float32)}
  out, state = traced_update(clipjax.clip_by_global_norm, grads, max_norm=max_norm)
  assert_clipped_to(out, grads, max_norm)
  assert int(state.num_nonfinite) == 0 and bool(state.clipped)
  out, state = traced_update(clipjax.clip_by_norm, grads, max_norm=max_norm)
  assert_clipped_to(out, grads, max_norm)


def test_a_norm_beyond_float32_is_not_a_non_finite_step():
  grads = {"a": jnp.full((2,), 3e38, jnp.float32), "b": jnp.ones(3)}
  opt = clipjax.chain(clipjax.clip_by_global_norm(1.0, nonfinite="skip"), optax.sgd(1.0))
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
  assert not bool(state[0].skipped) and int(state[0].num_nonfinite) == 0
  assert_clipped_to(updates, jax.tree.map(lambda g: -g, grads), 1.0)
  assert float(state[0].pre_clip_norm) == np.inf  # not representable: reported as inf


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipjax.autoclip(50.0, history=4),
        lambda: clipjax.zclip(warmup_steps=2),
        lambda: clipjax.clip_by_block_rms(1.0),
    ],
)
def test_adaptive_clippers_handle_norms_beyond_float32(make):
  tx = make()
  grads = {"w": jnp.full((4,), 3e38, jnp.float32)}
  state = tx.init(grads)
  step = jax.jit(tx.update)
  for _ in range(3):
    out, state = step(grads, state)
  assert int(state.num_nonfinite) == 0
  assert np.all(np.isfinite(f64(out)[0]))


def test_agc_with_huge_gradients_clips_each_unit():
  params = {"w": jnp.ones((3, 2))}
  grads = {"w": jnp.asarray([[3e38, 1.0], [3e38, 2.0], [3e38, 3.0]], jnp.float32)}
  out, state = clip(clipjax.adaptive_grad_clip(0.1), grads, params)
  col = f64(out)[0]
  np.testing.assert_allclose(np.linalg.norm(col, axis=0), [0.1 * np.sqrt(3)] * 2, rtol=1e-6)
  assert int(state.num_nonfinite) == 0


FLOAT64_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np, optax, clipjax
    from tests.conftest import with_implementation
    names = ("clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm")
    original = {name: getattr(clipjax, name) for name in names}
    for impl in ("cond", "multiscale"):
      for name in names:  # clipjax.X(...) below computes its norms as impl
        setattr(clipjax, name, with_implementation(original[name], impl))
      g = {"w": jnp.asarray([3e39], jnp.float64)}
      for tx in (clipjax.clip_by_global_norm(1.0, nonfinite="skip"), clipjax.clip_by_norm(1.0)):
        u, s = jax.jit(tx.update)(g, tx.init(g))
        assert float(u["w"][0]) == 1.0 and int(s.num_nonfinite) == 0, (impl, u, s)
      g = {"w": jnp.asarray([3e200, 4e200], jnp.float64)}
      assert abs(float(clipjax.global_norm(g)) / 5e200 - 1) < 1e-15
      u, s = clipjax.clip_by_global_norm(1.0).update(g, clipjax.clip_by_global_norm(1.0).init(g))
      np.testing.assert_allclose(np.asarray(u["w"]), [0.6, 0.8], rtol=1e-15)
      # The guarantee in the leaf's own dtype: 1 + 1e-10 is above max_delta=1.
      g = {"w": jnp.asarray([1.0000000001, 0.5], jnp.float64)}
      tx = clipjax.clip_by_value(1.0)
      u, s = tx.update(g, tx.init(g))
      assert float(jnp.max(jnp.abs(u["w"]))) <= 1.0 and bool(s.clipped), (u, s)
      expected = optax.clip(1.0).update(g, None)[0]["w"]
      np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(expected))
    print("ok")
""")


def test_float64_gradients_under_x64(norm_implementation):
  if norm_implementation != "cond":
    pytest.skip("the script checks both implementations itself")
  out = run_process(
      [sys.executable, "-c", FLOAT64_SCRIPT],
      limit=300,
      what="the float64 script",
      env={"JAX_PLATFORMS": "cpu", "PATH": ""},
      cwd=pathlib.Path(__file__).resolve().parents[1],  # (imports tests.conftest)
  )
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --------------------------------------------------- 9: every p over the whole range


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 8.0, 50.0, 200.0, np.inf])
@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1.0, 1e10, 1e30])
def test_every_p_is_exact_over_the_float_range(p, scale):
  rng = np.random.default_rng(0)
  leaves = [rng.normal(size=(5, 3)) * scale, rng.normal(size=(4,)) * scale * 1e-3]
  tree = [jnp.asarray(x, jnp.float32) for x in leaves]
  expected = ref.global_norm([np.asarray(x, np.float64) for x in tree], p)
  norm = shared_jit(clipjax.global_norm, static_argnums=1)(tree, p)
  np.testing.assert_allclose(float(norm), expected, rtol=2e-6)
  out, _ = traced_update(
      clipjax.clip_by_global_norm, tree, static={"ord": p}, max_norm=expected / 2
  )
  got = ref.global_norm(f64(out), p)
  np.testing.assert_allclose(got, expected / 2, rtol=2e-6)


def test_ord_200_on_3_4_is_4_not_zero():
  tx = clipjax.clip_by_global_norm(1.0, ord=200)
  out, state = clip(tx, {"w": jnp.array([3.0, 4.0])})
  np.testing.assert_allclose(float(state.pre_clip_norm), 4.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["w"]), [0.75, 1.0], rtol=1e-6)


# ------------------------------------------ 10: both paths agree on mixed magnitudes


@pytest.mark.parametrize("tiny", [1e-25, 1e-35])
def test_a_tiny_leaf_beside_a_normal_one_gets_its_own_norm(tiny):
  grads = {"a": jnp.ones(3), "b": jnp.full((4,), tiny, jnp.float32)}
  out, _ = clip(clipjax.clip_by_norm(tiny), grads)
  np.testing.assert_allclose(np.linalg.norm(f64(out)[1]), tiny, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(f64(out)[0]), tiny, rtol=1e-5)
  out, _ = clip(clipjax.clip_by_block_rms(tiny / 10), grads)
  np.testing.assert_allclose(np.sqrt(np.mean(f64(out)[1] ** 2)), tiny / 10, rtol=1e-5)


def test_a_tiny_agc_unit_beside_a_normal_one_is_clipped():
  params = {"w": jnp.ones((2, 2))}
  grads = {"w": jnp.asarray([[1.0, 1e-25], [1.0, 1e-25]], jnp.float32)}
  out, _ = clip(clipjax.adaptive_grad_clip(1e-26, eps=1e-3), grads, params)
  np.testing.assert_allclose(
      np.linalg.norm(f64(out)[0], axis=0), [1e-26 * np.sqrt(2)] * 2, rtol=1e-5
  )


# --------------------------------------------------- 11: traced hyperparameters


def scheduled(factory, name, values, grads, params=None, **static):
  factory = getattr(clipjax, factory)  # looked up now: the fixture may have set implementation=
  tx = optax.inject_hyperparams(factory, static_args=tuple(static))(**static, **{name: 1.0})
  state = tx.init(grads if params is None else params)
  step = jax.jit(tx.update)
  outs = []
  for v in values:
    state.hyperparams[name] = jnp.asarray(v, jnp.float32)
    u, state = step(grads, state, params)
    outs.append((u, state.inner_state))
  return outs


@pytest.mark.parametrize(
    "factory,name",
    [
        ("clip_by_global_norm", "max_norm"),
        ("clip_by_norm", "max_norm"),
        ("clip_by_block_rms", "threshold"),
        ("clip_by_value", "max_delta"),
    ],
)
def test_a_schedule_below_zero_acts_as_zero_never_flips_the_sign(factory, name):
  grads = {"w": jnp.array([3.0, -4.0])}
  (u1, _), (u0, _), (uneg, _) = scheduled(factory, name, [1.0, 0.0, -1.0], grads)
  assert np.all(np.sign(np.asarray(u1["w"])) == np.sign(np.asarray(grads["w"])))
  np.testing.assert_array_equal(np.asarray(uneg["w"]), np.asarray(u0["w"]))
  np.testing.assert_array_equal(np.asarray(u0["w"]), [0.0, 0.0])


def test_a_traced_percentile_is_clamped_to_100():
  grads = {"w": jnp.array([3.0, 4.0])}
  ((u, s),) = scheduled("autoclip", "percentile", [150.0], grads, history=4)
  assert float(s.clip_threshold) == 5.0 and np.allclose(np.asarray(u["w"]), [3.0, 4.0])


@pytest.mark.parametrize(
    "factory,name,static",
    [
        ("clip_by_global_norm", "max_norm", {}),
        ("clip_by_norm", "max_norm", {}),
        ("clip_by_value", "max_delta", {}),
        ("autoclip", "percentile", {"history": 4}),
        ("clip_by_block_rms", "threshold", {}),
    ],
)
def test_a_nan_hyperparameter_is_a_non_finite_step(factory, name, static):
  grads = {"w": jnp.array([3.0, 4.0])}
  ((u, s),) = scheduled(factory, name, [np.nan], grads, **static)
  assert int(s.num_nonfinite) == 1
  assert np.all(np.isnan(np.asarray(u["w"])))  # 'propagate': loud, not silently unclipped
  tx = optax.inject_hyperparams(getattr(clipjax, factory), static_args=("nonfinite", *static))(
      nonfinite="zero", **static, **{name: 1.0}
  )
  state = tx.init(grads)
  state.hyperparams[name] = jnp.asarray(np.nan, jnp.float32)
  u, _ = jax.jit(tx.update)(grads, state)
  np.testing.assert_array_equal(np.asarray(u["w"]), [0.0, 0.0])


def test_zclip_with_a_nan_z_thresh_is_non_finite_after_warmup():
  grads = {"w": jnp.array([3.0, 4.0])}
  outs = scheduled("zclip", "z_thresh", [2.0, 2.0, np.nan], grads, warmup_steps=2)
  u, s = outs[-1]
  assert int(s.num_nonfinite) == 1 and np.all(np.isnan(np.asarray(u["w"])))


def test_skip_spikes_with_a_nan_sigma_skips():
  tx = optax.inject_hyperparams(clipjax.skip_spikes, static_args=("inner", "use_loss"))(
      inner=optax.sgd(0.1), use_loss=False, sigma=6.0
  )
  grads = {"w": jnp.ones(2)}
  state = tx.init(grads)
  state.hyperparams["sigma"] = jnp.asarray(np.nan, jnp.float32)
  u, state = jax.jit(tx.update)(grads, state, grads)
  assert bool(state.inner_state.skipped)
  np.testing.assert_array_equal(np.asarray(u["w"]), [0.0, 0.0])


# ----------------------------------------- 12: skip_spikes on a nearly noiseless norm


def test_skip_spikes_does_not_skip_a_steady_full_batch_norm():
  # A slowly decaying norm with relative noise 1e-4 (full-batch training): the
  # window's std is tiny, so mean + 6 std sits right above the mean.
  rng = np.random.default_rng(0)
  n = 5000
  norms = 2.0 * np.exp(-np.arange(n) / 30000) * (1 + 1e-4 * rng.standard_normal(n))
  norms[::50] *= 1.03  # small wiggles, well inside normal training
  opt = clipjax.skip_spikes(optax.sgd(0.1), use_loss=False)
  params = {"w": jnp.zeros(2)}

  def body(state, v):
    g = {"w": jnp.asarray([0.6, 0.8], jnp.float32) * v}
    _, state = opt.update(g, state, params)
    return state, state.skipped

  state, skipped = jax.jit(lambda s: jax.lax.scan(body, s, jnp.asarray(norms, jnp.float32)))(
      opt.init(params)
  )
  assert int(np.sum(np.asarray(skipped))) == 0
  # A real spike is still caught.
  _, state = opt.update({"w": jnp.asarray([0.6, 0.8]) * float(norms[-1]) * 3}, state, params)
  assert bool(state.skipped)


# ------------------------------------------ 13: 'skip' outside clipjax.chain warns


def test_skip_policy_in_a_plain_optax_chain_warns():
  grads = {"w": jnp.ones(2)}
  opt = optax.chain(clipjax.clip_by_global_norm(1.0, nonfinite="skip"), optax.adam(0.1))
  with pytest.warns(UserWarning, match="outside clipjax.chain"):
    jax.jit(opt.update)(grads, opt.init(grads), grads)
  # The last link of a clipjax.chain nested in an optax.chain: Adam after it still runs.
  opt = optax.chain(
      clipjax.chain(clipjax.clip_by_global_norm(1.0, nonfinite="skip")), optax.adam(0.1)
  )
  with pytest.warns(UserWarning, match="outside clipjax.chain"):
    jax.jit(opt.update)(grads, opt.init(grads), grads)
  opt = clipjax.chain(clipjax.clip_by_global_norm(1.0, nonfinite="skip"), optax.adam(0.1))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(opt.update)(grads, opt.init(grads), grads)
    inner = clipjax.chain(clipjax.autoclip(nonfinite="skip"), optax.sgd(0.1))
    wrapped = clipjax.skip_spikes(inner, use_loss=False)
    jax.jit(wrapped.update)(grads, wrapped.init(grads), grads)


# ------------------------------------------------------- 15: AGC with an explicit axis


def test_agc_explicit_axis_is_not_squeezed_away():
  params = {"w": jnp.ones((1, 8))}
  grads = {"w": jnp.arange(1.0, 9.0).reshape(1, 8)}
  out, _ = clip(clipjax.adaptive_grad_clip(0.5, axis=0), grads, params)
  expected = optax.adaptive_grad_clip(0.5, axis=0).update(grads, None, params)[0]["w"]
  np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(expected), rtol=1e-6)
  np.testing.assert_allclose(np.abs(np.asarray(out["w"])), 0.5, rtol=1e-6)  # 8 units


# --------------------------------------------- 16: clip_by_value in the leaf's dtype


def test_clip_by_value_decides_in_the_leaf_dtype_for_bfloat16():
  g = {"w": jnp.asarray([0.10009765625, -0.2], jnp.bfloat16)}  # 0.1 in bf16
  out, state = clip(clipjax.clip_by_value(0.1), g)
  np.testing.assert_array_equal(
      np.asarray(out["w"], np.float32),
      np.asarray(optax.clip(0.1).update(g, None)[0]["w"], np.float32),
  )
