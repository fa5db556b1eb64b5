"""Test-session settings shared by every test directory (and the processes tests start).

On a GPU machine the suite runs as it is (`pytest -n 8` included): devices are not
preallocated.

XLA's compilations are cached on disk for the whole run: the launcher tests start
many processes that compile the same training step, and a local re-run of the
suite reuses what the last one compiled. The cache is keyed by the program, the
backend, jax's version and the XLA flags, so a stale entry is never used for
another program. Set CLIPJAX_TEST_JAX_CACHE to move it, or to '' to turn it off.
"""

import os
import pathlib

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
