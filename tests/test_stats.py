"""clip_stats finds every clipper's state in nested optimizer states."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from tests.conftest import gradient_reads, reads_per_leaf


def test_single_clipper_uses_plain_field_names():
  opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(1e-3))
  g = {"w": jnp.array([3.0, 4.0])}
  _, state = opt.update(g, opt.init(g), g)
  stats = clipjax.clip_stats(state, prefix="clip/")
  assert set(stats) == {f"clip/{f}" for f in clipjax.ClipState._fields}
  assert float(stats["clip/pre_clip_norm"]) == 5.0 and bool(stats["clip/clipped"])
  # optax's own lookup works too: field names are unique within one clipper.
  assert float(optax.tree.get(state, "pre_clip_norm")) == 5.0


def test_several_and_nested_clippers_get_path_prefixes():
  inner = optax.inject_hyperparams(clipjax.clip_by_norm)(max_norm=2.0)
  opt = optax.MultiSteps(
      optax.chain(
          clipjax.clip_by_value(1.0), inner, clipjax.clip_by_global_norm(1.0), optax.sgd(0.1)
      ),
      every_k_schedule=1,
  )
  g = {"w": jnp.array([3.0, 4.0])}
  _, state = jax.jit(opt.update)(g, opt.init(g), g)
  stats = clipjax.clip_stats(state)
  norms = {k: float(v) for k, v in stats.items() if k.endswith("pre_clip_norm")}
  assert len(norms) == 3
  assert norms["inner_opt_state/0/pre_clip_norm"] == 5.0
  assert abs(norms["inner_opt_state/1/inner_state/pre_clip_norm"] - 2**0.5) < 1e-6
  assert all(int(v) == 1 for k, v in stats.items() if k.endswith("num_steps"))


def test_state_without_clippers_gives_empty_dict():
  assert clipjax.clip_stats(optax.adam(1e-3).init({"w": jnp.ones(2)})) == {}


def test_api_reference_lists_every_public_name():
  import pathlib

  api = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
  missing = [n for n in clipjax.__all__ if f"clipjax.{n}\n" not in api]
  assert not missing, f"docs/api.md lacks {missing}"


# --------------------------------------------------------------- per-leaf norms


@pytest.mark.parametrize("ord_", [1.0, 2.0, 3.0, np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_record_leaf_norms_matches_numpy_and_passes_updates_through(ord_, dtype):
  rng = np.random.default_rng(0)
  g = {
      "rnn": {"W": jnp.asarray(rng.normal(size=(4, 3)) * 100, dtype), "b": jnp.zeros(3, dtype)},
      "head": jnp.asarray(rng.normal(size=(5,)), dtype),
  }
  tx = clipjax.record_leaf_norms(ord_)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out, g))
  recorded = optax.tree.get(state, "leaf_norms").as_dict()
  assert list(recorded) == ["head", "rnn/W", "rnn/b"]
  for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
    expected = np.linalg.norm(np.asarray(x, np.float64).ravel(), ord=ord_)
    got = recorded["/".join(k.key for k in path)]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_leaf_norms_before_and_after_a_clipper_are_the_pre_and_post_clip_norms():
  g = {"rnn": {"W": jnp.array([3.0, 4.0]), "U": jnp.array([0.0, 12.0])}}
  opt = clipjax.chain(
      clipjax.record_leaf_norms(),
      clipjax.clip_by_global_norm(1.0),
      clipjax.record_leaf_norms(),
      optax.sgd(0.1),
  )
  _, state = jax.jit(opt.update)(g, opt.init(g), g)
  stats = {k: float(v) for k, v in clipjax.clip_stats(state).items()}
  assert stats["0/leaf_norms/rnn/W"] == 5.0 and stats["0/leaf_norms/rnn/U"] == 12.0
  np.testing.assert_allclose(stats["2/leaf_norms/rnn/W"], 5 / 13, rtol=1e-6)
  np.testing.assert_allclose(stats["2/leaf_norms/rnn/U"], 12 / 13, rtol=1e-6)
  assert stats["1/pre_clip_norm"] == 13.0


@pytest.mark.xla_default_cpu_codegen
def test_recording_before_a_clipper_adds_no_read_of_the_gradients():
  """The recorder's per-leaf sums are the clipper's own in the compiled step.

  (Each has its own rescue branch: the recorder's norms are exact per leaf, the
  clipper's only as the global norm needs; a branch runs only when its sums
  leave the float range.)
  """
  g = {f"l{i}": jnp.ones((64, 64)) for i in range(6)}

  def reads(tx):
    counts = reads_per_leaf(lambda g, s: tx.update(g, s), g, tx.init(g), leaves=len(g))
    return sorted(gradient_reads(ops) for ops in counts.values())

  clip = reads(clipjax.clip_by_global_norm(1.0))
  both = reads(optax.chain(clipjax.record_leaf_norms(), clipjax.clip_by_global_norm(1.0)))
  assert both == clip == [2] * len(g)  # the sum and the scaling


def test_record_leaf_norms_rejects_bad_arguments_and_foreign_states():
  with pytest.raises(ValueError, match="ord"):
    clipjax.record_leaf_norms(0.5)
  g = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="record_leaf_norms"):
    clipjax.record_leaf_norms().update(g, clipjax.clip_by_norm(1.0).init(g))
  with pytest.raises(ValueError, match="per-leaf statistics are for the leaves"):
    clipjax.record_leaf_norms().update(
        {"w": g["w"], "b": g["w"]}, clipjax.record_leaf_norms().init(g)
    )


class _UserStats(NamedTuple):
  """A user's stats state: a scalar, a tree of per-leaf scalars and a PerLeaf vector."""

  steps: jax.Array
  tree_norms: dict
  vector_norms: clipjax.PerLeaf


