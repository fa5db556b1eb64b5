"""Clip stats to metric writers: JSONL, TensorBoard, the buffering logger, NNX state."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax


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
