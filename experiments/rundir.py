"""A run's workdir: one run per workdir, logs and checkpoints that survive a crash.

What a workdir guarantees (each tested in tests/test_rundir.py):

- **One launch at a time.** A launch holds an exclusive ``flock`` on
  ``WORKDIR/.lock`` until it ends; a second launch fails at once with a clear
  message instead of writing every row twice. The kernel drops the lock when the
  process dies, so a killed run never leaves a stale lock behind.
- **One config per workdir.** ``config.json`` is written when the run starts and
  never silently replaced: a launch whose config differs from it fails, naming
  the keys that differ. Keys that only steer the launch (progress bar, the
  test-only ``halt_after_step``) are not compared; a few that are safe to change
  on resume (``SAFE_TO_CHANGE``) may be changed with an explicit
  ``allow_changes``, and every such change is appended to
  ``config_changes.jsonl``.
- **Torn logs are repaired.** Rows are appended with one write and an fsync; on
  resume, a half-written or unparsable line is dropped with a warning, as are the
  rows at or after the step the run resumes from (work lost with the kill).
- **Checkpoints are verified.** Each checkpoint stores a SHA-256 digest of the
  state it holds; a restore recomputes it. A checkpoint that fails to restore or
  whose digest differs is moved to ``WORKDIR/corrupt_checkpoints/`` with a
  warning, and the previous intact one is used. When none restores, nothing is
  moved and the launch fails.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

import clipjax


class RunError(Exception):
  """A problem with the launch that the user can fix; the launcher prints it as one line."""


class ConfigError(RunError, ValueError):
  """A config value that cannot run, or a config that does not match the workdir's."""


class WorkdirError(RunError):
  """The workdir is busy, or holds nothing that can be resumed."""


# Config keys that only steer a launch, never its results: not compared on resume.
LAUNCH_ONLY = ("progress", "halt_after_step")
# Keys that may change on resume when the user says so (allow_changes).
SAFE_TO_CHANGE = ("num_epochs", "tensorboard", "mesh.data")

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"


# ------------------------------------------------------------------------ lock


