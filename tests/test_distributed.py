"""Every transform of the catalogue sharded over 8 fake CPU devices, and over two processes.

Each check runs in a process of its own (the device count is fixed when jax
starts): tests/distributed_check.py for jit on Auto and Explicit meshes and
shard_map with check_vma on and off, tests/multiprocess_check.py for two local
jax.distributed processes of 4 devices each.
"""

from __future__ import annotations

import os
import pathlib
import socket
import sys

import pytest

from tests.conftest import run_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
LIMIT_S = 600


def _outputs(scripts: list[list[str]], what: str) -> list[str]:
  """Runs the scripts at once (`run_processes`: killed with their children past
  the limit); each must exit 0. Their stdout and stderr, one string each."""
  cmds = [[sys.executable, *args] for args in scripts]
  done = run_processes(cmds, limit=LIMIT_S, what=what, env=ENV)
  for d in done:
    assert d.returncode == 0, (d.stdout + d.stderr)[-4000:]
  return [d.stdout + d.stderr for d in done]


@pytest.mark.slow
@pytest.mark.parametrize(
    "group",
    ["jit", "shard_map", "dp", "jit gpu", "shard_map gpu"],
    ids=lambda g: g.replace(" ", "-"),
)
def test_every_transform_sharded_equals_the_float64_reference(group):
  """Each group of distributed_check.py; 'gpu': traced under the GPU's forms."""
  (out,) = _outputs([[str(ROOT / "tests" / "distributed_check.py"), *group.split()]], group)
  results = [ln.split() for ln in out.splitlines() if ln.startswith("RESULT ")]
  done = [ln for ln in out.splitlines() if ln.startswith("DISTRIBUTED OK")]
  assert done and int(done[0].split()[-1]) == len(results) > 0, out[-3000:]
  assert all(float(r[3]) <= 2e-6 for r in results), results
  if not group.startswith("jit"):
    assert "REFUSALS OK" in out


@pytest.mark.slow
def test_two_processes_agree_with_the_float64_reference():
  with socket.socket() as sock:  # a free port for the coordinator
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  script = str(ROOT / "tests" / "multiprocess_check.py")
  outs = _outputs([[script, str(port), str(i)] for i in range(2)], "the two processes")
  for i, out in enumerate(outs):
    assert f"MULTIPROCESS OK {i}" in out, out[-3000:]
    assert sum(ln.startswith("RESULT ") for ln in out.splitlines()) == 4, out[-3000:]
