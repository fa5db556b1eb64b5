"""History-adaptive clippers and spike skipping, step by step against NumPy loops."""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from clipjax import _forms


def norm_sequence(n=120, seed=0, spikes=(), nans=()):
  rng = np.random.default_rng(seed)
  v = np.abs(1.0 + 0.2 * rng.standard_normal(n))
  for s in spikes:
    v[s] *= 50.0
  for s in nans:
    v[s] = np.nan
  return v


def grads_of(norm):
  return {"w": jnp.asarray(np.array([3.0, 4.0]) / 5.0 * norm, jnp.float32)}


def run(tx, norms, **extra):
  state = tx.init(grads_of(1.0))
  step = jax.jit(tx.update)
  out = []
  for v in norms:
    u, state = step(grads_of(v), state, **extra)
    out.append((float(np.linalg.norm(np.asarray(u["w"], np.float64))), state))
  return out


# ------------------------------------------------------------------- references


def autoclip_reference(norms, p, history):
  hist = collections.deque(maxlen=history)
  res = []
  for v in norms:
    if math.isfinite(v):
      hist.append(v)
    thr = float(np.percentile(list(hist), p)) if hist else math.inf
    res.append((thr, min(v, thr) if math.isfinite(v) else v))
  return res


def zclip_reference(norms, alpha, z_thresh, eps, warmup, mode, max_norm=None):
  cap = math.inf if max_norm is None else max_norm
  buf, mean, var = [], 0.0, 0.0
  res = []
  for v in norms:
    if len(buf) < warmup:
      out = min(v, cap) if math.isfinite(v) else v
      if math.isfinite(v):
        buf.append(v)
        if len(buf) == warmup:
          mean, var = float(np.mean(buf)), float(np.var(buf))
      res.append((cap, out))
      continue
    std = math.sqrt(var)
    z = (v - mean) / (std + eps)
    boundary = min(mean + z_thresh * std, cap)
    if not math.isfinite(v):
      res.append((boundary, v))
      continue
    target = math.inf
    if z > z_thresh:
      target = mean + (z_thresh**2 * std / z if mode == "zscore" else z_thresh * std)
    target = min(target, cap)
    clipped = min(v, target)
    mean = alpha * mean + (1 - alpha) * clipped
    var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
    res.append((boundary, clipped))
  return res


def skip_reference(
    norms, losses, window, sigma, warmup, use_loss=True, floor=0.05, max_norm=None, max_ratio=None
):
  wn, wl = collections.deque(maxlen=window), collections.deque(maxlen=window)

  def threshold(w):
    if sigma is None:
      return math.inf
    return np.mean(w) + sigma * max(np.std(w), floor * abs(np.mean(w)))

  res = []
  for v, loss in zip(norms, losses):
    ready = len(wn) >= warmup
    tn = threshold(wn) if ready else math.inf
    tl = threshold(wl) if ready else math.inf
    if max_ratio is not None and ready:
      tn = min(tn, max_ratio * max(wn))
    if max_norm is not None:
      tn = min(tn, max_norm)
    finite = math.isfinite(v) and (math.isfinite(loss) or not use_loss)
    skip = (not finite) or v > tn or (use_loss and loss > tl)
    if finite:
      wn.append(min(v, tn))
      wl.append(min(loss if use_loss else 0.0, tl))
    res.append(skip)
  return res


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize("p,history", [(10.0, 1000), (50.0, 16), (90.0, 5)])
def test_autoclip_matches_reference(p, history):
  norms = norm_sequence(spikes=(30, 31, 70), nans=(50,))
  got = run(clipjax.autoclip(p, history=history), norms)
  for (out, state), (thr, expected) in zip(got, autoclip_reference(norms, p, history)):
    np.testing.assert_allclose(float(state.clip_threshold), thr, rtol=1e-5)
    if math.isfinite(expected):
      np.testing.assert_allclose(out, expected, rtol=1e-5)
  assert int(got[-1][1].num_nonfinite) == 1
  assert int(got[-1][1].history_count) == min(history, len(norms) - 1)


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
@pytest.mark.parametrize("max_norm", [None, 1.3])
def test_zclip_matches_reference(mode, max_norm):
  norms = norm_sequence(spikes=(40, 41, 90), nans=(10, 60))
  kw = dict(alpha=0.9, z_thresh=2.0, eps=1e-6, warmup_steps=12, mode=mode, max_norm=max_norm)
  got = run(clipjax.zclip(**kw), norms)
  ref = zclip_reference(norms, kw["alpha"], kw["z_thresh"], kw["eps"], 12, mode, max_norm)
  clipped_steps = 0
  for (out, state), (boundary, expected) in zip(got, ref):
    np.testing.assert_allclose(float(state.clip_threshold), boundary, rtol=1e-4)
    if math.isfinite(expected):
      np.testing.assert_allclose(out, expected, rtol=1e-4)
    clipped_steps += bool(state.clipped)
  assert clipped_steps >= 3 and int(got[-1][1].num_nonfinite) == 2


