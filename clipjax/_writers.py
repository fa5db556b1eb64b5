"""Clip stats to metric writers: JSONL, TensorBoard, and a logger that never syncs per step.

A row is a flat ``{"step": int, name: number, ...}`` dict. Both writers take a
list of rows at a time, so that the buffered rows of many steps cost one write.
:class:`StatsLogger` keeps each step's :func:`clipjax.clip_stats` on the device
(reading a device value waits for the step that computes it) and fetches the
buffer with one ``jax.device_get`` every `every` steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import struct
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from clipjax._stats import clip_stats

Row = Mapping[str, Any]


class Writer(Protocol):
  """What :class:`StatsLogger` writes to: rows with a ``"step"`` key, then close."""

  def write(self, rows: Sequence[Row]) -> None:
    ...

  def close(self) -> None:
    ...


def to_python(value: Any) -> bool | int | float:
  """A scalar (NumPy, JAX on the host, or Python) as a plain Python number for a log."""
  v = np.asarray(value)
  if v.shape != ():
    raise ValueError(f"a logged value must be a scalar, got shape {v.shape}")
  if v.dtype == np.bool_:
    return bool(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  # The shortest decimal that reads back as the same value in its own dtype: a
  # float32 0.2 is logged as 0.2, not 0.20000000298023224.
  return float(str(v[()]))


def _append_whole(path: pathlib.Path, data: bytes, fsync: bool = False) -> None:
  """Appends `data` to `path`; a write cut short (a full disk) is cut off again,
  so that the file ends with the last whole write, and the error re-raised.

  (Unbuffered: a buffered file would write its rest again when closed.)
  """
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    size = os.lseek(fd, 0, os.SEEK_END)
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view) :]
      if fsync:
        os.fsync(fd)
    except OSError:
      with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
      raise
  finally:
    os.close(fd)


class JsonlWriter:
  """Appends rows to a JSON-lines file, one object per line.

  Each :meth:`write` appends its rows in one write call, so a kill can tear at
  most the last line (readers can drop an unparsable last line); a write that
  fails (a full disk) is cut off again, so the file ends with a whole row. Non-finite
  values are written as ``NaN``/``Infinity``, which Python's ``json`` reads back.

  Args:
    path: the file; its parent directories are created.
    fsync: flush each write to disk before returning (for logs that must
      survive a machine crash; costs a disk sync per write).
  """

  def __init__(self, path: str | os.PathLike[str], fsync: bool = False):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.fsync = fsync

  def write(self, rows: Sequence[Row]) -> None:
    if not rows:
      return
    text = "".join(json.dumps(_plain(row)) + "\n" for row in rows)
    _append_whole(self.path, text.encode(), self.fsync)

  def close(self) -> None:
    pass  # every write opens and closes the file


class TensorBoardWriter:
  """Scalars to a TensorBoard event file, written in the caller's thread.

  Every numeric field of a row except ``step`` becomes a scalar series of that
  name; non-finite values (a z-score during ZClip's warm-up, a diverged loss)
  are left out, as TensorBoard cannot plot them (:class:`JsonlWriter` keeps
  them), and a ``nonfinite`` scalar at that step counts them, so that the
  step shows. The events are framed and written here, each :meth:`write` in one
  call: a failed write (a full disk) raises ``OSError`` in the caller, with
  the file named, instead of killing a background thread while the next write
  waits on its queue forever (``tensorboardX.SummaryWriter`` does). The event
  protos come from tensorboardX, which is not a dependency of clipjax: install
  it (``pip install tensorboardX``, or clipjax's ``[experiments]`` extra).

  Args:
    logdir: the event files' directory (created).
    purge_step: on a resumed run, the step to resume from: TensorBoard hides
      the events at and after it that a killed run had written.
    filename_suffix: appended to the event file's name.
  """

  def __init__(
      self,
      logdir: str | os.PathLike[str],
      purge_step: int | None = None,
      filename_suffix: str = "",
  ):
    try:
      from tensorboardX.proto import event_pb2
      from tensorboardX.record_writer import masked_crc32c
      from tensorboardX.summary import scalar
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
          "clipjax.TensorBoardWriter needs tensorboardX: pip install tensorboardX"
      ) from e
    self._event, self._crc, self._scalar = event_pb2, masked_crc32c, scalar
    directory = pathlib.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = directory / (name + filename_suffix)
    first = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
    if purge_step is not None:
      first.append(
          event_pb2.Event(
              wall_time=time.time(),
              step=int(purge_step),
              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
          )
      )
    self._append(first)

  def _record(self, event: Any) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data))

  def _append(self, events: list[Any]) -> None:
    payload = b"".join(self._record(e) for e in events)
    try:
      _append_whole(self.path, payload)
    except OSError as e:
      raise OSError(e.errno, f"TensorBoardWriter could not write {self.path}: {e.strerror}") from e

  def write(self, rows: Sequence[Row]) -> None:
    events = []
    now = time.time()
    for row in rows:
      step = int(row["step"])
      nonfinite = 0
      for name, value in row.items():
        if name != "step" and isinstance(value, (bool, int, float, np.number, np.bool_)):
          if np.isfinite(float(value)):
            summary = self._scalar(name, float(value))
            events.append(self._event.Event(wall_time=now, step=step, summary=summary))
          else:
            nonfinite += 1
      if nonfinite:  # the marker of a step whose NaN/inf values are left out
        summary = self._scalar("nonfinite", float(nonfinite))
        events.append(self._event.Event(wall_time=now, step=step, summary=summary))
    if events:
      self._append(events)

  def close(self) -> None:
    pass  # every write opens and closes the file


def _plain(row: Row) -> dict[str, Any]:
  return {k: v if isinstance(v, (str, list, dict)) else to_python(v) for k, v in row.items()}


@jax.jit
def _snapshot(values: Any) -> Any:
  """A copy of the device values on the device (one dispatch, no host sync)."""
  return jax.tree.map(lambda x: x.copy(), values)


class StatsLogger:
  """Logs every clipper's stats (and any scalars) without a host sync per step.

  :meth:`log` keeps the step's values as device arrays; every `every` calls,
  :meth:`flush` fetches them all with one ``jax.device_get`` and writes one row
  per step to each writer. Reading a device value waits for the step that
  computes it, so logging each step's ``float(...)`` serialises the host with
  the device; buffering keeps the device busy. :meth:`close` (or leaving a
  ``with`` block) writes what is left.

  What is kept, and what can be lost:

  - the logged device values are copied on the device when logged (one small
    dispatch), so a step that donates its state (``jax.jit(...,
    donate_argnums=...)``, which clipjax's in-place state is built for) does not
    delete them before the flush;
  - a value that is not a scalar is refused by :meth:`log` with a ValueError
    naming it, and nothing is buffered for that call;
  - a writer that fails keeps its rows and gets them again, with the new ones,
    at the next flush (at most `backlog` rows; the oldest beyond that are
    dropped and counted in :attr:`dropped`); the other writers get every row.
    The flush then raises the first failure;
  - a kill loses the rows not yet flushed: at most `every` steps (and a failed
    writer's backlog);
  - an exception inside a ``with`` block is not replaced by a failure of the
    final flush (that one becomes a warning).

  Args:
    *writers: where rows go (:class:`JsonlWriter`, :class:`TensorBoardWriter`,
      or anything with ``write(rows)`` and ``close()``).
    every: the number of steps buffered between writes.
    prefix: prepended to the clip-stat names (see :func:`clipjax.clip_stats`).
    backlog: the most rows kept for a writer that failed (default 100 x every).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, clipjax, tempfile, pathlib
    >>> opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {'w': jnp.array([3.0, 4.0])}
    >>> state = opt.init(params)
    >>> step = jax.jit(opt.update)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'stats.jsonl'
    >>> with clipjax.StatsLogger(clipjax.JsonlWriter(path), every=2) as logger:
    ...   for i in range(3):
    ...     updates, state = step(params, state)
    ...     logger.log(i, state, lr=0.1)
    >>> print(path.read_text().splitlines()[-1])  # doctest: +NORMALIZE_WHITESPACE
    {"step": 2, "clip/pre_clip_norm": 5.0, "clip/clip_scale": 0.2, "clip/clipped": true,
     "clip/skipped": false, "clip/num_steps": 3, "clip/num_clipped": 3, "clip/num_nonfinite": 0,
     "lr": 0.1}
  """

  def __init__(
      self,
      *writers: Writer,
      every: int = 100,
      prefix: str = "clip/",
      backlog: int | None = None,
  ):
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f"every must be an int >= 1, got {every!r}")
    backlog = 100 * every if backlog is None else backlog
    if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < every:
      raise ValueError(f"backlog must be an int >= every ({every}), got {backlog!r}")
    self.writers = writers
    self.every = every
    self.prefix = prefix
    self.backlog = backlog
    self.dropped = 0  # rows dropped from failed writers' backlogs
    self._pending: list[tuple[int, dict[str, Any]]] = []
    self._unwritten: list[list[Row]] = [[] for _ in writers]

  def log(self, step: int, opt_state: Any = None, **scalars: Any) -> None:
    """Buffers the clip stats of `opt_state` (if given) and `scalars` for `step`."""
    values = dict(clip_stats(opt_state, self.prefix)) if opt_state is not None else {}
    values.update(scalars)
    for name, value in values.items():
      if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
        raise ValueError(
            f"StatsLogger.log: {name!r} must be a scalar number, got "
            f"{type(value).__name__} of shape {np.shape(value)}"
        )
    on_device = {k: v for k, v in values.items() if isinstance(v, jax.Array)}
    if on_device:
      values.update(_snapshot(on_device))
    self._pending.append((int(step), values))
    if len(self._pending) >= self.every:
      self.flush()

  def flush(self) -> None:
    """Fetches the buffered values in one transfer and writes them to every writer."""
    if self._pending:
      host = jax.device_get([values for _, values in self._pending])
      rows = [
          {"step": step, **{k: to_python(fetched[k]) for k in values}}  # in logged order
          for (step, values), fetched in zip(self._pending, host)
      ]
      self._pending = []
      for unwritten in self._unwritten:
        unwritten.extend(rows)
    failures: list[tuple[int, Exception]] = []
    for i, writer in enumerate(self.writers):
      if not self._unwritten[i]:
        continue
      try:
        writer.write(self._unwritten[i])
      except Exception as e:  # noqa: BLE001 - every writer gets its rows; the first failure is raised
        excess = len(self._unwritten[i]) - self.backlog
        if excess > 0:
          del self._unwritten[i][:excess]
          self.dropped += excess
        failures.append((i, e))
      else:
        self._unwritten[i] = []
    if failures:
      index, error = failures[0]
      raise RuntimeError(
          f"StatsLogger: {type(self.writers[index]).__name__} failed ({error}); its "
          f"{len(self._unwritten[index])} rows are kept for the next flush "
          f"({self.dropped} dropped so far)"
      ) from error

  def close(self) -> None:
    try:
      self.flush()
    finally:
      for writer in self.writers:
        writer.close()

  def __enter__(self) -> StatsLogger:
    return self

  def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # the block's own exception wins
      self.close()
    except Exception as e:  # noqa: BLE001
      warnings.warn(f"StatsLogger could not write its last rows: {e}", RuntimeWarning, stacklevel=2)
