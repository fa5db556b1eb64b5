"""clip_stats finds every clipper's state in nested optimizer states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import clipjax


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