def test_zclip_reciprocal_mode_clips_bigger_spikes_harder():
  warm = list(norm_sequence(30))
  outs = []
  for spike in (10.0, 100.0):
    got = run(clipjax.zclip(warmup_steps=25), warm + [spike])
    outs.append(got[-1][0])
  assert outs[1] < outs[0]


@pytest.mark.parametrize("use_loss", [True, False])
def test_skip_spikes_matches_reference(use_loss):
  n = 150
  norms = norm_sequence(n, spikes=(40, 90), nans=(60,))
  rng = np.random.default_rng(1)
  losses = 2.0 + 0.1 * rng.standard_normal(n)
  losses[[70, 71]] *= 30.0
  losses[100] = np.inf
  tx = clipjax.skip_spikes(optax.sgd(0.1), window=32, sigma=4.0, warmup=10, use_loss=use_loss)
  state = tx.init(grads_of(1.0))
  step = jax.jit(tx.update)
  ref = skip_reference(norms, losses, 32, 4.0, 10, use_loss)
  skipped = []
  for v, loss, expected in zip(norms, losses, ref):
    kw = {"loss": jnp.float32(loss)} if use_loss else {}
    u, new_state = step(grads_of(v), state, **kw)
    assert bool(new_state.skipped) == expected
    if expected:
      np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
      jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
    skipped.append(bool(new_state.skipped))
    state = new_state
  expected_skips = {40, 90, 60} | ({70, 71, 100} if use_loss else set())
  assert {i for i, s in enumerate(skipped) if s} == expected_skips
  assert int(state.num_skipped) == len(expected_skips)


@pytest.mark.parametrize(
    "sigma, max_norm, max_ratio",
    [(None, 2.5, None), (None, None, 3.0), (4.0, 2.5, 3.0), (None, 2.5, 3.0)],
)
def test_skip_spikes_fixed_and_ratio_thresholds_match_the_reference(sigma, max_norm, max_ratio):
  """axlearn's drop_norm (from step 1) and Megatron's "x the recent max", alone or with sigma."""
  n = 80
  norms = list(norm_sequence(n, spikes=(5, 40), nans=(60,)))
  norms[20] = 2.7  # above max_norm, below 3x the recent max (about 1.3)
  norms[30] = 0.5 * norms[30]  # a dip: no test skips it
  tx = clipjax.skip_spikes(
      optax.sgd(0.1),
      window=16,
      sigma=sigma,
      warmup=8,
      use_loss=False,
      max_norm=max_norm,
      max_ratio=max_ratio,
  )
  state = tx.init(grads_of(1.0))
  step = jax.jit(tx.update)
  ref = skip_reference(
      norms, [0.0] * n, 16, sigma, 8, False, max_norm=max_norm, max_ratio=max_ratio
  )
  skipped = []
  for v, expected in zip(norms, ref):
    u, state = step(grads_of(v), state)
    assert bool(state.skipped) == expected, (len(skipped), v, float(state.norm_threshold))
    skipped.append(expected)
  assert skipped[40] and skipped[60] and not skipped[30]
  # Step 5 is before the warm-up, and step 20 below 3x the recent max: max_norm only.
  assert skipped[5] == skipped[20] == (max_norm is not None)
  assert int(state.num_skipped) == sum(skipped)


