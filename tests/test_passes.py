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
import pytest

import clipjax
from tests.clippers import CASES

# Reads of each gradient leaf by the clipper alone, on CPU: its reductions and the
# scaling (which XLA fuses into the optimizer's loops when one follows).
# clip_by_value's three sums (norm, max-abs, post-clip norm) are siblings that
# XLA's GPU backend fuses into one read, but its CPU backend does not; ord=p
# other than 1, 2 and inf reads once for the max-abs and once for the sum.
EXPECTED_READS = {
    "value": 4,
    "norm": 2,
    "norm_l1": 2,
    "global_norm": 2,
    "global_norm_l1": 2,
    "global_norm_inf": 2,
    "global_norm_p3": 3,
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
  entry = hlo[hlo.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  params = [
      (name, int(i)) for name, i in re.findall(r"(%[^\s=]+) = \S+ parameter\((\d+)\)", entry)
  ]
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
  counts = reads_per_leaf(
      lambda g, s: tx.update(g, s, _PARAMS), grads, tx.init(_PARAMS), leaves=len(_PARAMS)
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
