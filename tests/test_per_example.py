"""per_example_clip (DP-SGD): against optax, a float64 reference, noise, axis_name, policies."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import clipjax
from tests import reference as ref
from tests.conftest import orbax_round_trip, traced_update, use_implementation


@pytest.fixture(autouse=True, params=["cond", "multiscale", "gpu"])
def norm_implementation(request, monkeypatch):
  use_implementation(monkeypatch, request.param)
  return request.param


def per_example_grads(seed, batch=6, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  scales = scale * 10.0 ** rng.uniform(-1, 1, size=batch)  # some examples clipped, some not
  return {
      "w": jnp.asarray(rng.normal(size=(batch, 4, 3)) * scales[:, None, None], dtype),
      "b": jnp.asarray(rng.normal(size=(batch, 3)) * scales[:, None], dtype),
      "s": jnp.asarray(rng.normal(size=(batch,)) * scales, dtype),
  }


def f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("per_layer", [None, "uniform", "proportional"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_matches_the_float64_reference(per_layer, reduction, scale):
  g = per_example_grads(0, scale=scale)
  clip = 1.5 * scale
  # The clip norm traced: both scales run one compiled program.
  static = {"per_layer": per_layer, "reduction": reduction}
  out, state = traced_update(clipjax.per_example_clip, g, static=static, l2_norm_clip=clip)
  expected, clipped = ref.per_example_clip(f64(g), clip, per_layer, reduction == "mean")
  for a, e in zip(f64(out), expected):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6 * scale)
  assert int(state.examples_clipped) == clipped and 0 < clipped < 6
  assert int(state.batch_examples) == 6 and int(state.num_steps) == 1
  norms = [np.sqrt(sum(np.sum(x[b] ** 2) for x in f64(g))) for b in range(6)]
  np.testing.assert_allclose(float(state.mean_example_norm), np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(float(state.max_example_norm), np.max(norms), rtol=1e-5)


def test_equals_optax_per_example_clipping():
  g = per_example_grads(1)
  leaves = jax.tree.leaves(g)
  tx = clipjax.per_example_clip(2.0, reduction="sum")
  ours, state = jax.jit(tx.update)(g, tx.init(None))
  theirs, n_clipped = jax.jit(optax.per_example_global_norm_clip)(leaves, 2.0)
  for a, b in zip(jax.tree.leaves(ours), theirs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert int(state.examples_clipped) == int(n_clipped)
  tx = clipjax.per_example_clip(2.0, per_layer="proportional", reduction="sum")
  ours = jax.tree.leaves(jax.jit(tx.update)(g, tx.init(None))[0])
  theirs, _ = jax.jit(optax.per_example_layer_norm_clip, static_argnums=2)(leaves, 2.0, False)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_noise_has_the_dp_sgd_scale_and_a_reproducible_key():
  g = {"w": jnp.zeros((4, 20000))}  # zero gradients: the output is the noise
  tx = clipjax.per_example_clip(0.5, noise_multiplier=2.0, seed=3, reduction="sum")
  state = tx.init(None)
  step = jax.jit(tx.update)
  a, state1 = step(g, state)
  b, _ = step(g, state1)
  again, _ = step(g, state)
  np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(again["w"]))  # same key
  assert not np.allclose(np.asarray(a["w"]), np.asarray(b["w"]))  # the key advances
  noise = np.asarray(a["w"], np.float64)
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.02  # sigma * C = 1
  mean_tx = clipjax.per_example_clip(0.5, noise_multiplier=2.0, seed=3, reduction="mean")
  m, _ = jax.jit(mean_tx.update)(g, mean_tx.init(None))
  np.testing.assert_allclose(np.asarray(m["w"]), noise / 4, rtol=1e-6)  # noise, then / B


def test_axis_name_gives_every_shard_the_whole_batch_result():
  g = per_example_grads(2, batch=8)
  whole = clipjax.per_example_clip(1.0, reduction="mean", noise_multiplier=0.5)
  expected, expected_state = jax.jit(whole.update)(g, whole.init(None))
  split = clipjax.per_example_clip(1.0, reduction="mean", noise_multiplier=0.5, axis_name="d")
  shards = jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), g)  # 4 "devices" x 2
  # Under jit: eagerly, each operation would be compiled on its own (8 s cold).
  out, states = jax.jit(jax.vmap(lambda s: split.update(s, split.init(None)), axis_name="d"))(
      shards
  )
  for a, e in zip(f64(out), f64(expected)):
    for shard in range(4):
      np.testing.assert_allclose(a[shard], e, rtol=1e-5, atol=1e-6)
  for field in ("examples_clipped", "batch_examples", "mean_example_norm", "max_example_norm"):
    np.testing.assert_allclose(
        np.asarray(getattr(states, field)), float(getattr(expected_state, field)), rtol=1e-6
    )


@pytest.mark.parametrize("per_layer", [None, "uniform"])
def test_an_example_far_above_the_clip_norm_is_clipped_not_zeroed(per_layer):
  """Its factor, 1e-10 / 5e30, is below float32's normal range: applied in two steps."""
  g = {"w": jnp.array([[3e30, 4e30], [3e-11, 0.0]])}
  tx = clipjax.per_example_clip(
      1e-10, per_layer=per_layer, reduction="sum"
  )  # one leaf: its budget is C
  out, state = jax.jit(tx.update)(g, tx.init(None))
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), [9e-11, 8e-11], rtol=1e-6)
  assert int(state.examples_clipped) == 1


