"""Clip stats to metric writers: JSONL, TensorBoard, the buffering logger, NNX state."""

from __future__ import annotations

import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from tests.conftest import run_process


def _run(opt, steps, logger, params=None):
  params = params or {"w": jnp.array([3.0, 4.0])}
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i in range(steps):
    grads = jax.tree.map(lambda p, i=i: p * (i + 1), params)
    _, state = update(grads, state, params)
    logger.log(i, state, loss=jnp.float32(i) / 2)
  return state


def test_jsonl_rows_hold_every_step_and_the_clip_stats(tmp_path):
  opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
  path = tmp_path / "logs" / "stats.jsonl"
  with clipjax.StatsLogger(clipjax.JsonlWriter(path), every=3) as logger:
    _run(opt, 7, logger)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(7))
  np.testing.assert_allclose(
      [r["clip/pre_clip_norm"] for r in rows], [5.0 * (i + 1) for i in range(7)]
  )
  assert [r["loss"] for r in rows] == [i / 2 for i in range(7)]
  assert all(r["clip/clipped"] is True for r in rows)
  assert rows[-1]["clip/num_steps"] == 7 and isinstance(rows[-1]["clip/num_steps"], int)


def test_nothing_is_fetched_from_the_device_until_a_flush(tmp_path, monkeypatch):
  fetches = []
  real = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(1) or real(x))
  path = tmp_path / "s.jsonl"
  logger = clipjax.StatsLogger(clipjax.JsonlWriter(path), every=4)
  _run(optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1)), 9, logger)
  assert len(fetches) == 2 and len(path.read_text().splitlines()) == 8  # steps 0-7
  logger.close()
  assert len(fetches) == 3 and len(path.read_text().splitlines()) == 9


def _scalar_events(logdir) -> dict[str, list[tuple[int, float]]]:
  """Reads event files as TFRecords (length, crc, payload, crc) of Event protos."""
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  opt = clipjax.chain(clipjax.zclip(warmup_steps=2), optax.adam(0.1))
  with clipjax.StatsLogger(clipjax.TensorBoardWriter(tmp_path), every=10) as logger:
    _run(opt, 4, logger)
  events = _scalar_events(tmp_path)
  assert [s for s, _ in events["loss"]] == [0, 1, 2, 3]
  np.testing.assert_allclose([v for _, v in events["clip/pre_clip_norm"]], [5.0, 10.0, 15.0, 20.0])
  assert [v for _, v in events["clip/num_steps"]] == [1.0, 2.0, 3.0, 4.0]


def test_several_clippers_get_their_paths_and_any_writer_works():
  class Collect:

    def __init__(self):
      self.rows, self.closed = [], False

    def write(self, rows):
      self.rows.extend(rows)

    def close(self):
      self.closed = True

  sink = Collect()
  opt = optax.chain(clipjax.clip_by_value(100.0), clipjax.clip_by_global_norm(1.0), optax.sgd(1))
  with clipjax.StatsLogger(sink, every=100, prefix="") as logger:
    _run(opt, 2, logger)
  assert sink.closed and len(sink.rows) == 2
  assert {"0/pre_clip_norm", "1/pre_clip_norm", "loss", "step"} <= set(sink.rows[0])


def test_clip_stats_reads_a_flax_nnx_optimizer_state():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  model = Model(nnx.Rngs(0))
  tx = optax.chain(
      clipjax.record_leaf_norms(), clipjax.clip_by_global_norm(1e-3), optax.adamw(1e-3)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 3))) ** 2))(model)
  optimizer.update(model, grads)
  stats = clipjax.clip_stats(optimizer.opt_state)
  types = {k: type(v) for k, v in stats.items()}
  assert all(isinstance(v, jax.Array) for v in stats.values()), types
  assert int(stats["1/num_steps"]) == 1 and bool(stats["1/clipped"])
  expected = optax.tree.norm(nnx.state(grads, nnx.Param))
  np.testing.assert_allclose(float(stats["1/pre_clip_norm"]), float(expected), rtol=1e-6)
  kernel = np.linalg.norm(np.asarray(grads.linear.kernel.get_value()))
  np.testing.assert_allclose(float(stats["0/leaf_norms/linear/kernel"]), kernel, rtol=1e-6)


def test_bad_logger_arguments_are_rejected():
  for every in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="every"):
      clipjax.StatsLogger(every=every)
  with pytest.raises(ValueError, match="scalar"):
    clipjax.StatsLogger(every=1).log(0, None, loss=np.ones(2))


# ------------------------------------------------ never hang, never lose rows silently

FULL_DISK = """
import resource, sys
import numpy as np
import clipjax
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # Python ignores SIGXFSZ
writer = clipjax.TensorBoardWriter(sys.argv[1])
try:
  for step in range(100000):
    writer.write([{{"step": step, "loss": 0.5, "clip/pre_clip_norm": np.float32(3.0)}}])
except OSError as e:
  print("OSError", step, e)
"""


