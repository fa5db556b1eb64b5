"""How many times each clipper's compiled update reads each gradient leaf.

The count is taken in the optimized HLO (the CPU's, where the suite runs) of
``jit(update)``: for every gradient leaf, the operations of the entry
computation that take it as an operand. The operand tuple of the rescue branch
(`lax.cond`) is not a read: the branch runs only when some sum overflowed or
underflowed. The documented numbers are the table "Reads of the gradients" in
docs/design.md; a change that adds a pass over the gradients fails here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from tests.clippers import CASES

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

_PARAMS = {"w": jnp.ones((64, 32)), "v": jnp.ones((128, 16)), "b": jnp.ones((16,))}


def reads_per_leaf(fn, *args, leaves: int) -> dict[str, dict[str, int]]:
  """{parameter: {op: count}} for the first `leaves` parameters of jit(fn)(*args)."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  assert hlo is not None
  entry = hlo[hlo.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  params = [(name, int(i)) for name, i in re.findall(r"(%[^\s=]+) = \S+ parameter\((\d+)\)", entry)]
  out = {}
  for name, index in params:
    if index >= leaves:
      continue
    ops: dict[str, int] = {}
    for line in entry.split("\n"):
      if " parameter(" in line or not re.search(re.escape(name) + r"[,)\s]", line):
        continue
      op = re.search(r"\s([a-z][a-z0-9-]*)\(", line.split("=", 1)[1])
      if op is not None:
        ops[op.group(1)] = ops.get(op.group(1), 0) + 1
    out[name] = ops
  return out


def _reads(ops: dict[str, int]) -> int:
  return sum(n for op, n in ops.items() if op != "tuple")


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
    assert 0 < _reads(ops) <= EXPECTED_READS[case.name], (case.name, name, ops)
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
    assert _reads(more[name]) == _reads(base[name]) + 1, (base[name], more[name])


# clip_by_value computes its post-clip norm in two forms (see _clipping): summed
# over the clipped output on CPU (fused into the loop that writes it), and from
# the gradients as a sibling of the other sums elsewhere. The off-CPU form is
# traced here by making the backend look like a GPU's.
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


@pytest.mark.parametrize("max_delta", [0.5, 0.0])
@pytest.mark.parametrize("name", list(_VALUE_INPUTS))
def test_clip_by_value_forms_agree(monkeypatch, name, max_delta):
  grads = _VALUE_INPUTS[name]
  tx = clipjax.clip_by_value(max_delta)
  cpu = jax.jit(tx.update)(grads, tx.init(grads))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  off_cpu = jax.jit(tx.update)(grads, tx.init(grads))
  for x, y in zip(jax.tree.leaves(cpu), jax.tree.leaves(off_cpu)):
    np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


def test_clip_by_value_off_cpu_form_is_the_sibling_sum(monkeypatch):
  """The form above is really traced: on CPU its sibling sum is a read of its own."""
  tx = clipjax.clip_by_value(0.5)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  counts = reads_per_leaf(lambda g, s: tx.update(g, s), _PARAMS, tx.init(_PARAMS), leaves=3)
  assert all(_reads(ops) == 4 for ops in counts.values()), counts