def test_skip_spikes_thresholds_are_checked():
  for kw, name in [({"max_norm": 0.0}, "max_norm"), ({"max_ratio": 1.0}, "max_ratio")]:
    with pytest.raises(ValueError, match=name):
      clipjax.skip_spikes(optax.sgd(0.1), use_loss=False, **kw)


def test_skip_spikes_needs_the_loss():
  tx = clipjax.skip_spikes(optax.sgd(0.1))
  with pytest.raises(ValueError, match="loss="):
    tx.update(grads_of(1.0), tx.init(grads_of(1.0)))


def test_skip_spikes_inside_chain_skips_later_links_and_reports_stats():
  opt = clipjax.chain(
      clipjax.skip_spikes(clipjax.clip_by_global_norm(1.0), window=8, warmup=4, use_loss=False),
      optax.adam(0.1),
  )
  params = grads_of(1.0)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for v in [1.0, 1.1, 0.9, 1.0, 1.0]:
    _, state = update(grads_of(v), state, params)
  before = state[1]
  u, state = update(grads_of(1e4), state, params)
  np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
  jax.tree.map(np.testing.assert_array_equal, state[1], before)
  stats = clipjax.clip_stats(state)
  assert int(stats["0/num_skipped"]) == 1
  assert int(stats["0/inner_state/num_steps"]) == 5  # the inner clipper did not run


@pytest.mark.parametrize(
    "bad",
    [
        lambda: clipjax.autoclip(101.0),
        lambda: clipjax.autoclip(-1.0),
        lambda: clipjax.autoclip(10.0, history=0),
        lambda: clipjax.autoclip(10.0, history=2.5),  # type: ignore[arg-type]
        lambda: clipjax.zclip(alpha=1.0),
        lambda: clipjax.zclip(alpha=0.0),
        lambda: clipjax.zclip(z_thresh=0.0),
        lambda: clipjax.zclip(eps=-1.0),
        lambda: clipjax.zclip(warmup_steps=0),
        lambda: clipjax.zclip(mode="ema"),  # type: ignore[arg-type]
        lambda: clipjax.zclip(max_norm=-1.0),
        lambda: clipjax.zclip(nonfinite="x"),  # type: ignore[arg-type]
        lambda: clipjax.skip_spikes(optax.sgd(1.0), window=1),
        lambda: clipjax.skip_spikes(optax.sgd(1.0), window=8, warmup=9),
        lambda: clipjax.skip_spikes(optax.sgd(1.0), sigma=0.0),
        lambda: clipjax.skip_spikes(optax.sgd(1.0), use_loss="yes"),  # type: ignore[arg-type]
    ],
)
def test_bad_hyperparameters(bad):
  with pytest.raises((ValueError, TypeError)):
    bad()


def test_fault_injection_1000_steps():
  """Spikes and NaNs at random steps: params stay finite, every injected step is skipped."""
  rng = np.random.default_rng(0)
  n_steps, dim = 1000, 16
  w_true = rng.standard_normal(dim).astype(np.float32)
  xs = rng.standard_normal((n_steps, 32, dim)).astype(np.float32)
  ys = xs @ w_true + 0.1 * rng.standard_normal((n_steps, 32)).astype(np.float32)
  faulty = rng.choice(np.arange(100, n_steps), size=30, replace=False)
  kinds = np.zeros(n_steps, np.int32)
  kinds[faulty[:15]] = 1  # gradient and loss x 1e4
  kinds[faulty[15:]] = 2  # NaN gradient

  opt = clipjax.chain(
      clipjax.skip_spikes(optax.chain(clipjax.zclip(), optax.adam(1e-2)), window=128, sigma=6.0),
  )
  params = {"w": jnp.zeros(dim), "b": jnp.zeros(())}

  def loss_fn(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  def body(carry, inputs):
    p, s = carry
    x, y, kind = inputs
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    factor = jnp.where(kind == 1, 1e4, 1.0)
    g = jax.tree.map(lambda t: t * factor, g)
    g = {"w": jnp.where(kind == 2, g["w"].at[0].set(jnp.nan), g["w"]), "b": g["b"]}
    u, s = opt.update(g, s, p, loss=loss * factor)
    return (optax.apply_updates(p, u), s), loss

  (p, s), losses = jax.jit(lambda c, i: jax.lax.scan(body, c, i))(
      (params, opt.init(params)), (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(kinds))
  )
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(p))
  stats = clipjax.clip_stats(s)
  assert int(stats["0/num_skipped"]) == 30
  assert int(stats["0/num_nonfinite"]) == 15
  assert float(np.mean(np.asarray(losses)[-50:])) < 0.05  # it still learned


