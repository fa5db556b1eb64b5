"""Clip stats to metric writers: JSONL, TensorBoard, and a logger that never syncs per step.

A row is a flat ``{"step": int, name: number, ...}`` dict. Both writers take a
list of rows at a time, so that the buffered rows of many steps cost one write.
:class:`StatsLogger` keeps each step's :func:`clipjax.clip_stats` on the device
(reading a device value waits for the step that computes it) and fetches the
buffer with one ``jax.device_get`` every `every` steps.
"""

from __future__ import annotations

import json
import os
import pathlib
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


class JsonlWriter:
  """Appends rows to a JSON-lines file, one object per line.

  Each :meth:`write` appends its rows in one write call, so a kill can tear at
  most the last line (readers can drop an unparsable last line). Non-finite
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
    with self.path.open("a") as f:
      f.write(text)
      if self.fsync:
        f.flush()
        os.fsync(f.fileno())

  def close(self) -> None:
    pass  # every write opens and closes the file


class TensorBoardWriter:
  """Scalars to TensorBoard event files, through tensorboardX (no TensorFlow).

  Every numeric field of a row except ``step`` becomes a scalar series of that
  name; non-finite values (a z-score during ZClip's warm-up, a diverged loss)
  are left out, as TensorBoard cannot plot them (:class:`JsonlWriter` keeps
  them). tensorboardX is not a dependency of clipjax: install it
  (``pip install tensorboardX``, or clipjax's ``[experiments]`` extra).

  Args:
    logdir: the event files' directory.
    purge_step: on a resumed run, the step to resume from: TensorBoard hides
      the events at and after it that a killed run had written.
    **kwargs: passed to ``tensorboardX.SummaryWriter``.
  """

  def __init__(self, logdir: str | os.PathLike[str], purge_step: int | None = None, **kwargs: Any):
    try:
      from tensorboardX import SummaryWriter
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
          "clipjax.TensorBoardWriter needs tensorboardX: pip install tensorboardX"
      ) from e
    self._tb = SummaryWriter(str(logdir), purge_step=purge_step, **kwargs)

  def write(self, rows: Sequence[Row]) -> None:
    for row in rows:
      step = int(row["step"])
      for name, value in row.items():
        if name != "step" and isinstance(value, (bool, int, float, np.number, np.bool_)):
          if np.isfinite(float(value)):
            self._tb.add_scalar(name, float(value), step)

  def close(self) -> None:
    self._tb.close()


def _plain(row: Row) -> dict[str, Any]:
  return {k: v if isinstance(v, (str, list, dict)) else to_python(v) for k, v in row.items()}


class StatsLogger:
  """Logs every clipper's stats (and any scalars) without a host sync per step.

  :meth:`log` keeps the step's values as device arrays; every `every` calls,
  :meth:`flush` fetches them all with one ``jax.device_get`` and writes one row
  per step to each writer. Reading a device value waits for the step that
  computes it, so logging each step's ``float(...)`` serialises the host with
  the device; buffering keeps the device busy. :meth:`close` (or leaving a
  ``with`` block) writes what is left.

  Args:
    *writers: where rows go (:class:`JsonlWriter`, :class:`TensorBoardWriter`,
      or anything with ``write(rows)`` and ``close()``).
    every: the number of steps buffered between writes.
    prefix: prepended to the clip-stat names (see :func:`clipjax.clip_stats`).

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

  def __init__(self, *writers: Writer, every: int = 100, prefix: str = "clip/"):
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f"every must be an int >= 1, got {every!r}")
    self.writers = writers
    self.every = every
    self.prefix = prefix
    self._pending: list[tuple[int, dict[str, Any]]] = []

  def log(self, step: int, opt_state: Any = None, **scalars: Any) -> None:
    """Buffers the clip stats of `opt_state` (if given) and `scalars` for `step`."""
    values = dict(clip_stats(opt_state, self.prefix)) if opt_state is not None else {}
    values.update(scalars)
    self._pending.append((int(step), values))
    if len(self._pending) >= self.every:
      self.flush()

  def flush(self) -> None:
    """Fetches the buffered values in one transfer and writes them."""
    if not self._pending:
      return
    host = jax.device_get([values for _, values in self._pending])
    rows = [
        {"step": step, **{k: to_python(fetched[k]) for k in values}}  # in logged order
        for (step, values), fetched in zip(self._pending, host)
    ]
    self._pending = []
    for writer in self.writers:
      writer.write(rows)

  def close(self) -> None:
    self.flush()
    for writer in self.writers:
      writer.close()

  def __enter__(self) -> StatsLogger:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