@pytest.mark.parametrize("limit", [300, 3000, 30000])
def test_a_full_disk_under_tensorboard_is_an_error_not_a_hang(tmp_path, limit):
  """tensorboardX's writer thread died on EFBIG and the next write waited forever."""
  pytest.importorskip("tensorboardX")
  out = run_process(
      [sys.executable, "-c", FULL_DISK.format(limit=limit), str(tmp_path)],
      limit=120,
      what="the full-disk script",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "OSError" in out.stdout and "TensorBoardWriter could not write" in out.stdout, out
  assert "\n" not in out.stdout.strip(), out.stdout  # one line
  # What was written before the disk filled is readable.
  events = _scalar_events(tmp_path)
  assert len(events.get("loss", [])) == int(out.stdout.split()[1])


class _Flaky:
  """Fails its first `fails` writes, then writes to a list."""

  def __init__(self, fails):
    self.fails, self.rows, self.closed = fails, [], False

  def write(self, rows):
    if self.fails:
      self.fails -= 1
      raise OSError(28, "No space left on device")
    self.rows.extend(rows)

  def close(self):
    self.closed = True


def test_a_failing_writer_keeps_its_rows_and_the_others_get_theirs(tmp_path):
  flaky, path = _Flaky(fails=2), tmp_path / "s.jsonl"
  logger = clipjax.StatsLogger(flaky, clipjax.JsonlWriter(path), every=2)
  opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
  with pytest.raises(RuntimeError, match="_Flaky failed.*No space left.*rows are kept"):
    _run(opt, 2, logger)
  # The healthy writer got the batch, and still does while the other fails.
  assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [0, 1]
  with pytest.raises(RuntimeError, match="4 rows are kept"):
    for i in range(2, 4):
      logger.log(i, loss=jnp.float32(i))
  logger.log(4, loss=jnp.float32(4))
  logger.close()  # the third write succeeds: everything, once, in order
  assert [r["step"] for r in flaky.rows] == [0, 1, 2, 3, 4] and flaky.closed
  assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
  assert logger.dropped == 0


def test_a_writer_that_never_recovers_holds_at_most_its_backlog():
  flaky = _Flaky(fails=10**9)
  logger = clipjax.StatsLogger(flaky, every=1, backlog=3)
  for i in range(5):
    with pytest.raises(RuntimeError):
      logger.log(i, loss=1.0)
  assert logger.dropped == 2 and len(logger._unwritten[0]) == 3  # the newest three


def test_a_bad_value_is_refused_when_logged_and_poisons_nothing(tmp_path):
  path = tmp_path / "s.jsonl"
  logger = clipjax.StatsLogger(clipjax.JsonlWriter(path), every=2)
  logger.log(0, loss=1.0)
  for bad in (np.ones(2), "abc", jnp.zeros((3,))):
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
      logger.log(1, loss=bad)
  logger.log(1, loss=2.0)
  logger.close()
  assert [json.loads(r)["loss"] for r in path.read_text().splitlines()] == [1.0, 2.0]


def test_the_blocks_own_exception_is_not_replaced_by_the_last_flush():
  with pytest.warns(RuntimeWarning, match="could not write its last rows"):
    with pytest.raises(KeyError, match="from the training loop"):
      with clipjax.StatsLogger(_Flaky(fails=1), every=10) as logger:
        logger.log(0, loss=1.0)
        raise KeyError("from the training loop")


def test_a_donated_step_can_be_logged(tmp_path):
  """The logged stats are the state's own buffers, which the next donated step deletes."""
  opt = optax.chain(clipjax.clip_by_global_norm(1.0), optax.adam(0.1))
  params = {"w": jnp.array([3.0, 4.0])}

  def step(params, state, i):
    grads = jax.tree.map(lambda p: p * (i + 1.0), params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  path = tmp_path / "s.jsonl"
  donated = jax.jit(step, donate_argnums=(0, 1))
  state = opt.init(params)
  p = params
  with clipjax.StatsLogger(clipjax.JsonlWriter(path), every=3) as logger:
    for i in range(7):
      p, state = donated(p, state, jnp.float32(i))
      logger.log(i, state)
  rows = [json.loads(r) for r in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(7))
  assert [r["clip/num_steps"] for r in rows] == list(range(1, 8))


def test_a_full_disk_under_jsonl_leaves_whole_rows(tmp_path):
  script = FULL_DISK.replace(
      "clipjax.TensorBoardWriter(sys.argv[1])", "clipjax.JsonlWriter(sys.argv[1] + '/s.jsonl')"
  ).format(limit=1000)
  out = run_process(
      [sys.executable, "-c", script, str(tmp_path)], limit=120, what="the full-disk script"
  )
  assert out.returncode == 0 and "OSError" in out.stdout, (out.stdout, out.stderr[-2000:])
  rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(int(out.stdout.split()[1])))


def test_a_nonfinite_value_leaves_a_marker_in_tensorboard(tmp_path):
  pytest.importorskip("tensorboardX")
  writer = clipjax.TensorBoardWriter(tmp_path)
  writer.write(
      [
          {"step": 0, "loss": 1.0, "z": 0.5},
          {"step": 1, "loss": float("nan"), "z": float("inf")},
          {"step": 2, "loss": 0.8, "z": 0.4},
      ]
  )
  events = _scalar_events(tmp_path)
  assert [s for s, _ in events["loss"]] == [0, 2]
  assert events["nonfinite"] == [(1, 2.0)]