def test_low_precision_gradients_keep_their_dtype_and_sum_in_float32():
  g = per_example_grads(3, batch=64, dtype=jnp.bfloat16)
  tx = clipjax.per_example_clip(1.0, reduction="mean")
  out, _ = jax.jit(tx.update)(g, tx.init(None))
  expected, _ = ref.per_example_clip(f64(g), 1.0, mean=True)
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=1e-2, atol=1e-3)


def test_dp_sgd_chain_and_non_finite_examples():
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}
  g = per_example_grads(4)
  g["b"] = g["b"].at[2, 0].set(jnp.nan)
  opt = clipjax.chain(
      clipjax.per_example_clip(1.0, nonfinite="skip", reduction="sum"), optax.adam(0.1)
  )
  state = opt.init(params)
  updates, new_state = jax.jit(opt.update)(g, state, params)
  assert bool(new_state[0].skipped) and int(new_state[0].num_nonfinite) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state[1], state[1])  # Adam untouched
  assert all(np.all(x == 0) for x in f64(updates))
  tx = clipjax.per_example_clip(1.0, reduction="sum")
  out, _ = tx.update(g, tx.init(None))
  assert all(np.all(np.isnan(x)) for x in f64(out))  # 'propagate': loud


def test_inject_hyperparams_schedules_the_clip_norm():
  g = per_example_grads(5)
  tx = optax.inject_hyperparams(clipjax.per_example_clip)(l2_norm_clip=1.0, reduction="sum")
  state = tx.init(None)
  state.hyperparams["l2_norm_clip"] = jnp.float32(0.25)
  out, _ = jax.jit(tx.update)(g, state)
  expected, _ = ref.per_example_clip(f64(g), 0.25)
  for a, e in zip(f64(out), expected):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-7)


# ------------------------------------------------ the ways users compose it
# The common suite (test_common) runs the clippers whose updates keep the
# gradients' shapes; per-example clipping takes a leading batch axis and returns
# the parameters' shapes, so its versions of those checks are here. They do not
# depend on the norm implementation: run once, with the default.
once = pytest.mark.parametrize("norm_implementation", ["cond"], indirect=True)

PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}


