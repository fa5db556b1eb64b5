"""How many times each clipper's compiled update reads each gradient leaf.

The count is taken in the optimized HLO (the CPU's, where the suite runs) of
``jit(update)``: for every gradient leaf, the operations of the entry
computation that take it as an operand. The operand tuple of the rescue branch
(`lax.cond`) is not a read: the branch runs only when some sum overflowed or
underflowed. The documented numbers are the table "Reads of the gradients" in
docs/design.md; a change that adds a pass over the gradients fails here.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from clipjax import _forms, _numerics
from clipjax._numerics import sums as _sums
from clipjax._shaping import arrays as _arrays
from clipjax._shaping import packing as _packing
from clipjax._shaping import parts as _parts
from tests import reference as ref
from tests.clippers import CASES, SEQUENCES, Case
from tests.conftest import cpu_hlo, gradient_reads, reads_per_leaf

# The fusions of the compiled HLO as XLA's default CPU compile gives them (see conftest.py).
pytestmark = pytest.mark.xla_default_cpu_codegen

# Reads of each gradient leaf by the clipper alone, on CPU: its reductions and the
# scaling (which XLA fuses into the optimizer's loops when one follows).
# clip_by_value reads for its norm and its max-abs (siblings that XLA's GPU
# backend fuses into one read, its CPU backend does not) and clips, summing the
# post-clip norm in the same loop; ord=p other than 1, 2 and inf reads once for
# the max-abs and once for the sum.
EXPECTED_READS = {
    "value": 3,
    "norm": 2,
    "norm_l1": 2,
    "global_norm": 2,
    "global_norm_l1": 2,
    "global_norm_inf": 2,
    "global_norm_p3": 3,
    "given_norm": 1,
    "group_norm": 2,
    "block_rms": 2,
    "agc": 2,
    "autoclip": 2,
    "zclip": 2,
    "adagc": 2,
}

# XLA's CPU backend sums clip_by_value's post-clip norm of a small leaf reduced
# on its own (the 16-entry bias below, the only leaf of its size) in the scalar
# fusion that uses it, recomputing the clip from the gradient there: one more
# read, of 16 entries. A large leaf's sum is fused into the loop that clips it.
_SMALL_LEAF_EXTRA_READS = {"value": 1}

_PARAMS = {"w": jnp.ones((64, 32)), "v": jnp.ones((128, 16)), "b": jnp.ones((16,))}


def test_every_case_has_a_documented_count():
  assert set(EXPECTED_READS) == {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_clipper_reads_each_gradient_leaf_as_documented(case):
  tx = case.build()
  grads = jax.tree.map(lambda x: 0.5 * x, _PARAMS)
  # Extra keywords (clip_by_given_norm's norm) are arguments: computed elsewhere.
  counts = reads_per_leaf(
      lambda g, s, e: tx.update(g, s, _PARAMS, **e),
      grads,
      tx.init(_PARAMS),
      case.extra_args(grads),
      leaves=len(_PARAMS),
  )
  assert len(counts) == len(_PARAMS)
  for name, ops in counts.items():
    extra = _SMALL_LEAF_EXTRA_READS.get(case.name, 0) if "__b__" in name else 0
    assert 0 < gradient_reads(ops) <= EXPECTED_READS[case.name] + extra, (case.name, name, ops)
    # At most the one branch's operand tuple: a rescue is never per leaf.
    assert ops.get("tuple", 0) <= 1, (case.name, name, ops)


def test_the_count_sees_an_extra_pass():
  """The counter is not blind: a second reduction over the gradients is counted."""
  tx = clipjax.clip_by_global_norm(1.0)

  def with_extra_pass(g, s):
    out, s = tx.update(g, s)
    # One more read of every leaf (a reduction XLA cannot share with the norm's).
    return out, s, jax.tree.map(lambda x: jnp.sum(jnp.sin(x)), g)

  grads = jax.tree.map(lambda x: 0.5 * x, _PARAMS)
  base = reads_per_leaf(lambda g, s: tx.update(g, s), grads, tx.init(_PARAMS), leaves=3)
  more = reads_per_leaf(with_extra_pass, grads, tx.init(_PARAMS), leaves=3)
  for name in base:
    assert gradient_reads(more[name]) == gradient_reads(base[name]) + 1, (base[name], more[name])


# clip_by_value's edge inputs, for the forms' test below.
_VALUE_INPUTS = {
    "ordinary": {"a": jnp.array([3.0, -0.2, 0.7]), "b": jnp.ones((2, 3)) * 0.1},
    "nothing clipped": {"a": jnp.array([0.3, -0.2]), "b": jnp.zeros((4,))},
    "huge": {"a": jnp.array([3e38, -3e38, 1.0]), "b": jnp.array([1e-30])},
    "nan": {"a": jnp.array([jnp.nan, 2.0]), "b": jnp.array([0.1])},
    "inf": {"a": jnp.array([jnp.inf, 0.1]), "b": jnp.array([-2.0])},
    "bf16": {
        "a": jnp.array([3.0, -0.2, 0.501], jnp.bfloat16),
        "b": jnp.array([0.7, -9.0], jnp.float16),
    },
    "empty leaf": {"a": jnp.zeros((0,)), "b": jnp.array([2.0, -0.1])},
}

# Every form traces the same values: `_forms.PLAIN` is the reference program,
# the CPU's packs sums and chunks factors and sums clip_by_value's output,
# the accelerators' sum siblings and select spam's reset. Each clipper of the
# catalogue runs under each form (each in a fresh jit, so traced anew) on a tree of
# 40 small leaves of two shapes and two dtypes, where the CPU forms pack and
# chunk; the forms sum in different orders.
FORMS = dict(_forms.NAMED)


def _forms_tree(seed: int = 3) -> dict:
  rng = np.random.default_rng(seed)
  return {
      f"l{i:02d}": jnp.asarray(
          rng.normal(size=(4, 3) if i % 3 else (2, 6)) * 10.0 ** rng.integers(-2, 3),
          jnp.bfloat16 if i % 7 == 0 else jnp.float32,
      )
      for i in range(40)
  }


def _under(forms, fn, *args):
  """jit(fn)(*args) traced under `forms`, and its lowered text."""
  with _forms.use(forms):
    jitted = jax.jit(lambda *a: fn(*a))
    return jitted(*args), jitted.lower(*args).as_text()


def _assert_same_values(got, want, what):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jnp.issubdtype(x.dtype, jnp.floating):
      rtol = 1e-5 if x.dtype == jnp.float32 else 1e-2
      np.testing.assert_allclose(
          np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, err_msg=what
      )
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


@pytest.mark.parametrize("case", CASES + SEQUENCES, ids=lambda c: c.name)
def test_every_form_gives_the_plain_forms_values(case):
  grads = _forms_tree()
  tx = case.build()

  def step(g, s):
    return tx.update(g, s, g, **case.extra_args(g))

  state = tx.init(grads)
  plain, plain_text = _under(_forms.PLAIN, step, grads, state)
  texts = {}
  for name, forms in FORMS.items():
    out, texts[name] = _under(forms, step, grads, state)
    _assert_same_values(out, plain, f"{case.name} under {name}")
  # The default (what this machine picks) is one of them, not a form of its own.
  assert _forms.for_trace() in FORMS.values()
  if case.name in PACKED_ON_CPU:  # the forms were really traced: the programs differ
    assert texts["cpu"] != plain_text, case.name


def _gpu_shapes_tree(seed: int = 5) -> dict:
  """Leaves on which the GPU forms take their other paths: units that keep few entries
  (folded columns), an array longer than a row (as_rows), and more small
  arrays than one join takes."""
  rng = np.random.default_rng(seed)
  shapes = [(2048, 8), (3, 5, 96), (1, 40000), (70000,)] + [(7,)] * 70
  return {
      f"l{i:02d}": jnp.asarray(rng.normal(size=s) * 10.0 ** (i % 5 - 2), jnp.float32)
      for i, s in enumerate(shapes)
  }


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipjax.adaptive_grad_clip(0.01),
        lambda: clipjax.adaptive_grad_clip(0.01, axis=(0, 1)),
        lambda: clipjax.clip_by_value(0.05),
        lambda: clipjax.clip_by_global_norm(1.0),
        lambda: clipjax.clip_by_norm(1.0),
    ],
    ids=["agc", "agc_two_axes", "value", "global_norm", "norm"],
)
def test_gpu_forms_give_the_plain_forms_values_on_their_own_paths(make):
  grads = _gpu_shapes_tree()
  params = _gpu_shapes_tree(6)
  tx = make()
  plain, _ = _under(_forms.PLAIN, tx.update, grads, tx.init(grads), params)
  gpu, _ = _under(_forms.GPU, tx.update, grads, tx.init(grads), params)
  _assert_same_values(gpu, plain, "gpu")


def test_the_gpu_shaping_helpers_equal_their_plain_expressions():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 8)), jnp.float32)
  square = jnp.square
  np.testing.assert_allclose(
      _arrays.leading_sum(x, 0, square, True), jnp.sum(square(x), 0, keepdims=True), rtol=1e-5
  )
  y = jnp.reshape(x, (4, 512, 8))
  np.testing.assert_allclose(
      _arrays.leading_sum(y, (0, 1), square, True),
      jnp.sum(square(y), (0, 1), keepdims=True),
      rtol=1e-5,
  )
  z = jnp.arange(70000.0)
  rows = _arrays.as_rows(z)
  assert rows.shape[1] <= 2**14 and rows.shape[0] * rows.shape[1] == z.size
  np.testing.assert_array_equal(jnp.reshape(rows, (-1,)), z)
  xs = [jnp.zeros((7,))] * 70 + [jnp.zeros((70000,))]
  groups, alone = _packing.join_groups(xs, [None] * 71)
  assert [len(g) for _, g in groups] == [64, 6] and alone == [70]


# Clippers whose CPU form packs the 40 small leaves' sums or spam's reset branch.
PACKED_ON_CPU = {"global_norm", "norm", "value", "block_rms", "agc", "spam"}


@pytest.mark.parametrize("per_layer", [None, "proportional"])
def test_per_example_clip_forms_give_the_plain_forms_values(per_layer):
  """Per-layer factors are handed out chunked on CPU, as slices elsewhere."""
  batch = jax.tree.map(lambda *x: jnp.stack(x), *[_forms_tree(s) for s in range(3)])
  tx = clipjax.per_example_clip(0.5, reduction="sum", per_layer=per_layer)
  plain, plain_text = _under(_forms.PLAIN, tx.update, batch, tx.init(None))
  for name, forms in FORMS.items():
    out, text = _under(forms, tx.update, batch, tx.init(None))
    _assert_same_values(out, plain, name)
    if name == "cpu":
      assert text != plain_text


@pytest.mark.parametrize("max_delta", [0.5, 0.0])
@pytest.mark.parametrize("name", list(_VALUE_INPUTS))
def test_clip_by_value_forms_agree_on_edge_inputs(name, max_delta):
  grads = _VALUE_INPUTS[name]
  tx = clipjax.clip_by_value(max_delta)
  plain, _ = _under(_forms.PLAIN, tx.update, grads, tx.init(grads))
  for forms in (_forms.CPU, _forms.GPU, _forms.TPU):
    out, _ = _under(forms, tx.update, grads, tx.init(grads))
    # The clipped values exactly; the stats to the summation order.
    for x, y in zip(jax.tree.leaves(out[0]), jax.tree.leaves(plain[0])):
      np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))
    for x, y in zip(jax.tree.leaves(out[1]), jax.tree.leaves(plain[1])):
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      np.testing.assert_allclose(x, y, rtol=3e-7, equal_nan=True)


def test_clip_by_value_accelerator_form_is_the_sibling_sum():
  """The accelerator form is really traced: on CPU its sibling sum is a read of its own."""
  tx = clipjax.clip_by_value(0.5)
  with _forms.use(_forms.TPU):
    counts = reads_per_leaf(lambda g, s: tx.update(g, s), _PARAMS, tx.init(_PARAMS), leaves=3)
  assert all(gradient_reads(ops) == 4 for ops in counts.values()), counts


# Every clipper whose norms have a rescue branch (ord 1 or 2, not a given norm), with
# a float64 reference for the test's four-leaf tree (keys bias, conv, dense, heads).
_RESCUED = {c.name: c for c in CASES if c.rescue}
_RESCUED["group_norm"] = dataclasses.replace(
    _RESCUED["group_norm"],
    reference=lambda g, p: ref.clip_by_group_norm(g, 0.8, [True, False, True, False]),
)
_RESCUED["skip_spikes"] = Case(
    "skip_spikes",
    lambda **kw: clipjax.skip_spikes(optax.sgd(0.1), use_loss=False),
    "none",
    0.0,
    lambda g, p: [-0.1 * x for x in g],
)
_RESCUED["per_example"] = Case(
    "per_example",
    clipjax.per_example_clip,
    "l2_norm_clip",
    1.0,
    lambda g, p: ref.per_example_clip(g, 1.0)[0],
    {"reduction": "sum"},
)


@pytest.mark.parametrize("name", list(_RESCUED))
def test_a_zero_or_tiny_leaf_beside_normal_ones_does_not_run_the_rescue(monkeypatch, name):
  """A frozen parameter's zero gradient must not cost a second read on every step.

  The rescue branch is replaced by one that returns NaN norms, so a step that
  runs it shows NaN; the updates are otherwise those of the float64 definition
  (and the property tests compare the default norms with the exact multiscale
  ones). The same program runs the branch when the whole tree is tiny. (A host
  callback would show it too, but a program holding one is not kept by the
  persistent compile cache.)
  """
  case = _RESCUED[name]
  rescued = _sums._rescued_norms

  def poisoned(*args):
    r, e = rescued(*args)
    return _numerics.Split(r * jnp.nan, e)

  monkeypatch.setattr(_sums, "_rescued_norms", poisoned)
  rng = np.random.default_rng(0)
  grads = {  # (4, 3) each: per_example takes the 4 as its batch
      "bias": jnp.zeros((4, 3)),  # a frozen parameter's gradient
      "conv": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
      "dense": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
      "heads": jnp.full((4, 3), 2e-38),  # |g| and |g|^2 underflow a float32 sum
  }
  params = jax.tree.map(lambda x: jnp.ones_like(x) if case.name != "agc" else x + 1.0, grads)
  if case.name == "per_example":  # one example's shape
    params = jax.tree.map(lambda x: x[0], params)
  tx = case.build()
  step = jax.jit(lambda g: tx.update(g, tx.init(params), params, **case.extra_args(g)))

  def f64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]

  updates, state = step(grads)
  for got, want in zip(f64(updates), case.reference(f64(grads), f64(params))):
    # (atol: the tiny leaf's scaled entries are float32 subnormals, flushed to 0.)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-37)
  stats = clipjax.clip_stats(state)
  assert not any(np.isnan(x).any() for x in f64(stats))  # (thresholds may be inf)
  norm = stats.get("pre_clip_norm", stats.get("grad_norm"))
  if norm is not None:  # the global norm, ord 1 for the _l1 cases
    flat = np.concatenate([x.ravel() for x in f64(grads)])
    want = np.sum(np.abs(flat)) if name.endswith("_l1") else np.linalg.norm(flat)
    np.testing.assert_allclose(float(norm), want, rtol=1e-6)
  tiny = step(jax.tree.map(lambda x: x * 0 + 2e-38, grads))
  assert any(np.isnan(x).any() for x in f64(tiny)), "the rescue branch did not run"


def _case_hlo(case: Case, grads) -> str:
  """The CPU-compiled update of `case`'s clipper for `grads` (also its parameters)."""
  tx = case.build()
  return cpu_hlo(lambda g, s: tx.update(g, s, g, **case.extra_args(g)), grads, tx.init(grads))