@contextlib.contextmanager
def locked(workdir: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` for the duration of the block.

  Raises:
    WorkdirError: another process (or another launch in this one) holds it.
  """
  path = workdir / ".lock"
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise WorkdirError(
          f"workdir {workdir} is in use by another run (pid {holder}); wait for it to "
          "finish or pass another --workdir."
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


# ---------------------------------------------------------------------- config


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} for a nested dict (a config as JSON)."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(flatten_config(v, key + "."))
    else:
      out[key] = v
  return out


def config_as_json(config) -> dict[str, Any]:
  """The config as the JSON-compatible dict stored in config.json."""
  return json.loads(config.to_json_best_effort())


def config_differences(stored: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple]:
  """{key: (stored value, given value)} for every compared key that differs."""
  a, b = flatten_config(stored), flatten_config(given)
  keys = sorted(set(a) | set(b))
  missing = object()
  out = {}
  for k in keys:
    if k in LAUNCH_ONLY:
      continue
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb:
      out[k] = (None if va is missing else va, None if vb is missing else vb)
  return out


def check_config(
    workdir: pathlib.Path, config, *, resuming: bool, allow_changes: Sequence[str] = ()
) -> dict[str, tuple]:
  """Compares `config` with the workdir's config.json; returns the allowed changes.

  A workdir without config.json but with checkpoints cannot be verified and is
  refused. Call before writing anything to the workdir.

  Raises:
    ConfigError: the configs differ in a key not listed in `allow_changes`, or
      `allow_changes` names a key that is not safe to change.
  """
  bad = sorted(set(allow_changes) - set(SAFE_TO_CHANGE))
  if bad:
    raise ConfigError(
        f"--allow_config_change accepts only {', '.join(SAFE_TO_CHANGE)}; " f"got {', '.join(bad)}."
    )
  path = workdir / CONFIG_FILE
  if not path.exists():
    if resuming:
      raise ConfigError(
          f"{workdir} holds checkpoints but no {CONFIG_FILE}: cannot tell which "
          "config made them. Use a new --workdir."
      )
    return {}
  try:
    stored = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(
        f"{path} is unreadable ({e}); cannot check that this launch continues "
        "the same run. Use a new --workdir."
    ) from None
  diff = config_differences(stored, config_as_json(config))
  refused = {k: v for k, v in diff.items() if k not in allow_changes}
  if refused:
    shown = "; ".join(
        f"config.{k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in refused.items()
    )
    hint = ""
    if set(refused) <= set(SAFE_TO_CHANGE):
      hint = f" To change it on purpose, pass --allow_config_change={','.join(refused)}."
    raise ConfigError(
        f"{workdir} holds a run with a different config ({shown}). Use a new --workdir for a "
        f"new run.{hint}"
    )
  return diff


def write_config(workdir: pathlib.Path, config, changes: dict[str, tuple]) -> None:
  """Writes config.json (atomically), logging allowed `changes` to config_changes.jsonl."""
  if changes:
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "changes": {k: {"was": a, "now": b} for k, (a, b) in changes.items()},
    }
    clipjax.JsonlWriter(workdir / CHANGES_FILE, fsync=True).write([record])
  atomic_write(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2))


# ------------------------------------------------------------------------ logs


def atomic_write(path: pathlib.Path, text: str) -> None:
  """Replaces `path` with `text`: readers see the old file or the new one, never half."""
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def truncate_log(path: pathlib.Path, resume_step: int) -> int:
  """Keeps the well-formed rows of a JSONL log with step < `resume_step`.

  A torn tail (a kill or a full disk during a write) or any other unparsable
  line is dropped with a warning. Returns the number of lines dropped as
  unreadable.
  """
  if not path.exists():
    return 0
  kept, torn = [], 0
  for line in path.read_bytes().decode(errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      torn += 1
      continue
    if step < resume_step:
      kept.append(line)
  if torn:
    warnings.warn(
        f"{path}: dropped {torn} unreadable line(s) (a write cut short by a kill "
        "or a full disk); the steps they held are recomputed.",
        stacklevel=2,
    )
  atomic_write(path, "".join(line + "\n" for line in kept))
  return torn


# ----------------------------------------------------------------- checkpoints


def _host_leaf(x) -> np.ndarray:
  # Every checkpointed array is replicated: the first local shard is the whole value
  # (also in a multi-host run, where the global array is not addressable as a whole).
  if isinstance(x, jax.Array):
    x = x.addressable_data(0)
  return np.asarray(x)


def state_digest(state: Any) -> str:
  """SHA-256 of every leaf of `state` (path, dtype, shape and bytes)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    arr = np.ascontiguousarray(_host_leaf(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


class Checkpoints:
  """Orbax checkpoints of a run's state, each with a digest verified on restore."""

  def __init__(self, workdir: pathlib.Path, max_to_keep: int = 2, *, lead: bool = True):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.workdir = workdir
    self.lead = lead
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)

  def has_any(self) -> bool:
    return bool(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    ocp = self._ocp
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            digest=ocp.args.JsonSave({"sha256": state_digest(state)}),
        ),
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def _restore_step(self, step: int, like: Any) -> Any:
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), digest=ocp.args.JsonRestore()
        ),
    )
    expected = (out["digest"] or {}).get("sha256")
    if expected is None:
      raise ValueError("no digest stored")
    if state_digest(out["state"]) != expected:
      raise ValueError("the restored state does not match the digest saved with it")
    return out["state"]

  def restore_latest(self, like: Any) -> Any | None:
    """The newest intact checkpoint's state (laid out like `like`), or None if there is none.

    Newer checkpoints that fail are moved to ``corrupt_checkpoints/`` (by the
    lead process) with a warning.

    Raises:
      WorkdirError: there are checkpoints but none is intact.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state = self._restore_step(step, like)
      except Exception as e:  # noqa: BLE001 - any failure means: not usable
        failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        continue
      # Only once an intact checkpoint is found are the newer, damaged ones moved
      # aside (later saves reuse their step numbers). When none restores, nothing
      # is touched: the cause may be this code, not the files.
      for bad, why in failures:
        warnings.warn(
            f"checkpoint at step {bad} in {self.workdir} is damaged ({why}); "
            f"resuming from the one at step {step}.",
            stacklevel=2,
        )
        self._set_aside(bad)
      return state
    if failures:
      shown = "; ".join(f"step {s}: {why}" for s, why in failures)
      raise WorkdirError(
          f"no checkpoint in {self.workdir / 'checkpoints'} restores ({shown}). "
          "Start a new --workdir (this one is left as it is)."
      )
    return None

  def _set_aside(self, step: int) -> None:
    """Moves a damaged checkpoint out of Orbax's sight (kept for inspection)."""
    if self.lead:
      src = self.workdir / "checkpoints" / str(step)
      dst = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
      dst.parent.mkdir(exist_ok=True)
      if src.exists():
        shutil.move(str(src), str(dst))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"clipjax_set_aside_{step}")
    self.manager.reload()