def stacked(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@once
def test_vmap_over_micro_batches_and_a_scan_carry_give_the_loop():
  batches = [per_example_grads(s, batch=4, scale=2.0) for s in range(3)]
  tx = clipjax.per_example_clip(1.0, reduction="mean", noise_multiplier=0.3, seed=7)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  loop, loop_states = [], []
  s = state
  for g in batches:
    out, s = update(g, s)
    loop.append(out)
    loop_states.append(s)
  # vmap: every micro-batch from the same state (so with the same noise).
  outs, states = jax.jit(jax.vmap(lambda g: tx.update(g, state)))(stacked(batches))
  from_state, _ = update(batches[1], state)
  for a, b in zip(f64(jax.tree.map(lambda x: x[1], outs)), f64(from_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert states.examples_clipped.shape == (3,)
  # scan: the state (and its noise key) carried from step to step.
  scan = jax.jit(lambda s, gs: jax.lax.scan(lambda s, g: tx.update(g, s)[::-1], s, gs))
  final, scanned = scan(state, stacked(batches))
  for i, out in enumerate(loop):
    for a, b in zip(f64(jax.tree.map(lambda x, i=i: x[i], scanned)), f64(out)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(final, loop_states[-1])


@once
def test_no_retrace_across_steps():
  chex.clear_trace_counter()
  tx = clipjax.per_example_clip(1.0, noise_multiplier=0.5, reduction="sum")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state):
    return tx.update(g, state)

  state = tx.init(PARAMS)
  for s in range(4):
    _, state = step(per_example_grads(s, scale=3.0), state)
  assert int(state.num_steps) == 4


@once
def test_accumulating_clipped_sums_over_micro_batches_is_dp_sgd_with_virtual_batches():
  """MultiSteps after the clip: each micro-batch clipped per example, then averaged."""
  micro = [per_example_grads(s, batch=3, scale=2.0) for s in (1, 2)]
  opt = optax.chain(
      clipjax.per_example_clip(1.0, reduction="sum"),
      optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation(),
  )
  state = opt.init(PARAMS)
  update = jax.jit(opt.update)
  u1, state = update(micro[0], state, PARAMS)
  assert all(not np.any(x) for x in f64(u1))  # nothing applied mid-accumulation
  u2, state = update(micro[1], state, PARAMS)
  sums = [ref.per_example_clip(f64(g), 1.0)[0] for g in micro]
  for a, x, y in zip(f64(u2), *sums):
    np.testing.assert_allclose(a, -(x + y) / 2, rtol=2e-5, atol=1e-6)
  assert int(clipjax.clip_stats(state)["num_steps"]) == 2


@once
def test_a_restored_checkpoint_draws_the_same_noise(tmp_path):
  opt = clipjax.chain(
      clipjax.per_example_clip(1.0, noise_multiplier=1.0, reduction="sum"), optax.adam(1e-2)
  )
  state = opt.init(PARAMS)
  update = jax.jit(opt.update)
  for s in range(2):
    _, state = update(per_example_grads(s), state, PARAMS)
  restored = orbax_round_trip(state, tmp_path / "state")
  chex.assert_trees_all_equal(restored, state)
  u_a, _ = update(per_example_grads(9), state, PARAMS)
  u_b, _ = update(per_example_grads(9), restored, PARAMS)
  chex.assert_trees_all_equal(u_a, u_b)


@once
def test_state_buffers_can_be_donated():
  opt = optax.chain(
      clipjax.per_example_clip(1.0, noise_multiplier=0.1, reduction="sum"), optax.sgd(0.1)
  )
  step = jax.jit(lambda s, g: opt.update(g, s, PARAMS)[1], donate_argnums=0)
  state = step(opt.init(PARAMS), per_example_grads(0))
  state = step(state, per_example_grads(1))
  assert int(state[0].num_steps) == 2


@once
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_other_dtypes_keep_their_dtype(dtype):
  g = per_example_grads(6, batch=16, dtype=dtype)
  tx = clipjax.per_example_clip(1.0, reduction="sum")
  out, state = jax.jit(tx.update)(g, tx.init(PARAMS))
  expected, _ = ref.per_example_clip(f64(g), 1.0)
  tol = 2e-5 if dtype == jnp.float32 else 2e-3
  for a, e in zip(jax.tree.leaves(out), expected):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=tol, atol=tol)
  assert state.mean_example_norm.dtype == jnp.float32


@once
def test_zero_and_raise_policies_on_a_non_finite_example():
  g = per_example_grads(4)
  g["w"] = g["w"].at[1, 0, 0].set(jnp.inf)
  opt = optax.chain(
      clipjax.per_example_clip(1.0, nonfinite="zero", reduction="sum"), optax.adam(0.1)
  )
  updates, state = opt.update(g, opt.init(PARAMS), PARAMS)
  assert all(np.all(x == 0) for x in f64(updates))
  assert int(state[1][0].count) == 1  # adam stepped, on zeros
  assert int(state[0].num_nonfinite) == 1 and not bool(state[0].skipped)
  tx = clipjax.per_example_clip(1.0, nonfinite="raise", reduction="sum")
  checked = checkify.checkify(jax.jit(tx.update), errors=checkify.user_checks)
  err, _ = checked(g, tx.init(PARAMS))
  with pytest.raises(checkify.JaxRuntimeError, match="non-finite"):
    err.throw()


@once
def test_clip_stats_report_the_examples():
  tx = clipjax.per_example_clip(1.0, reduction="mean")
  _, state = tx.update(per_example_grads(0), tx.init(PARAMS))
  stats = clipjax.clip_stats(clipjax.chain(tx, optax.sgd(1.0)).init(PARAMS))
  assert {"examples_clipped", "batch_examples", "mean_example_norm", "num_steps"} <= set(stats)
  stats = clipjax.clip_stats(state)
  _, clipped = ref.per_example_clip(f64(per_example_grads(0)), 1.0)
  assert int(stats["examples_clipped"]) == clipped and int(stats["batch_examples"]) == 6


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="l2_norm_clip"):
    clipjax.per_example_clip(-1.0, reduction="sum")
  with pytest.raises(ValueError, match="noise_multiplier"):
    clipjax.per_example_clip(1.0, noise_multiplier=-0.1, reduction="sum")
  with pytest.raises(ValueError, match="reduction"):
    clipjax.per_example_clip(1.0, reduction="median")
  with pytest.raises(ValueError, match="per_layer"):
    clipjax.per_example_clip(1.0, per_layer="by_size", reduction="sum")
  with pytest.raises(ValueError, match="axis_name"):
    clipjax.per_example_clip(1.0, axis_name=lambda u: u, reduction="sum")
  with pytest.raises(TypeError, match="reduction"):  # no default: sum and mean differ by B
    clipjax.per_example_clip(1.0)
  tx = clipjax.per_example_clip(1.0, reduction="sum")
  with pytest.raises(ValueError, match="batch axis"):
    tx.update({"w": jnp.ones((3, 2)), "b": jnp.ones((4,))}, tx.init(None))
  with pytest.raises(ValueError, match="empty"):
    tx.update({"w": jnp.ones((0, 2))}, tx.init(None))
  # The parameters' own gradient (no batch axis) where per-example ones belong.
  with pytest.raises(ValueError, match="no leading batch axis.*vmap") as e:
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="batch_size"):
    clipjax.dp_noise(1.0, 1.0, batch_size=0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    clipjax.dp_noise(1.0, -1.0, batch_size=None)
  with pytest.raises(TypeError, match="batch_size"):
    clipjax.dp_noise(1.0, 1.0)
  with pytest.raises(TypeError, match="per_example_clip"):
    tx.update({"w": jnp.ones((3, 2))}, clipjax.clip_by_norm(1.0).init(None))


# ------------------------------------------------------------------ the noise


def _sample_std(tree) -> float:
  return float(np.std(np.concatenate([np.ravel(x) for x in f64(tree)])))


BIG = {"w": jnp.zeros((300, 200)), "b": jnp.zeros((2000,))}  # 62,000 entries: std to ~0.3%


@once
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_noise_is_gaussian_with_the_stated_deviation_and_fresh_each_step(reduction):
  batch, clip, sigma = 4, 2.0, 1.5
  zeros = jax.tree.map(lambda x: jnp.zeros((batch,) + x.shape), BIG)
  tx = clipjax.per_example_clip(clip, reduction=reduction, noise_multiplier=sigma, seed=5)
  update = jax.jit(tx.update)
  first, state = update(zeros, tx.init(BIG))
  second, _ = update(zeros, state)
  want = sigma * clip / (batch if reduction == "mean" else 1)
  flat = np.concatenate([np.ravel(x) for x in f64(first)])
  assert abs(np.std(flat) / want - 1) < 0.015
  assert abs(np.mean(flat)) < 5 * want / np.sqrt(flat.size)
  # Normal, not merely of that spread: the fraction beyond 2 sigma.
  assert abs(np.mean(np.abs(flat) > 2 * want) - 0.0455) < 0.004
  # Independent between leaves and between steps.
  w, b = f64(first)[1].ravel()[:2000], f64(first)[0]
  assert abs(np.corrcoef(w, b)[0, 1]) < 0.1
  again = np.concatenate([np.ravel(x) for x in f64(second)])
  assert abs(np.corrcoef(flat, again)[0, 1]) < 0.03


@once
def test_dp_noise_alone_and_as_per_example_clip_draws_it():
  tx = clipjax.dp_noise(2.0, 1.5, batch_size=None)
  out, state = jax.jit(tx.update)(BIG, tx.init(BIG))
  assert abs(_sample_std(out) / 3.0 - 1) < 0.015
  assert float(clipjax.clip_stats(state)["noise_stddev"]) == 3.0
  mean = clipjax.dp_noise(2.0, 1.5, batch_size=60, seed=1)
  out, state = jax.jit(mean.update)(BIG, mean.init(BIG))
  assert abs(_sample_std(out) / 0.05 - 1) < 0.015
  # The noise is added to the update, not in place of it.
  ones = jax.tree.map(jnp.ones_like, BIG)
  shifted, _ = jax.jit(mean.update)(ones, mean.init(BIG))
  np.testing.assert_allclose(
      np.concatenate([np.ravel(x) - 1 for x in f64(shifted)]),
      np.concatenate([np.ravel(x) for x in f64(out)]),
      atol=1e-6,
  )
  # Scheduled: the deviation traced.
  sched = optax.inject_hyperparams(clipjax.dp_noise, static_args=("batch_size",))(
      l2_norm_clip=1.0, noise_multiplier=jnp.float32(0.5), batch_size=None
  )
  out, state = jax.jit(sched.update)(BIG, sched.init(BIG))
  assert abs(_sample_std(out) / 0.5 - 1) < 0.015


@once
def test_virtual_batches_with_dp_noise_after_accumulation_have_one_batchs_noise():
  """K micro-batches of B/K, averaged by MultiSteps: noise once (dp_noise) gives the
  std of one batch of B, sigma C / B; noise per micro-batch gives sqrt(K) times it."""
  k, micro, clip, sigma = 4, 16, 1.0, 1.1
  zeros = jax.tree.map(lambda x: jnp.zeros((micro,) + x.shape), BIG)

  def applied(opt):
    state = opt.init(BIG)
    update = jax.jit(opt.update)
    for _ in range(k):
      out, state = update(zeros, state, BIG)
    return out

  once_ = optax.chain(
      clipjax.per_example_clip(clip, reduction="mean"),
      optax.MultiSteps(
          optax.chain(clipjax.dp_noise(clip, sigma, batch_size=k * micro, seed=1), optax.sgd(1.0)),
          every_k_schedule=k,
      ).gradient_transformation(),
  )
  per_micro = optax.chain(
      clipjax.per_example_clip(clip, reduction="mean", noise_multiplier=sigma),
      optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k).gradient_transformation(),
  )
  one_batch = sigma * clip / (k * micro)
  assert abs(_sample_std(applied(once_)) / one_batch - 1) < 0.015
  assert abs(_sample_std(applied(per_micro)) / one_batch - np.sqrt(k)) < 0.03