def _distinct_fusions(hlo: str) -> int:
  """Distinct fused computations in the HLO text `hlo`, names and metadata aside."""
  bodies = set()
  for comp in re.split(r"\n(?=%)", hlo):
    head, _, body = comp.partition("\n")
    if "fused_computation" not in head and "wrapped_" not in head:
      continue
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    bodies.add(re.sub(r"%[\w.\-]+", "%", body))
  return len(bodies)


def _case_fusions(case: Case, leaves: int) -> int:
  return _distinct_fusions(_case_hlo(case, {f"l{i:02d}": jnp.ones((16, 8)) for i in range(leaves)}))


def _per_layer_fusions(leaves: int) -> int:
  g = {f"l{i:02d}": jnp.ones((4, 16)) for i in range(leaves)}  # 4 examples
  tx = clipjax.per_example_clip(1.0, per_layer="proportional", reduction="sum")
  return _distinct_fusions(cpu_hlo(lambda g, s: tx.update(g, s), g, tx.init(g)))


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.per_leaf_factors],
    ids=lambda c: c.name,
)
def test_leaves_of_one_shape_share_their_compiled_loops(case, monkeypatch):
  """On CPU, leaves of one shape share their scaling loops, whatever their number.

  A slice of the factor vector fused into each leaf's loop made every loop (and
  the optimizer's loops it fuses into) a kernel of its own, compiled once per
  leaf: 14 to 29 more distinct kernels for 16 more leaves here, and clip_by_norm
  + Adam at 2000 leaves compiled 2.6x longer than optax's global-norm clip +
  Adam (benchmarks/RESULTS.md). Now the factors come in chunks, each a buffer
  of its own (4 leaves' here), and a leaf reads its chunk at its position in
  it: the loops of leaves at one position in their chunks are one kernel.
  8 and 24 leaves are 2 and 6 chunks, 4 positions each; the whole-tree
  computations may split into one kernel more or fewer.
  """
  monkeypatch.setattr(_parts, "_chunk_width", lambda n: 4)
  assert _case_fusions(case, 24) <= _case_fusions(case, 8) + 1


