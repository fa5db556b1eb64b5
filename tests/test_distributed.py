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
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
LIMIT_S = 600


def _run(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(proc: subprocess.Popen, what: str) -> str:
  try:
    out, _ = proc.communicate(timeout=LIMIT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"{what} ran past {LIMIT_S} s; its output ends:\n{out[-3000:]}")
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("group", ["jit", "shard_map", "dp"])
def test_every_transform_sharded_equals_the_float64_reference(group):
  out = _finish(_run([str(ROOT / "tests" / "distributed_check.py"), group]), group)
  results = [ln.split() for ln in out.splitlines() if ln.startswith("RESULT ")]
  done = [ln for ln in out.splitlines() if ln.startswith("DISTRIBUTED OK")]
  assert done and int(done[0].split()[-1]) == len(results) > 0, out[-3000:]
  assert all(float(r[3]) <= 2e-6 for r in results), results
  if group != "jit":
    assert "REFUSALS OK" in out


@pytest.mark.slow
def test_two_processes_agree_with_the_float64_reference():
  with socket.socket() as sock:  # a free port for the coordinator
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  script = str(ROOT / "tests" / "multiprocess_check.py")
  procs = [_run([script, str(port), str(i)]) for i in range(2)]
  try:
    outs = [_finish(p, f"process {i}") for i, p in enumerate(procs)]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, out in enumerate(outs):
    assert f"MULTIPROCESS OK {i}" in out, out[-3000:]
    assert sum(ln.startswith("RESULT ") for ln in out.splitlines()) == 4, out[-3000:]