clipjax.register_stats_type(_UserStats, per_leaf=("tree_norms",))


def test_register_stats_type_names_tree_and_vector_per_leaf_fields_by_path():
  g = {"enc": {"w": jnp.ones(2)}, "head": jnp.ones(1)}
  state = _UserStats(
      steps=jnp.int32(3),
      tree_norms={"enc": {"w": jnp.float32(1.5)}, "head": jnp.float32(2.5)},
      vector_norms=clipjax.PerLeaf(jnp.array([4.0, 5.0]), ("enc/w", "head")),
  )
  assert clipjax.PerLeaf.zeros(g).paths == ("enc/w", "head")
  stats = {k: float(v) for k, v in clipjax.clip_stats((state, optax.EmptyState())).items()}
  assert stats == {
      "steps": 3.0,
      "tree_norms/enc/w": 1.5,
      "tree_norms/head": 2.5,
      "vector_norms/enc/w": 4.0,
      "vector_norms/head": 5.0,
  }


def test_a_key_with_a_slash_beside_a_nested_path_is_refused_not_merged():
  """Two leaves named 'a/b' would be one statistic: refused in one line, at init."""
  g = {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}}
  for make in (clipjax.record_leaf_norms, lambda: clipjax.adagc(1.0)):
    with pytest.raises(ValueError, match=r"both named 'a/b'.*rename one of the keys") as e:
      make().init(g)
    assert "\n" not in str(e.value)
  # A user's per-leaf field is checked where clip_stats names it.
  state = _UserStats(
      steps=jnp.int32(0),
      tree_norms={"a/b": jnp.float32(1.0), "a": {"b": jnp.float32(2.0)}},
      vector_norms=clipjax.PerLeaf(jnp.array([1.0, 2.0]), ("x", "x")),
  )
  with pytest.raises(ValueError, match="both named 'a/b'"):
    clipjax.clip_stats(state)
  with pytest.raises(ValueError, match="both named 'x'"):
    clipjax.clip_stats(state._replace(tree_norms={}))
  # Haiku-style keys with '/' and no nested twin keep their names.
  ok = {"mlp/~/linear_0": {"w": jnp.ones(2)}, "head": jnp.ones(1)}
  assert clipjax.PerLeaf.zeros(ok).paths == ("head", "mlp/~/linear_0/w")
