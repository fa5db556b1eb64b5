"""Sharded clipping, in a subprocess with 8 fake CPU devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sharded_and_shard_map_results_equal_unsharded():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_check.py")], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "SHARDING OK" in out.stdout
