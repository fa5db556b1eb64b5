"""Test-session settings shared by every test directory (and the processes tests start).

On a GPU machine the suite runs as it is (`pytest -n 8` included): devices are not
preallocated.

XLA's compilations are cached on disk for the whole run: the launcher tests start
many processes that compile the same training step, and a local re-run of the
suite reuses what the last one compiled. The cache is keyed by the program, the
backend, jax's version and the XLA flags, so a stale entry is never used for
another program. Set CLIPJAX_TEST_JAX_CACHE to move it, or to '' to turn it off.

CLIPJAX_TEST_FAST_CPU_CODEGEN=1 (set by `make test` for its first pytest run) adds
XLA flags that halve the suite's CPU compile time: the older CPU code generator
for fusions and no LLVM optimisation. They do not change our programs (what jax
lowers), only how XLA's CPU backend fuses and compiles them: some fusions differ,
and a quotient can round differently by an ulp. The tests marked
`xla_default_cpu_codegen` look at exactly that (bit-exact agreement with XLA's
constant folding, the fusions and copies of the compiled HLO); every other test
passes either way. `make test` runs the marked ones in a second pytest run without
the flags; a run with the flags refuses to collect them. XLA aborts on a flag it
does not know (they are renamed or dropped between releases): a probe process
checks them first, and if this jaxlib rejects them the run says so and compiles
with XLA's defaults.
"""

import os
import pathlib
import subprocess
import sys

import pytest

# Cold pytest on 2 cores (2026-11-30): 10 min 28 s with XLA's default for every test,
# 5 min 0 s in make test's two runs.
FAST_CPU_CODEGEN_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
)
FAST_CPU_CODEGEN = os.environ.get("CLIPJAX_TEST_FAST_CPU_CODEGEN", "") == "1"


def _xla_accepts(flags: list[str]) -> bool:
  """Whether this jaxlib's XLA knows `flags` (it aborts the process on an unknown one)."""
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
      env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      check=False,
  )
  return probe.returncode == 0


_flags = os.environ.get("XLA_FLAGS", "").split()
_missing = [f for f in FAST_CPU_CODEGEN_FLAGS if f not in _flags]
# Appended once: xdist workers and the processes tests start import this file
# again with the controller's environment, which has them already.
if FAST_CPU_CODEGEN and _missing:
  if _xla_accepts(_flags + _missing):
    os.environ["XLA_FLAGS"] = " ".join(_flags + _missing)
  else:
    # A jaxlib whose XLA renamed or dropped a flag: its default compile, slower.
    # (The variable is changed so that the processes started from here do not ask again.)
    print(f"conftest.py: XLA rejects {_missing}; compiling with its defaults", file=sys.stderr)
    os.environ["CLIPJAX_TEST_FAST_CPU_CODEGEN"] = "rejected"
    FAST_CPU_CODEGEN = False

# On a GPU, every process (xdist workers, the processes tests start) takes memory as
# it needs it, instead of 75% of the device each at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_cache = os.environ.setdefault(
    "CLIPJAX_TEST_JAX_CACHE", str(pathlib.Path(__file__).parent / ".cache" / "jax-tests")
)
if _cache:
  # Environment variables, so that processes started by the tests use it too.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
  # Every program: the tests compile many small ones, and the same ones recur across
  # tests, the two workers and the processes tests start (cold run 7 min 4 s at
  # 0.3 s, 6 min 4 s at 0.05 s; on 2026-11-30, on a slower day, 9 min 25 s at 0.05 s
  # and 8 min 10 s at 0).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_finish(session: pytest.Session) -> None:
  """A run with the fast CPU code generation must not pass off its own compile as XLA's default."""
  if not FAST_CPU_CODEGEN:
    return
  marked = [
      item.nodeid for item in session.items if item.get_closest_marker("xla_default_cpu_codegen")
  ]
  if marked:
    raise pytest.UsageError(
        f"CLIPJAX_TEST_FAST_CPU_CODEGEN=1 runs {len(marked)} tests marked xla_default_cpu_codegen"
        f" (e.g. {marked[0]}): they check XLA's default compile; deselect them with"
        ' -m "not xla_default_cpu_codegen" and run them without the variable'
    )