def test_skip_spikes_state_can_be_donated():
  tx = clipjax.skip_spikes(optax.adam(0.1), use_loss=False)
  step = jax.jit(lambda s, g: tx.update(g, s, g)[1], donate_argnums=0)
  state = step(tx.init(grads_of(1.0)), grads_of(2.0))
  assert int(state.num_steps) == 1


def test_skip_spikes_rejects_integer_gradients():
  tx = clipjax.skip_spikes(optax.sgd(0.1), use_loss=False)
  g = {"w": jnp.ones(2), "step": jnp.array(1, jnp.int32)}
  with pytest.raises(TypeError, match="skip_spikes"):
    tx.update(g, tx.init(g))


# ----------------------------------------------------------------------- AdaGC


def adagc_reference(steps, lambda_abs, lambda_rel, beta, warmup, eps=1e-8):
  """float64, from the rule (pytorch-optimizer's AdaGC, its clipping part)."""
  gamma, outs = None, []
  for t, leaves in enumerate(steps, start=1):
    leaves = [np.asarray(x, np.float64) for x in leaves]
    norms = [np.linalg.norm(x.ravel()) for x in leaves]
    if gamma is None or t < warmup:
      total = np.sqrt(sum(n**2 for n in norms))
      s = min(lambda_abs / (total + eps), 1.0)
      hat = [x * s for x in leaves]
      hat_norms = [n * s for n in norms]
      gamma = hat_norms if gamma is None else [min(g, h) for g, h in zip(gamma, hat_norms)]
    else:
      h = [min(lambda_rel * max(g, eps) / max(n, eps), 1.0) for g, n in zip(gamma, norms)]
      hat = [x * hi for x, hi in zip(leaves, h)]
      gamma = [beta * g + (1 - beta) * n * hi for g, n, hi in zip(gamma, norms, h)]
    outs.append((hat, list(gamma)))
  return outs


@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_adagc_matches_the_float64_reference_through_warmup_and_spikes(scale):
  rng = np.random.default_rng(0)
  factors = [1, 1, 1, 1, 1, 8, 1, 1, 0.5, 30, 1, 1]  # spikes at steps 6 and 10
  steps = [
      [rng.normal(size=(4, 3)) * f * scale, rng.normal(size=(5,)) * f * scale * 1e-2]
      for f in factors
  ]
  expected = adagc_reference(steps, 2.0 * scale, 1.05, 0.9, warmup=4)
  tx = clipjax.adagc(2.0 * scale, lambda_rel=1.05, beta=0.9, warmup_steps=4)
  state = tx.init([jnp.zeros((4, 3)), jnp.zeros(5)])
  update = jax.jit(tx.update)
  for t, (leaves, (hat, gamma)) in enumerate(zip(steps, expected)):
    out, state = update([jnp.asarray(x, jnp.float32) for x in leaves], state)
    for a, e in zip(out, hat):
      np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=2e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(
        np.asarray(state.gamma.values, np.float64), gamma, rtol=2e-5, err_msg=f"step {t}"
    )
  assert int(state.num_steps) == len(factors) and int(state.num_clipped) >= 2