def test_per_layer_per_example_clipping_shares_its_compiled_loops_too(monkeypatch):
  """The per-layer budgets' factors reach each leaf in chunks too (CPU; of 4 here).

  Read as slices, 19 more distinct kernels for 16 more leaves. The margin is the
  whole tree's: XLA's CPU backend splits a long reduction (here over 96 units,
  not 32) into a reduce-window and a reduce, and the 8 leaves' sums are fused
  into fewer kernels.
  """
  monkeypatch.setattr(_parts, "_chunk_width", lambda n: 4)
  assert _per_layer_fusions(24) <= _per_layer_fusions(8) + 3


@pytest.mark.parametrize("leaves", [3, 8, 21, 26])
@pytest.mark.parametrize(
    "shapes", [[(3, 2)], [(3, 2), (2, 3)], [(3, 2), (2, 3), (3, 4)]], ids=["one", "two", "three"]
)
def test_every_leaf_gets_its_own_factors_across_chunks(leaves, shapes, monkeypatch):
  """split_per_array's chunks: of 4 parts here, the last one of each kind partial.

  Each leaf is scaled by its own factor (clip_by_norm, one per leaf) and by its
  own units' (AGC, 2 or 3 per leaf), whatever chunk it falls in: 21 leaves of
  one shape are 5 chunks and 1 part, 26 leaves 6 chunks and 2 parts (a part per
  leaf in the last chunk read 2 entries each once). Leaves of three shapes, in
  turn, are chunked by shape: the chunks of one part size hold the kinds one
  after the other, each padded to whole chunks (AGC's (3, 2) and (3, 4) leaves
  both have 3 units of one entry). 8 leaves of two shapes take every factor
  once, out of order.
  """
  monkeypatch.setattr(_parts, "_chunk_width", lambda n: 4)
  rng = np.random.default_rng(leaves)
  grads = {
      f"l{i:02d}": jnp.asarray(
          rng.normal(size=shapes[i % len(shapes)]) * 10.0 ** rng.integers(-2, 3), jnp.float32
      )
      for i in range(leaves)
  }
  params = jax.tree.map(lambda g: jnp.asarray(rng.normal(size=g.shape), jnp.float32), grads)
  g64 = [np.asarray(g, np.float64) for g in grads.values()]

  tx = clipjax.clip_by_norm(1.0)
  got, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for g, want in zip(jax.tree.leaves(got), ref.clip_by_norm(g64, 1.0)):
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=2e-6)

  tx = clipjax.adaptive_grad_clip(0.5, axis=1)
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  wants = ref.adaptive_grad_clip(g64, jax.tree.leaves(params), 0.5, axis=1)
  for out, want in zip(jax.tree.leaves(got), wants):
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-6)


def _widest_concatenation(hlo: str) -> int:
  """The most operands any concatenate in the HLO text `hlo` has."""
  operands = re.findall(r" concatenate\(([^)]*)\)", hlo)
  return max((len(re.findall(r"%[\w.\-]+", ops)) for ops in operands), default=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_concatenation_in_the_compiled_update_is_wider_than_its_bound(case, monkeypatch):
  """Per-leaf values are concatenated at most _arrays._CONCAT_WIDTH at a time.

  XLA's layout assignment is quadratic in a concatenation's operands: one
  concatenation of every leaf's sums made clip_by_global_norm alone on 4000
  leaves compile in 33 s instead of 13-14 s (CPU), and XLA merges nested
  concatenations back into one unless a barrier separates them. (The bound is
  lowered here, so that a small tree needs several concatenations.)
  """
  monkeypatch.setattr(_arrays, "_CONCAT_WIDTH", 8)
  hlo = _case_hlo(case, {f"l{i:02d}": jnp.ones((2, 3)) for i in range(30)})
  assert 0 < _widest_concatenation(hlo) <= 8
