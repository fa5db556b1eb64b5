"""Sharded clipping, in a subprocess with 8 fake CPU devices."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

from tests.conftest import run_process

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["cond", "--layouts"], ["multiscale"], ["gpu"]], ids=["cond", "multiscale", "gpu"]
)
def test_sharded_and_shard_map_results_equal_unsharded(args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  out = run_process(
      [sys.executable, str(ROOT / "tests" / "sharding_check.py"), *args],
      limit=600,
      what="sharding_check.py",
      env=env,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "SHARDING OK" in out.stdout


def test_docs_shard_map_example_shows_per_shard_vs_global_clipping():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  out = run_process(
      [sys.executable, str(ROOT / "docs" / "examples" / "shard_map_clipping.py")],
      limit=300,
      what="docs/examples/shard_map_clipping.py",
      env=env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(ln.split(":", 1) for ln in out.stdout.splitlines())
  norm = float(lines["global norm of the gradients"])
  assert norm > 10
  assert f"pre-clip norm {norm:.4f}, update norm 1.0000" in lines["jit, sharded arrays"]
  assert "update norm 2.8284" in lines["shard_map, optax"]  # sqrt(8) shards of norm 1
  assert f"pre-clip norm {norm:.4f}, update norm 1.0000" in lines["shard_map, clipjax"]
  mixed = lines["mixed layout, per-leaf axis_name"].split()
  assert mixed[2] == mixed[4].rstrip(")"), mixed
