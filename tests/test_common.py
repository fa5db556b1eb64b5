"""One suite that runs every clipper through the ways users compose optimizers."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from tests.clippers import CASE_IDS, CASES, CATALOGUE, OTHERS
from tests.conftest import orbax_round_trip, shared

SHAPES = {"dense": (4, 3), "bias": (3,), "scalar": (), "conv": (2, 2, 3, 4), "heads": (2, 3, 5)}


def make_tree(seed: int, scale: float = 1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s) * scale, dtype) for k, s in SHAPES.items()}


def to_np(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_tree_close(actual, expected_leaves, rtol=1e-5, atol=1e-7):
  for a, e in zip(jax.tree.leaves(actual), expected_leaves):
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
  return request.param


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_matches_float64_reference(case, scale):
  params, grads = make_tree(0), make_tree(1, scale)
  tx = case.build()
  out, state = tx.update(grads, tx.init(params), params, **case.extra_args(grads))
  expected = case.reference(to_np(grads), to_np(params))
  assert_tree_close(out, expected)
  assert state.num_steps == 1
  # The state says whether anything changed, and by how much at most.
  changed = any(not np.allclose(e, g) for e, g in zip(expected, to_np(grads)))
  assert bool(state.clipped) == changed
  assert (float(state.clip_scale) < 1) == changed
  np.testing.assert_allclose(float(state.num_clipped), float(changed))


def test_pre_clip_norm_is_the_incoming_norm(case):
  params, grads = make_tree(0), make_tree(1, 10.0)
  tx = case.build()
  _, state = tx.update(grads, tx.init(params), params, **case.extra_args(grads))
  ord_ = {"norm_l1": 1, "global_norm_l1": 1, "global_norm_inf": np.inf, "global_norm_p3": 3}
  p = ord_.get(case.name, 2)
  flat = np.concatenate([x.ravel() for x in to_np(grads)])
  expected = np.max(np.abs(flat)) if np.isinf(p) else np.sum(np.abs(flat) ** p) ** (1 / p)
  np.testing.assert_allclose(float(state.pre_clip_norm), expected, rtol=1e-5)


_INNER = {"adam": optax.adam, "sgd": optax.sgd}


def chain_step(case, inner: str):
  """(opt, jit(step)) for opt = chain(the case's clipper, inner(0.1)).

  step(params, state, grads) -> (new params, new state, updates). One compiled
  program per (case, inner), shared by the tests that train with one.
  """

  def build():
    opt = optax.chain(case.build(), _INNER[inner](0.1))

    def step(params, state, grads):
      updates, state = opt.update(grads, state, params, **case.extra_args(grads))
      return optax.apply_updates(params, updates), state, updates

    return opt, jax.jit(step)

  return shared(("chain_step", case.name, inner), build)


@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_chain_with_optimizer_and_jit(case, inner):
  params, grads = make_tree(0), make_tree(1, 30.0)
  opt, step = chain_step(case, inner)
  new_params, state, _ = step(params, opt.init(params), grads)
  # Same as clipping by the reference and then applying the optimizer alone.
  clipped = jax.tree.unflatten(
      jax.tree.structure(grads),
      [jnp.asarray(x, jnp.float32) for x in case.reference(to_np(grads), to_np(params))],
  )
  ref_opt = _INNER[inner](0.1)
  ref_updates, _ = ref_opt.update(clipped, ref_opt.init(params), params)
  expected = optax.apply_updates(params, ref_updates)
  assert_tree_close(new_params, to_np(expected), rtol=2e-5, atol=1e-6)
  assert int(clipjax.clip_stats(state)["num_steps"]) == 1


def test_vmap_over_a_batch_of_gradients(case):
  params = make_tree(0)
  trees = [make_tree(s, 10.0 ** (s - 3)) for s in range(5)]
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  tx = case.build()
  state = tx.init(params)
  # Under jit, as users vmap; and indexed in NumPy (an eager x[i] compiles per index).
  step = jax.vmap(lambda g: tx.update(g, state, params, **case.extra_args(g)))
  out, states = jax.jit(step)(batch)
  for i in range(5):
    expected = case.reference([x[i] for x in to_np(batch)], to_np(params))
    assert_tree_close([x[i] for x in to_np(out)], expected)
  assert states.pre_clip_norm.shape == (5,)


def test_inject_hyperparams_schedules_the_threshold(case):
  params, grads = make_tree(0), make_tree(1, 30.0)
  schedule = optax.linear_schedule(case.threshold, case.threshold * 4, transition_steps=3)
  tx = case.injected(schedule)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    out, state = update(grads, state, params, **case.extra_args(grads))
    fixed = case.build(**{case.threshold_arg: float(schedule(step))})
    expected, _ = fixed.update(grads, fixed.init(params), params, **case.extra_args(grads))
    assert_tree_close(out, to_np(expected))
  assert int(clipjax.clip_stats(state)["num_steps"]) == 3


def test_multisteps_accumulates_then_clips(case):
  params = make_tree(0)
  micro = [make_tree(s, 20.0) for s in (1, 2)]
  opt = optax.MultiSteps(optax.chain(case.build(), optax.sgd(1.0)), every_k_schedule=2)
  state = opt.init(params)
  update = jax.jit(opt.update)
  mean_tree = jax.tree.map(lambda a, b: (a + b) / 2, *micro)
  # A keyword reaches the inner update on the accumulating step: the mean's.
  u1, state = update(micro[0], state, params, **case.extra_args(mean_tree))
  assert all(not np.any(x) for x in to_np(u1))  # nothing applied mid-accumulation
  u2, state = update(micro[1], state, params, **case.extra_args(mean_tree))
  mean = to_np(mean_tree)
  expected = [-x for x in case.reference(mean, to_np(params))]
  assert_tree_close(u2, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_preserved(case, dtype):
  params, grads = make_tree(0, dtype=dtype), make_tree(1, 30.0, dtype=dtype)
  tx = case.build()
  out, state = jax.jit(tx.update)(grads, tx.init(params), params, **case.extra_args(grads))
  for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    assert o.dtype == g.dtype and o.shape == g.shape
  assert state.pre_clip_norm.dtype == jnp.float32
  tol = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}[dtype]
  # Reference from the same (rounded) low-precision inputs.
  assert_tree_close(out, case.reference(to_np(grads), to_np(params)), rtol=tol, atol=tol)


def test_no_retrace_across_steps(case):
  chex.clear_trace_counter()  # the counter is keyed by code, shared across parameters
  params = make_tree(0)
  tx = case.build()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state, params, **case.extra_args(grads))

  state = tx.init(params)
  for s in range(4):
    _, state = step(make_tree(s, 10.0), state)
  assert int(state.num_steps) == 4


def test_state_is_a_scan_carry(case):
  params = make_tree(0)
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[make_tree(s, 3.0 * s) for s in range(6)])
  tx = case.build()

  def body(state, g):
    out, state = tx.update(g, state, params, **case.extra_args(g))
    return state, out

  final, outs = jax.lax.scan(body, tx.init(params), grads)
  state = tx.init(params)
  for i in range(6):
    g_i = jax.tree.map(lambda x, i=i: x[i], grads)
    o, state = tx.update(g_i, state, params, **case.extra_args(g_i))
    assert_tree_close(jax.tree.map(lambda x, i=i: x[i], outs), to_np(o))
  chex.assert_trees_all_close(final, state)


def test_state_survives_an_orbax_checkpoint(case, tmp_path):
  params = make_tree(0)
  opt, step = chain_step(case, "adam")
  state = opt.init(params)
  for s in range(3):
    params, state, _ = step(params, state, make_tree(s, 10.0))
  restored = orbax_round_trip(state, tmp_path / "state")
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_structs(restored, state)
  _, _, u_a = step(params, state, make_tree(9, 10.0))
  _, _, u_b = step(params, restored, make_tree(9, 10.0))
  chex.assert_trees_all_equal(u_a, u_b)


def test_functools_partial_is_fine(case):
  # A common pattern: a partially applied factory in a config.
  factory = functools.partial(case.build)
  params, grads = make_tree(0), make_tree(1)
  out, _ = factory().update(grads, factory().init(params), params, **case.extra_args(grads))
  assert jax.tree.structure(out) == jax.tree.structure(grads)


def test_state_buffers_can_be_donated(case):
  # jit(..., donate_argnums) fails if two fields of the state share a buffer.
  params = make_tree(0)
  opt, _ = chain_step(case, "sgd")
  step = jax.jit(lambda s, g: opt.update(g, s, params, **case.extra_args(g))[1], donate_argnums=0)
  state = step(opt.init(params), make_tree(1))
  assert int(clipjax.clip_stats(state)["num_steps"]) == 1


def aliased_outputs(compiled_text: str) -> set[int]:
  """Indices of the entry's outputs that XLA writes into a donated input's buffer."""
  header = compiled_text[: compiled_text.index("\n")]
  # ("{}" when the program returns a single array rather than a tuple)
  found = re.findall(r"\{(\d*)\}: \(\d+, \{\}, may-alias\)", header)
  return {int(i or 0) for i in found}


def assert_state_written_in_place(tx, grads, params, **extra):
  """A jitted update with its state donated writes every state field into its input.

  jit drops inputs a program does not read; a statistic the transform only
  writes would then get a fresh buffer each step, and on a GPU the step's CUDA
  graph is re-recorded whenever a buffer moves (see clipjax._base.in_place).
  """
  state = tx.init(params)
  text = (
      jax.jit(lambda s, g: tx.update(g, s, params, **extra)[1], donate_argnums=0)
      .lower(state, grads)
      .compile()
      .as_text()
  )
  n = len(jax.tree.leaves(state))
  missing = set(range(n)) - aliased_outputs(text)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert not missing, f"not written in place: {[paths[i] for i in sorted(missing)]}"


def test_every_state_field_is_written_in_place(case):
  params, grads = make_tree(0), make_tree(1)
  assert_state_written_in_place(case.build(), grads, params, **case.extra_args(grads))


@pytest.mark.parametrize("case", OTHERS, ids=lambda c: c.name)
def test_every_state_field_of_the_other_transforms_is_written_in_place(case):
  params = make_tree(0)
  grads = jax.tree.map(lambda *x: jnp.stack(x), *[make_tree(i) for i in range(4)])
  assert_state_written_in_place(case.build(), grads if case.per_example else make_tree(1), params)


def test_every_public_transform_is_in_the_catalogue():
  """A transform missing here would miss every parametrised suite."""
  not_transforms = {"chain", "clip_stats", "global_norm", "leaf_norms", "register_stats_type"}
  public = {
      name
      for name in clipjax.__all__
      if name[0].islower() and callable(getattr(clipjax, name)) and name not in not_transforms
  }
  covered = {c.public.__name__ for c in CATALOGUE}
  assert public - covered == set(), f"not in tests/clippers.py: {sorted(public - covered)}"
  for c in CATALOGUE:  # and every case builds a transformation
    assert isinstance(c.build(), optax.GradientTransformation), c.name


@pytest.mark.xla_default_cpu_codegen
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_donated_gradients_are_clipped_without_copying_them(case):
  """With the gradients donated, XLA writes the clipped values in place.

  A clipper whose output does not depend on its norms lets XLA clip first, and
  then it must copy every input to keep it for the norms (clip_by_value did).
  """
  params = {"w": jnp.ones((64, 32)), "v": jnp.ones((128, 16))}
  tx = case.build()
  hlo = (
      jax.jit(lambda g, s, e: tx.update(g, s, params, **e), donate_argnums=(0, 1))
      .lower(params, tx.init(params), case.extra_args(params))
      .compile()
      .as_text()
  )
  entry = hlo[hlo.index("ENTRY") :]
  assert not re.search(r"f32\[(64,32|128,16)\]\{[0-9,]*\} copy\(", entry), case.name


# ---------------------------------- one rule for every traced hyperparameter


def _scheduled_step(case, threshold):
  """The threshold scheduled to `threshold` after a first step at its usual value
  (a schedule is traced; a constant would be checked in Python at init)."""
  grads = make_tree(1)
  if case.per_example:
    grads = jax.tree.map(lambda *x: jnp.stack(x), *[make_tree(i) for i in range(4)])
  params = make_tree(0)
  tx = case.injected(lambda count: jnp.where(count == 0, case.threshold, threshold))
  state = tx.init(params)
  update = jax.jit(lambda g, s: tx.update(g, s, params, **case.extra_args(g)))
  for _ in range(4 if case.sequence else 2):
    out, state = update(grads, state)
  return out, clipjax.clip_stats(state)


_SCHEDULABLE = [c for c in CATALOGUE if c.threshold_arg not in ("ord",)]  # ord is static


@pytest.mark.parametrize("case", _SCHEDULABLE, ids=lambda c: c.name)
def test_a_traced_hyperparameter_follows_one_rule(case):
  """NaN: a non-finite step, never a silent finite one; below 0: as 0; inf: no limit."""
  out, stats = _scheduled_step(case, float("nan"))
  nonfinite = not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
  nonfinite |= int(stats.get("num_nonfinite", 0)) > 0
  assert nonfinite, (case.name, stats)
  below, zero = _scheduled_step(case, -1.0), _scheduled_step(case, 0.0)
  for a, b in zip(jax.tree.leaves(below), jax.tree.leaves(zero)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=case.name)
  out, stats = _scheduled_step(case, float("inf"))
  if case.name not in ("dp_noise", "per_example_clip"):  # (with noise: infinite noise, as asked)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out)), case.name
