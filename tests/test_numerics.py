"""Overflow, underflow, zero, non-finite and differentiability behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import test_util as jtu
from jax.experimental import checkify

import clipjax
from clipjax import _forms
from clipjax._shaping import packing as _packing
from clipjax._shaping import parts as _parts
from tests import reference as ref
from tests.clippers import CASES
from tests.conftest import use_implementation

# The numerics contract as XLA's default CPU compile gives it (see conftest.py).
pytestmark = pytest.mark.xla_default_cpu_codegen


@pytest.fixture(autouse=True, params=["cond", "multiscale", "gpu"])
def norm_implementation(request, monkeypatch):
  """Every test here runs under each form of the norms (see `use_implementation`)."""
  use_implementation(monkeypatch, request.param)
  return request.param


NORM_CLIPPERS = {
    "global_norm": lambda m, **kw: clipjax.clip_by_global_norm(m, **kw),
    "norm": lambda m, **kw: clipjax.clip_by_norm(m, **kw),
}


def _direction_and_norm(out, grads, max_norm):
  o = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(out)])
  g = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(grads)])
  rel_norm = abs(np.linalg.norm(o) - max_norm) / max_norm
  direction = np.linalg.norm(o / np.linalg.norm(o) - g / np.linalg.norm(g))
  return rel_norm, direction


@pytest.mark.parametrize("name", sorted(NORM_CLIPPERS))
def test_fp16_gradients_of_300_are_clipped_not_zeroed(name):
  rng = np.random.default_rng(0)
  grads = {"w": jnp.asarray(300 * np.sign(rng.normal(size=(64, 32))), jnp.float16)}
  out, state = jax.jit(NORM_CLIPPERS[name](1.0).update)(grads, NORM_CLIPPERS[name](1.0).init(grads))
  assert np.isfinite(float(state.pre_clip_norm))
  np.testing.assert_allclose(float(state.pre_clip_norm), 300 * np.sqrt(64 * 32), rtol=1e-6)
  rel_norm, direction = _direction_and_norm(out, grads, 1.0)
  assert rel_norm < 2e-3 and direction < 2e-3  # fp16 output rounding only


@pytest.mark.parametrize("name", sorted(NORM_CLIPPERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_gradients_are_clipped_to_the_right_norm_and_direction(name, dtype):
  rng = np.random.default_rng(1)
  grads = {
      "a": jnp.asarray(rng.normal(size=(100, 10)) * 1e20, dtype),
      "b": jnp.asarray(rng.normal(size=(7,)) * 3e19, dtype),
  }
  tx = clipjax.clip_by_global_norm(2.0) if name == "global_norm" else clipjax.clip_by_norm(2.0)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  expected = (
      ref.clip_by_global_norm(leaves, 2.0)
      if name == "global_norm"
      else ref.clip_by_norm(leaves, 2.0)
  )
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for o, e in zip(jax.tree.leaves(out), expected):
    np.testing.assert_allclose(np.asarray(o, np.float64), e, rtol=tol, atol=tol * np.abs(e).max())
  np.testing.assert_allclose(float(state.pre_clip_norm), ref.global_norm(leaves), rtol=1e-5)
  assert int(state.num_nonfinite) == 0


@pytest.mark.parametrize("shape", [(), (1,), (3,)])
@pytest.mark.parametrize("value", [3e20, 3e-30, 1.0])
def test_single_small_leaf_norm_under_jit(shape, value):
  # Size-1 reductions once let XLA reassociate the scaling into inf * 0 = NaN.
  x = jnp.full(shape, value, jnp.float32)
  expected = value * np.sqrt(max(x.size, 1))
  for fn in (jax.jit(clipjax.global_norm), clipjax.global_norm):
    np.testing.assert_allclose(float(fn({"a": x})), expected, rtol=1e-6)


def test_global_norm_of_tiny_gradients_is_exact():
  grads = {"w": jnp.full((1000,), 1e-30, jnp.float32)}  # squares underflow in fp32
  np.testing.assert_allclose(float(clipjax.global_norm(grads)), 1e-30 * np.sqrt(1000), rtol=1e-5)
  tx = clipjax.clip_by_global_norm(1e-32)
  out, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["w"], np.float64)), 1e-32, rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, np.inf])
def test_global_norm_helper_matches_reference(p):
  rng = np.random.default_rng(2)
  tree = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(3, 4), (5,), ()]]
  np.testing.assert_allclose(
      float(clipjax.global_norm(tree, p)),
      ref.global_norm([np.asarray(x) for x in tree], p),
      rtol=1e-6,
  )


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, np.inf])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_leaf_norms_match_reference_over_the_float_range(p, scale):
  # Each leaf its own norm, exact even where |g|^p leaves float32 (1e30^2) and
  # beside leaves of other magnitudes (a tiny leaf next to a normal one).
  rng = np.random.default_rng(3)
  tree = {
      "big": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
      "one": jnp.asarray(rng.normal(size=5), jnp.float32),
      "tiny": jnp.asarray(rng.normal(size=()) * 1e-35, jnp.float32),
      "empty": jnp.zeros((0,), jnp.float32),
  }
  for fn in (clipjax.leaf_norms, jax.jit(clipjax.leaf_norms, static_argnums=1)):
    got = fn(tree, p)
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    for k, x in tree.items():
      expected = ref.pnorm(np.asarray(x, np.float64), p)
      assert got[k].dtype == jnp.float32 and got[k].shape == ()
      np.testing.assert_allclose(float(got[k]), expected, rtol=2e-6, err_msg=k)


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipjax.clip_by_global_norm(0.0),
        lambda: clipjax.clip_by_norm(0.0),
        lambda: clipjax.clip_by_block_rms(0.0),
        lambda: clipjax.clip_by_value(0.0),
    ],
)
def test_zero_threshold_zeroes_without_nan(make):
  grads = {"w": jnp.array([1.0, -2.0]), "z": jnp.zeros(3)}
  tx = make()
  out, state = tx.update(grads, tx.init(grads))
  for x in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  assert np.isfinite(float(state.clip_scale))


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipjax.clip_by_global_norm(1.0),
        lambda: clipjax.clip_by_norm(1.0),
        lambda: clipjax.clip_by_block_rms(1.0),
        lambda: clipjax.clip_by_value(1.0),
        lambda: clipjax.adaptive_grad_clip(0.1),
        lambda: clipjax.clip_by_global_norm(0.0),
    ],
)
def test_all_zero_gradients_give_zero_updates_and_no_nan(make):
  grads = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = make()
  out, state = tx.update(grads, tx.init(grads), grads)
  for x in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  assert float(state.pre_clip_norm) == 0.0 and not bool(state.clipped)


def test_meta_gradient_wrt_max_norm_and_grads():
  grads = {"w": jnp.array([3.0, 4.0])}

  def loss(max_norm, g):
    tx = clipjax.clip_by_global_norm(max_norm)
    out, _ = tx.update(g, tx.init(g))
    return jnp.sum(out["w"] * jnp.array([1.0, 2.0]))

  # Clipped: out = max_norm * g / |g|, so d/dmax_norm = (3 + 8) / 5.
  np.testing.assert_allclose(jax.grad(loss)(1.0, grads), 11 / 5, rtol=1e-6)
  # Not clipped: out = g, no dependence on max_norm.
  np.testing.assert_allclose(jax.grad(loss)(10.0, grads), 0.0)
  # d out / d g of the clipped branch, against finite differences.
  jtu.check_grads(lambda g: loss(1.0, {"w": g}), (grads["w"],), order=1, modes="rev")
  # Through zero gradients the derivative stays finite (no sqrt'(0) = inf).
  g0 = jax.grad(lambda g: loss(1.0, {"w": g}))(jnp.zeros(2))
  assert np.all(np.isfinite(np.asarray(g0)))


def test_meta_gradient_through_overflow_branch_is_finite():
  def f(g):
    tx = clipjax.clip_by_global_norm(1.0)
    return jnp.sum(tx.update({"w": g}, tx.init({"w": g}))[0]["w"])

  d = jax.grad(f)(jnp.array([3e20, 4e20]))
  assert np.all(np.isfinite(np.asarray(d)))


# ---------------------------------------------------------------- non-finite policy

NAN_GRADS = {"w": jnp.array([jnp.nan, 1.0]), "b": jnp.array([2.0])}
INF_GRADS = {"w": jnp.array([jnp.inf, 1.0]), "b": jnp.array([2.0])}


@pytest.mark.parametrize("grads", [NAN_GRADS, INF_GRADS], ids=["nan", "inf"])
def test_propagate_lets_nonfinite_through_and_counts_it(grads):
  tx = clipjax.clip_by_global_norm(1.0)
  out, state = tx.update(grads, tx.init(grads))
  assert not np.all(np.isfinite(np.asarray(out["w"])))
  assert int(state.num_nonfinite) == 1 and not bool(state.clipped)


@pytest.mark.parametrize("grads", [NAN_GRADS, INF_GRADS], ids=["nan", "inf"])
def test_propagate_gives_what_optax_and_pytorch_give(grads):
  # optax.clip_by_global_norm, and torch's clip_grad_norm_ (coefficient
  # max_norm / (norm + 1e-6) clamped to 1, NaN staying NaN): a NaN gradient makes
  # every entry NaN; an inf one makes the finite entries 0 and the inf ones NaN.
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
  with np.errstate(invalid="ignore"):
    coef = 1.0 / (norm + 1e-6)
    coef = coef if np.isnan(coef) else min(coef, 1.0)
    torch_like = [x * coef for x in leaves]
  optax_out = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
  tx = clipjax.clip_by_global_norm(1.0)
  out, _ = tx.update(grads, tx.init(grads))
  for o, t, x in zip(jax.tree.leaves(out), torch_like, jax.tree.leaves(optax_out)):
    np.testing.assert_array_equal(np.asarray(o), t)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(x))


def test_propagate_with_per_leaf_clippers_poisons_the_nan_leaf_only():
  for tx in (clipjax.clip_by_norm(1.0), clipjax.clip_by_block_rms(1.0)):
    out, _ = tx.update(NAN_GRADS, tx.init(NAN_GRADS))
    assert np.all(np.isnan(np.asarray(out["w"]))) and np.all(np.isfinite(np.asarray(out["b"])))
  tx = clipjax.clip_by_value(1.0)  # entry by entry, as optax.clip
  out, _ = tx.update(NAN_GRADS, tx.init(NAN_GRADS))
  np.testing.assert_array_equal(np.asarray(out["w"]), [np.nan, 1.0])


@pytest.mark.parametrize("grads", [NAN_GRADS, INF_GRADS], ids=["nan", "inf"])
def test_zero_policy_zeroes_and_downstream_still_runs(grads):
  opt = optax.chain(clipjax.clip_by_global_norm(1.0, nonfinite="zero"), optax.adam(0.1))
  params = jax.tree.map(jnp.ones_like, grads)
  updates, state = opt.update(grads, opt.init(params), params)
  for x in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  assert int(state[1][0].count) == 1  # adam stepped on zeros
  assert int(state[0].num_nonfinite) == 1 and not bool(state[0].skipped)


@pytest.mark.parametrize("grads", [NAN_GRADS, INF_GRADS], ids=["nan", "inf"])
def test_skip_policy_leaves_downstream_state_untouched(grads):
  opt = clipjax.chain(clipjax.clip_by_global_norm(1.0, nonfinite="skip"), optax.adam(0.1))
  params = jax.tree.map(jnp.ones_like, grads)
  good = jax.tree.map(lambda x: jnp.full_like(x, 0.5), grads)
  step = jax.jit(opt.update)
  _, state = step(good, opt.init(params), params)
  updates, skipped_state = step(grads, state, params)
  for x in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  jax.tree.map(np.testing.assert_array_equal, skipped_state[1], state[1])
  assert bool(skipped_state[0].skipped) and int(skipped_state[0].num_nonfinite) == 1
  # The next good step runs the optimizer again.
  _, after = step(good, skipped_state, params)
  assert int(after[1][0].count) == 2 and not bool(after[0].skipped)


def test_chain_without_skip_matches_optax_chain():
  params = {"w": jnp.ones(3)}
  g = {"w": jnp.array([3.0, -4.0, 12.0])}
  ours = clipjax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(0.1))
  theirs = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(0.1))
  s1, s2 = ours.init(params), theirs.init(params)
  for _ in range(3):
    u1, s1 = jax.jit(ours.update)(g, s1, params)
    u2, s2 = jax.jit(theirs.update)(g, s2, params)
    # The links after a clipper run inside lax.cond: rounding may differ by an ulp.
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)


def test_raise_policy_under_checkify():
  tx = clipjax.clip_by_global_norm(1.0, nonfinite="raise")
  state = tx.init(NAN_GRADS)
  checked = checkify.checkify(jax.jit(tx.update), errors=checkify.user_checks)
  err, _ = checked(NAN_GRADS, state)
  with pytest.raises(checkify.JaxRuntimeError, match="non-finite gradient norm"):
    err.throw()
  ok = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([0.3])}
  err, (out, _) = checked(ok, state)
  assert err.get() is None
  np.testing.assert_allclose(np.asarray(out["w"]), [0.1, 0.2])


def test_raise_policy_eagerly_raises():
  tx = clipjax.clip_by_global_norm(1.0, nonfinite="raise")
  with pytest.raises(checkify.JaxRuntimeError):
    tx.update(INF_GRADS, tx.init(INF_GRADS))


@pytest.mark.parametrize(
    "make, sums, unpacked",
    [
        (lambda: clipjax.clip_by_global_norm(1.0), 1, 0),
        (lambda: clipjax.clip_by_norm(1.0), 1, 0),
        # The gradients' and the parameters'. A (4, 3) kernel's units are its
        # columns, packed as a block (kernels, 4, 3); with axis=1 they are its rows.
        (lambda: clipjax.adaptive_grad_clip(0.1), 2, 0),
        (lambda: clipjax.adaptive_grad_clip(0.1, axis=1), 2, 0),
        (lambda: clipjax.clip_by_value(0.1), 3, 0),  # max-abs, the norm, the clipped norm
    ],
)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per_leaf"])
def test_program_size_does_not_grow_per_leaf_beyond_the_reductions(
    make, sums, unpacked, packed, norm_implementation, monkeypatch
):
  """A fixed number of branches for the whole tree (CPU path), none per leaf.

  XLA's compile time counts ops. On CPU: one for the norms' rescue, one that
  materialises per-leaf clip factors; none on the GPU/TPU path. With the plain
  sums ('cond'), each leaf is reduced only by the clipper's own sums: the rescue
  branch reduces the leaves of one size together, whatever their number. On
  CPU, so are the plain sums of small leaves (`unpacked`: the sums per leaf that
  remain), unless packing is turned off.
  """
  if not packed:
    monkeypatch.setattr(_packing, "_PACK_LEAF_ELEMENTS", 0)
    monkeypatch.setattr(_packing, "_PACK_COLUMN_ELEMENTS", 0)
  # One chunk of per-leaf factors (`split_per_array`) for 40 leaves: its cuts
  # are a reduction per chunk, not per leaf.
  monkeypatch.setattr(_parts, "_chunk_width", lambda n: 64)

  def tree(n):
    return {f"l{i:02d}": jnp.ones((4, 3)) for i in range(n)}

  def programs(n):
    tx = make()
    lowered = jax.jit(tx.update).lower(tree(n), tx.init(tree(n)), tree(n))
    return lowered.as_text(), lowered.compile().as_text()

  # Branches counted in the compiled program.
  (small, small_hlo), (large, large_hlo) = programs(5), programs(40)
  branches = small_hlo.count(" conditional(")
  assert large_hlo.count(" conditional(") == branches <= 2 * (norm_implementation == "cond")
  # Reductions grow with the leaves (each leaf must be read), by a bounded number per
  # leaf: at most 3 sums (multiscale) for each of AGC's two arrays.
  per_leaf = (large.count("stablehlo.reduce") - small.count("stablehlo.reduce")) / 35
  if norm_implementation == "cond":
    assert per_leaf == (unpacked if packed and _forms.for_trace().packed else sums)
  else:
    assert per_leaf <= 6, per_leaf  # (the GPU form reduces small leaves together)


def test_clip_by_value_copies_each_small_leaf_into_one_block(norm_implementation):
  """Its norm, maxima and clipped sums read one traced copy of the small leaves (CPU path).

  Three copies, which XLA merges only after tracing, lowering and a few of its
  passes, cost about 1 s of compile time on 2000 leaves (`_shaping.Blocks`). A
  copy is a reshape of the leaf into a row of the block.
  """
  if norm_implementation != "cond" or not _forms.for_trace().packed:
    pytest.skip("blocks are the CPU path's plain sums")

  def reshapes(tree):
    tx = clipjax.clip_by_value(0.1)
    return jax.jit(tx.update).lower(tree, tx.init(tree), tree).as_text().count("stablehlo.reshape")

  def tree(n, dtype=jnp.float32):
    return {f"l{i:02d}": jnp.ones((4, 3), dtype) for i in range(n)}

  assert reshapes(tree(40)) - reshapes(tree(5)) == 35
  # bfloat16 leaves too: their rows are float32 for the norm, and for the
  # maxima (exact: float32 holds every bfloat16 value).
  assert reshapes(tree(40, jnp.bfloat16)) - reshapes(tree(5, jnp.bfloat16)) == 35


@pytest.mark.parametrize("group_elements", [None, 16, 0])
def test_units_of_every_size_and_magnitude_get_their_own_norms(group_elements, monkeypatch):
  """The rescue branch reduces the units of one size together (rows of one matrix).

  Units of a size come from leaves far apart in the tree (the norms must return to
  their order), from a kernel's columns (reduced over its first axis) and from a
  conv kernel; some overflow |g|^2 in float32, some underflow it, some are normal.
  With a smaller bound on a group's size, groups are split and leaves above it
  are reduced alone. Leaves with no units, or with empty ones, are passed through.
  """
  if group_elements is not None:
    monkeypatch.setattr(_packing, "_GROUP_ELEMENTS", group_elements)
  rng = np.random.default_rng(11)

  def normal(*shape):
    return rng.normal(size=shape)

  k1 = normal(3, 4)
  k1[:, 2] *= 1e30  # a column whose squares overflow
  k1[:, 0] *= 1e-30  # and one whose squares underflow
  conv = normal(2, 2, 3, 4)
  conv[..., 1] *= 1e-35
  grads = {
      "a_k1": k1,  # 4 units of 3
      "b_bias": normal(4) * 1e25,  # 1 unit of 4
      "c_k2": normal(5, 4),  # 4 units of 5
      "d_conv": conv,  # 4 units of 12
      "e_bias": normal(3) * 1e-33,  # 1 unit of 3, after the others
      "f_k3": normal(3, 3, 2) * 1e20,  # units of 3 (axis 0) over a 3-D kernel
      "g_none": normal(3, 0),  # no units: the branch once failed to trace (IndexError)
      "h_empty": normal(0, 4),  # 4 empty units
  }
  params = {k: normal(*v.shape) for k, v in grads.items()}
  g32 = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
  p32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  tx = clipjax.adaptive_grad_clip(0.5)
  got, _ = jax.jit(tx.update)(g32, tx.init(p32), p32)
  g64 = [np.asarray(v, np.float64) for v in g32.values()]
  p64 = [np.asarray(v, np.float64) for v in p32.values()]
  for k, expected in zip(g32, ref.adaptive_grad_clip(g64, p64, 0.5)):
    np.testing.assert_allclose(np.asarray(got[k], np.float64), expected, rtol=3e-6, err_msg=k)


@pytest.mark.parametrize(
    "pack_elements, group_elements", [(None, None), (None, 16), (8, None), (0, None)]
)
def test_packed_plain_sums_give_every_unit_its_own_norm(pack_elements, group_elements, monkeypatch):
  """On CPU the plain sums of small leaves are reduced as one block per kind of unit.

  Small leaves of one unit size, far apart in the tree, of three float dtypes
  and of every magnitude (squares that overflow float32, or underflow it, zero)
  share a group; larger leaves stay alone between them, so the norms must return
  to their order. With a smaller bound on a leaf (8) or on a group (16 entries),
  some leaves are reduced alone and groups are split; 0 turns packing off.
  AGC's kernels are packed where their units are rows (reduced over trailing
  axes) or the [a, :, b] of an (A, R, B) block (reduced over adjacent axes),
  reduced one by one otherwise (and, in the rescue branch, transposed).
  """
  if pack_elements is not None:
    monkeypatch.setattr(_packing, "_PACK_LEAF_ELEMENTS", pack_elements)
    monkeypatch.setattr(_packing, "_PACK_COLUMN_ELEMENTS", pack_elements)
  if group_elements is not None:
    monkeypatch.setattr(_packing, "_GROUP_ELEMENTS", group_elements)
  rng = np.random.default_rng(5)

  def normal(shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)

  grads = {
      "a": normal((2, 3)),
      "b_big": normal((5, 6)),  # 30 entries: alone below a bound of 8
      "c": normal((6,), 1e25),  # squares overflow float32
      "d": normal((3, 2), dtype=jnp.bfloat16),
      "e": jnp.zeros((2, 3)),
      "f": normal((6,), 1e-30),  # squares underflow float32
      "g_big": normal((4, 6), 1e-20),
      "h": normal((2, 3), dtype=jnp.float16),
      "i_empty": jnp.zeros((0, 6)),
      "j": normal((1, 6), 1e20),
  }
  f64 = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  norms = jax.jit(clipjax.leaf_norms)(grads)
  for k, x in f64.items():
    np.testing.assert_allclose(float(norms[k]), np.linalg.norm(x.ravel()), rtol=1e-6, err_msg=k)
  total = float(jax.jit(clipjax.global_norm)(grads))
  np.testing.assert_allclose(total, ref.global_norm(list(f64.values())), rtol=1e-6)
  # Every sum in range: no rescue, the plain sums alone go back to their order.
  calm = {k: grads[k] for k in ("a", "b_big", "d", "h", "j")}
  calm["j"] = calm["j"] * 1e-20
  norms = jax.jit(clipjax.leaf_norms)(calm)
  for k, x in calm.items():
    want = np.linalg.norm(np.asarray(x, np.float64).ravel())
    np.testing.assert_allclose(float(norms[k]), want, rtol=1e-6, err_msg=k)

  # AGC's units: over adjacent axes (trailing, leading or a middle one) they
  # are packed; over axes 0 and 2, each kernel is reduced on its own.
  kernels = {
      "k1": normal((2, 3, 4)),
      "k2_big": normal((5, 3, 4)),
      "k3": normal((2, 3, 4), 1e25),
      "k4": normal((2, 3, 4), 1e-30),
      "k5": jnp.zeros((2, 3, 4)),
      "k6": normal((2, 3, 4), dtype=jnp.bfloat16),
  }
  params = {k: normal(v.shape) for k, v in kernels.items()}
  for axis, units in [
      (None, (0,)),
      (2, (2,)),
      ((1, 2), (1, 2)),
      ((0, 1), (0, 1)),
      (1, (1,)),
      ((0, 2), (0, 2)),
  ]:
    tx = clipjax.adaptive_grad_clip(0.5, axis=axis)
    got, _ = jax.jit(tx.update)(kernels, tx.init(params), params)
    wants = ref.adaptive_grad_clip(kernels.values(), params.values(), 0.5, axis=units)
    for (k, g), want in zip(kernels.items(), wants):
      out = np.asarray(got[k], np.float64)
      rtol = 3e-6 if g.dtype == jnp.float32 else 8e-3  # (the bfloat16 output is rounded)
      np.testing.assert_allclose(out, want, rtol=rtol, atol=1e-37, err_msg=f"{k} {axis}")


# A leaf that is a constant in the compiled program: the gradient of a frozen
# (stop_gradient) or unused parameter is a broadcast zero, which XLA folds. The
# rescue branch once gave such a leaf a NaN norm (XLA rewrote sum((0 * 2^80)^2)
# as 0 * (2^80)^2 = 0 * inf), so every clipper saw a NaN step.
# (One shape for all three: the programs that take the leaf as an argument are
# then one per clipper, compiled once.)
_CONSTANT_LEAVES = {
    "zero": jnp.zeros((4, 3)),
    "huge": jnp.full((4, 3), 3e20),
    "tiny": jnp.full((4, 3), 1e-30),
}


@pytest.mark.parametrize("const", list(_CONSTANT_LEAVES))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_constant_leaf_gives_what_the_same_leaf_as_an_argument_gives(case, const):
  value = _CONSTANT_LEAVES[const]
  params = {"w": jnp.ones((5, 2)), "c": jnp.ones_like(value)}
  tx = case.build()
  w = jnp.linspace(-3.0, 3.0, 10).reshape(5, 2)

  def as_constant(w):
    grads = {"w": w, "c": value}  # a constant of the traced program
    return tx.update(grads, tx.init(params), params, **case.extra_args(grads))

  def as_argument(w, c):
    grads = {"w": w, "c": c}
    return tx.update(grads, tx.init(params), params, **case.extra_args(grads))

  got = jax.jit(as_constant)(w)
  want = jax.jit(as_argument)(w, value)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.floating):
      # XLA folds the constant leaf's sum at compile time, in an order that can
      # differ from the device's reduction by an ulp or two (seen on a GPU).
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    else:
      np.testing.assert_array_equal(a, b)
  assert np.isfinite(float(clipjax.clip_stats(got[1])["pre_clip_norm"]))


def test_frozen_parameter_gradient_is_a_zero_not_a_nan():
  params = {"emb": jnp.ones((4, 3)), "w": jnp.full((3,), 0.5)}

  def loss(p):
    return jnp.sum((jax.lax.stop_gradient(p["emb"]) @ p["w"]) ** 2)

  tx = clipjax.clip_by_global_norm(1.0)
  step = jax.jit(lambda p: tx.update(jax.grad(loss)(p), tx.init(p)))
  updates, state = step(params)
  np.testing.assert_array_equal(updates["emb"], 0.0)
  assert np.isfinite(float(state.pre_clip_norm)) and float(state.pre_clip_norm) > 1.0
