"""The suite's own helpers: a subprocess past its limit fails in one line and leaves no child."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.conftest import run_process, subprocess_limit

# A parent that starts a child and both sleep: what a hung launcher looks like.
HUNG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_process_past_its_limit_fails_in_one_line_and_its_children_are_killed(tmp_path):
  out = tmp_path / "pid"
  script = HUNG.replace(
      "print(child.pid, flush=True)", f"open({str(out)!r}, 'w').write(str(child.pid))"
  )
  start = time.monotonic()
  with pytest.raises(pytest.fail.Exception) as e:
    run_process(
        [sys.executable, "-c", script], limit=2 / subprocess_limit(1), what="the hung script"
    )
  assert time.monotonic() - start < 30
  assert "the hung script ran past its 2 s limit" in str(e.value) and "\n" not in str(e.value)
  child = int(out.read_text())
  for _ in range(50):  # the child was in the killed group
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    pytest.fail(f"child {child} outlived the test")


def test_the_limit_scales_with_the_environment(monkeypatch):
  monkeypatch.setenv("CLIPJAX_TEST_TIMEOUT_SCALE", "2.5")
  assert subprocess_limit(300) == 750