def test_adagc_non_finite_steps_leave_the_statistics_and_stats_name_them_by_leaf():
  tx = clipjax.adagc(10.0, warmup_steps=1)
  g = {"enc": jnp.array([3.0, 4.0]), "head": jnp.array([1.0])}
  _, state = tx.update(g, tx.init(g))
  bad = {"enc": jnp.array([jnp.nan, 4.0]), "head": jnp.array([1.0])}
  _, after = tx.update(bad, state)
  jax.tree.map(np.testing.assert_array_equal, after.gamma, state.gamma)
  assert int(after.num_nonfinite) == 1
  stats = clipjax.clip_stats(after)
  assert float(stats["gamma/enc"]) == 5.0 and float(stats["gamma/head"]) == 1.0
  assert {k: float(v) for k, v in after.gamma.as_dict().items()} == {"enc": 5.0, "head": 1.0}


def test_adagc_rejects_bad_arguments_and_foreign_states():
  for kwargs, name in [
      ({"lambda_abs": -1.0}, "lambda_abs"),
      ({"lambda_rel": 0.0}, "lambda_rel"),
      ({"beta": 1.0}, "beta"),
      ({"eps": 0.0}, "eps"),
      ({"warmup_steps": -1}, "warmup_steps"),
  ]:
    with pytest.raises(ValueError, match=name):
      clipjax.adagc(**kwargs)
  tx = clipjax.adagc()
  with pytest.raises(ValueError, match="per-leaf statistics are for the leaves"):
    tx.update({"w": jnp.ones(2), "b": jnp.ones(1)}, tx.init({"w": jnp.ones(2)}))
  with pytest.raises(ValueError, match="per-leaf statistics are for the leaves"):
    tx.update({"v": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))  # same shape, another leaf
  with pytest.raises(TypeError, match="adagc"):
    tx.update({"w": jnp.ones(2)}, clipjax.zclip().init({"w": jnp.ones(2)}))


# ------------------------------------------------------------------------ SPAM


def spam_adam_reference(grads, lr, theta, gap, warmup, delay, b1=0.9, b2=0.999, eps=1e-8):
  """float64: SPAM's rules (pytorch-optimizer's SPAM, density 1) around optax's Adam rule."""
  m = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  k, outs, clipped = warmup + 1, [], []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64).copy()
    if t % gap == 0:  # momentum reset (Adam's count kept)
      m[:], v[:] = 0, 0
    n = 0
    if theta > 0 and t >= delay and t % gap >= delay:
      spike = g**2 > theta * v
      n = int(spike.sum())
      g[spike] = np.sign(g[spike]) * np.sqrt(theta * v[spike])
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    update = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    death = 0.0 if k >= warmup else 0.99 * (1 + np.cos(np.pi * (k + 1) / (warmup + 1))) / 2
    outs.append(update * (1 - death))
    clipped.append(n)
    k = 0 if (t + 1) % gap == 0 else k + 1
  return outs, clipped


@pytest.mark.parametrize("form", ["branch", "select"])
@pytest.mark.parametrize("gap", [1, 2, 12])
def test_spam_matches_the_float64_reference_through_spikes_and_resets(gap, form):
  # Both forms of the moment reset, each also where the platform would not pick it.
  forms = dataclasses.replace(_forms.for_trace(), spam_reset=form)
  with _forms.use(forms):
    _spam_against_the_reference(gap)


def _spam_against_the_reference(gap):
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(6,)) * (100.0 if t in (9, 17) else 1.0) for t in range(1, 31)]
  warmup, delay = min(4, gap), 3  # (spam refuses a warm-up longer than the interval)
  expected, clipped = spam_adam_reference(grads, 0.01, 50.0, gap, warmup, delay)
  opt = clipjax.spam(
      optax.adam(0.01), theta=50.0, reset_interval=gap, warmup_steps=warmup, clip_delay=delay
  )
  params = {"w": jnp.zeros(6)}
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t, (g, e, n) in enumerate(zip(grads, expected, clipped), start=1):
    out, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), e, rtol=2e-4, atol=1e-7)
    assert int(state.entries_clipped) == n, t
  assert int(state.num_resets) == 30 // gap and int(state.num_steps) == 30
  if gap == 12:
    assert sum(clipped) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_spam_clips_each_entry_against_its_own_second_moment(dtype):
  """theta v = 4: |g| > 2 goes to +-2 (inf too), v = 0 clips to 0, NaN stays NaN."""
  opt = clipjax.spam(optax.adam(0.1), theta=1.0, clip_delay=2, reset_interval=100)
  params = {"w": jnp.zeros(7, dtype)}
  state = opt.init(params)
  nu = jnp.asarray([4.0, 4.0, 4.0, 4.0, 0.0, 4.0, 4.0], dtype)
  state = state._replace(  # step 3: past the clip delay and the warm-up's first steps
      inner_state=(state.inner_state[0]._replace(nu={"w": nu}),) + tuple(state.inner_state[1:]),
      num_steps=jnp.asarray(2, jnp.int32),
  )
  g = {"w": jnp.asarray([3.0, -3.0, 1.0, jnp.inf, 5.0, jnp.nan, -jnp.inf], dtype)}
  _, new = jax.jit(opt.update)(g, state, params)
  clipped = np.asarray(new.inner_state[0].mu["w"], np.float64) / 0.1  # mu was 0: (1 - b1) g
  np.testing.assert_allclose(clipped, [2.0, -2.0, 1.0, 2.0, 0.0, np.nan, -2.0], rtol=1e-2)
  assert int(new.entries_clipped) == 5
  assert new.inner_state[0].mu["w"].dtype == dtype


def test_spam_finds_the_moments_inside_wrappers_and_refuses_optimizers_without_them():
  params = {"w": jnp.zeros(3)}
  inner = optax.chain(optax.clip(10.0), optax.inject_hyperparams(optax.adamw)(learning_rate=0.1))
  opt = clipjax.spam(inner, reset_interval=2, warmup_steps=1)
  state = opt.init(params)
  for _ in range(2):
    _, state = jax.jit(opt.update)({"w": jnp.ones(3)}, state, params)
  adam_state = [
      n
      for n in jax.tree.leaves(
          state.inner_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
      )
      if isinstance(n, optax.ScaleByAdamState)
  ][0]
  # Step 2 reset the moments before its update: they hold step 2's gradient only.
  np.testing.assert_allclose(np.asarray(adam_state.mu["w"]), 0.1, rtol=1e-6)
  assert int(adam_state.count) == 2
  with pytest.raises(ValueError, match="ScaleByAdamState"):
    clipjax.spam(optax.sgd(0.1)).init(params)
  for kwargs, name in [
      ({"theta": -1.0}, "theta"),
      ({"reset_interval": 0}, "reset_interval"),
      ({"warmup_steps": -1}, "warmup_steps"),
      ({"clip_delay": 1.5}, "clip_delay"),
      ({"clip_delay": 1}, "clip_delay must be >= 2"),
      ({"reset_interval": 10, "warmup_steps": 50}, "reset_interval .10. is shorter than warmup"),
  ]:
    with pytest.raises((ValueError, TypeError), match=name):
      clipjax.spam(optax.adam(0.1), **kwargs)
  with pytest.raises(TypeError, match="inner"):  # as skip_spikes and chain
    clipjax.spam(None)


def test_adagc_lambda_rel_scheduled_below_zero_is_clamped_not_a_sign_flip():
  grads = {"w": jnp.array([3.0, 4.0])}
  factory = optax.inject_hyperparams(clipjax.adagc, static_args=("warmup_steps",))
  tx = factory(lambda_abs=1.0, lambda_rel=lambda c: jnp.where(c < 2, 1.05, -1.0), warmup_steps=2)
  state = tx.init(grads)
  update = jax.jit(tx.update)
  for _ in range(4):
    out, state = update(grads, state)
  assert float(jnp.dot(out["w"], grads["w"])) >= 0.0, out  # was [-0.6, -0.8]


def test_per_example_clip_norm_scheduled_to_inf_without_noise_clips_nothing():
  g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
  factory = optax.inject_hyperparams(clipjax.per_example_clip)
  tx = factory(l2_norm_clip=lambda c: jnp.where(c < 1, 1.0, jnp.inf), reduction="sum")
  state = tx.init(None)
  update = jax.jit(tx.update)
  for _ in range(2):
    out, state = update(g, state)
  np.testing.assert_allclose(np.asarray(out["w"]), [3.3, 4.4], rtol=1e-6)  # was NaN
