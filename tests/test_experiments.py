"""The experiments: data generators, models, the real training loop on shrunk configs."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

pytest.importorskip("flax")
from experiments import data, models, optim, sweep, train  # noqa: E402
from experiments.configs import explosion  # noqa: E402
from tests.conftest import run_process, run_processes  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ data


def test_nndl_first_examples_match_the_books_generator_with_seed_0():
  # np.random.seed(0); randint(2, 5), randint(0, 10) pairs: (2,5) (2,3) (3,3) (3,2).
  s = data.nndl_digit_sum(5)["train"]
  np.testing.assert_array_equal(
      s.x[:4], [[0, 0, 5, 0, 0], [0, 0, 3, 0, 0], [0, 0, 0, 3, 0], [0, 1, 0, 2, 0]]
  )
  np.testing.assert_array_equal(s.y[:4], [0, 0, 0, 1])


@pytest.mark.parametrize("length", data.NNDL_LENGTHS)
def test_nndl_structure(length):
  splits = data.nndl_digit_sum(length)
  for name, k in data.NNDL_SPLITS:
    s = splits[name]
    assert s.x.shape == (100 * k, length) and len(s) == 100 * k
    pairs = s.x[:, :2]
    # All 100 leading pairs, k copies each, in order; label = their sum.
    np.testing.assert_array_equal(pairs[::k], [[a, b] for a in range(10) for b in range(10)])
    np.testing.assert_array_equal(s.y, pairs.sum(1))
    assert np.all((s.x[:, 2:] != 0).sum(1) <= 1)  # one random digit (possibly 0)
    assert s.x.min() >= 0 and s.x.max() <= 9


def test_nndl_lengths_depend_on_the_shared_stream():
  # Length 10 is drawn after all of length 5, as in the book's script.
  rng = np.random.RandomState(0)
  for _name, k in data.NNDL_SPLITS:
    data.nndl_generate(5, k, rng)
  expected = data.nndl_generate(10, 3, rng)
  np.testing.assert_array_equal(data.nndl_digit_sum(10)["train"].x, expected.x)


def test_adding_problem_targets():
  s = data.adding_problem(50, 20, np.random.default_rng(0))
  assert s.x.shape == (50, 20, 2)
  np.testing.assert_array_equal(s.x[..., 1].sum(1), 2)
  assert np.all(s.x[:, :10, 1].sum(1) == 1) and np.all(s.x[:, 10:, 1].sum(1) == 1)
  np.testing.assert_allclose(s.y, (s.x[..., 0] * s.x[..., 1]).sum(1), rtol=1e-6)


def test_temporal_order_classes():
  s = data.temporal_order(64, 100, np.random.default_rng(0))
  for x, y in zip(s.x, s.y):
    rel = [t for t in x if t in (4, 5)]
    assert len(rel) == 2 and y == 2 * (rel[0] - 4) + (rel[1] - 4)
    assert x[0] == 6 and x[-1] == 7
    pos = np.flatnonzero((x == 4) | (x == 5))
    assert 10 <= pos[0] < 20 and 50 <= pos[1] < 60


def test_batches_pad_and_mask():
  s = data.nndl_digit_sum(20)["train"]
  xs, ys, mask = data.batches(s, 64)
  assert xs.shape == (5, 64, 20) and mask.sum(1).tolist() == [64, 64, 64, 64, 44]
  np.testing.assert_array_equal(xs.reshape(-1, 20)[:300], s.x)


def test_bad_data_arguments():
  with pytest.raises(ValueError, match="length"):
    data.nndl_digit_sum(7)
  with pytest.raises(ValueError, match="task"):
    data.make_dataset("copy", 10)


# ---------------------------------------------------------------------- models


def test_srn_matches_a_numpy_loop():
  rng = np.random.default_rng(0)
  model = models.SequenceClassifier(cell="srn", srn_init="xavier", embed_size=4, hidden_size=5)
  x = jnp.asarray(rng.integers(0, 10, (3, 7)), jnp.int32)
  p = model.init(jax.random.key(1), x)["params"]
  emb = np.asarray(p["embedding"], np.float64)[np.asarray(x)]
  W, U, b = (np.asarray(p["rnn"][k], np.float64) for k in "WUb")
  h = np.zeros((3, 5))
  for t in range(7):
    h = np.tanh(emb[:, t] @ W + h @ U + b)
  logits = h @ np.asarray(p["linear"]["kernel"]) + np.asarray(p["linear"]["bias"])
  # Under the experiments' matmul precision (float32: on GPUs the default is TF32).
  with jax.default_matmul_precision(explosion.get_config().matmul_precision):
    out = model.apply({"params": p}, x)
  np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-5, atol=1e-6)


def test_source_init_is_zeros_and_torch_head():
  model = models.SequenceClassifier()
  p = model.init(jax.random.key(0), jnp.zeros((1, 20), jnp.int32))["params"]
  for k in "WUb":
    assert not np.any(np.asarray(p["rnn"][k]))
  assert p["rnn"]["W"].shape == (32, 32) and p["rnn"]["b"].shape == (1, 32)
  assert np.abs(np.asarray(p["linear"]["kernel"])).max() <= 1 / np.sqrt(32)


@pytest.mark.parametrize("cell", ["srn", "lstm", "gru"])
def test_grad_flow_has_one_norm_per_step(cell):
  config = explosion.get_config()
  config.model.cell, config.model.srn_init = cell, "xavier"
  model = train.model_from_config(config)
  x = jnp.asarray(data.nndl_digit_sum(10)["train"].x[:8])
  y = jnp.asarray(data.nndl_digit_sum(10)["train"].y[:8])
  p = model.init(jax.random.key(0), x)["params"]
  g = train.grad_flow(p, model, x, y)
  assert g.shape == (10,) and np.all(np.isfinite(np.asarray(g))) and float(g[-1]) > 0


# --------------------------------------------------------------- training loop


def tiny_config(optimizer="sgd", **clip):
  c = explosion.get_config()
  c.num_epochs, c.eval_every, c.progress, c.tensorboard = 2, 4, False, True
  c.length = 10
  if optimizer != "sgd":
    c.optimizer.name, c.optimizer.learning_rate = optimizer, 0.01
  for k, v in clip.items():
    setattr(c.clip, k, ml_collections.ConfigDict(v) if isinstance(v, dict) else v)
  return c


CLIP_SETTINGS = [
    {"name": "none"},
    {"name": "global_norm", "threshold": 1.0},
    {"name": "group_norm", "threshold": 1.0},
    {"name": "norm", "threshold": 1.0},
    {"name": "value", "threshold": 0.1},
    {"name": "block_rms", "threshold": 0.1},
    {"name": "agc", "threshold": 0.05},
    {"name": "global_norm", "threshold": 1.0, "nonfinite": "skip"},
    {"name": "autoclip", "threshold": 10.0},
    {"name": "zclip", "threshold": 2.5},
    {"name": "adagc", "threshold": 1.0},
    {"name": "global_norm", "threshold": 20.0, "skip_spikes": True},
    # SPAM wraps Adam; short periods so that 10 steps see clips, a reset and a warm-up.
    {
        "name": "spam",
        "threshold": 2.0,
        "optimizer": "adam",
        "kwargs": {"reset_interval": 5, "warmup_steps": 2, "clip_delay": 2},
    },
]


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIP_SETTINGS, ids=lambda c: "-".join(map(str, c.values())))
def test_shrunk_explosion_runs_every_clipper(tmp_path, clip):
  summary = train.train_and_evaluate(tiny_config(**clip), str(tmp_path))
  assert summary["finished"] and summary["steps"] == 10
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(10))
  evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
  assert [e["step"] for e in evals] == [4, 8, 9]
  assert all(len(e["grad_flow"]) == 10 and "spectral_radius_U" in e for e in evals)
  if clip.get("skip_spikes"):
    assert all(r["clip/num_steps"] == r["step"] + 1 for r in rows)  # skip_spikes' own
    assert all(r["clip/inner_state/0/num_steps"] == r["step"] + 1 for r in rows)
  elif clip["name"] != "none":
    assert all(r["clip/num_steps"] == r["step"] + 1 for r in rows)
  if clip["name"] != "none":
    # After clipping, the recorded norms never exceed the incoming ones.
    for r in rows:
      for leaf in ("rnn/W", "rnn/U", "rnn/b"):
        assert r[f"clipped_grad_norm/{leaf}"] <= r[f"grad_norm/{leaf}"] * (1 + 1e-5) + 1e-12
  if clip["name"] == "spam":
    assert rows[-1]["clip/num_resets"] == 2
    # Resets at steps 5 and 10 (indices 4, 9), each followed by 2 warm-up steps.
    warm = [r["clip/lr_scale"] < 1 for r in rows]
    assert warm == [False] * 4 + [True] * 2 + [False] * 3 + [True]
    # Clipping from step 2 (clip_delay), paused at the reset and the step after it.
    clipping = [r["clip/entries_clipped"] > 0 for r in rows]
    assert clipping[:6] == [False, True, True, True, False, False]
  if clip["name"] == "global_norm":
    key = "clip/inner_state/0/clipped" if clip.get("skip_spikes") else "clip/clipped"
    assert any(r[key] for r in rows)
    for r in rows:
      glob = np.sqrt(sum(v**2 for k, v in r.items() if k.startswith("clipped_grad_norm/")))
      assert glob <= clip["threshold"] * (1 + 1e-4)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] >= 0


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
  config = tiny_config(name="global_norm", threshold=5.0)
  config.num_epochs = 4  # 20 steps, eval after 4, 8, 12, 16, 19
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  killed = config.copy_and_resolve_references()
  killed.halt_after_step = 8
  partial = train.train_and_evaluate(killed, str(tmp_path / "resumed"))
  assert not partial["finished"] and partial["steps"] == 9
  assert not (tmp_path / "resumed" / "summary.json").exists()
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["finished"]
  a = train.restore_latest(config, str(tmp_path / "full"))
  b = train.restore_latest(config, str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, opt state, best params, counters
  for name in ("metrics.jsonl", "eval.jsonl"):
    assert (tmp_path / "full" / name).read_text() == (tmp_path / "resumed" / name).read_text()
  for k in ("test_accuracy", "best_dev_accuracy", "best_step"):
    assert full[k] == resumed[k]


@pytest.mark.slow
def test_adding_and_temporal_order_configs_run(tmp_path):
  from experiments.configs import adding, temporal_order

  for mod in (adding, temporal_order):
    c = mod.get_config()
    c.num_epochs, c.length, c.n_train, c.n_eval, c.progress = 1, 12, 64, 32, False
    c.eval_every = 0
    summary = train.train_and_evaluate(c, str(tmp_path / mod.__name__.split(".")[-1]))
    assert summary["finished"] and 0 <= summary["test_accuracy"] <= 1


@pytest.mark.slow
def test_sweep_matches_single_runs(tmp_path):
  config = tiny_config()
  res, timing = sweep.run_grid(config, "global_norm", seeds=[0, 1], thresholds=[0.5, 5.0])
  assert res["test_accuracy"].shape == (2, 2) and res["grad_norm/rnn/W"].shape == (2, 2, 10)
  single = tiny_config(name="global_norm", threshold=5.0)
  single.seed = 1
  summary = train.train_and_evaluate(single, str(tmp_path))
  np.testing.assert_allclose(res["test_accuracy"][1, 1], summary["test_accuracy"])
  np.testing.assert_allclose(res["best_dev_accuracy"][1, 1], summary["best_dev_accuracy"])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(
      res["grad_norm/rnn/W"][1, 1], [r["grad_norm/rnn/W"] for r in rows], rtol=1e-4
  )
  mapped, _ = sweep.run_grid(
      config, "global_norm", seeds=[0, 1], thresholds=[0.5, 5.0], batch_size=1
  )
  np.testing.assert_allclose(mapped["test_accuracy"], res["test_accuracy"])
  np.testing.assert_allclose(mapped["grad_norm/rnn/W"], res["grad_norm/rnn/W"], rtol=1e-4)


def test_unknown_clipper_and_optimizer_are_rejected():
  with pytest.raises(ValueError, match="clip.name"):
    optim.make_clipper("clip_everything", 1.0)
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.make_base("lion", 0.1)


@pytest.mark.slow
def test_launcher_parses_flags_and_overrides(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
      sys.executable,
      "-m",
      "experiments.main",
      "--config=experiments/configs/explosion.py",
      f"--workdir={tmp_path}",
      "--config.num_epochs=1",
      "--config.length=5",
      "--config.clip.name=global_norm",
      "--config.clip.threshold=2.5",
      "--config.progress=False",
  ]
  out = run_process(cmd, limit=300, what="the launcher", cwd=ROOT, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["clip"]["name"] == "global_norm" and saved["clip"]["threshold"] == 2.5
  assert "finished=True" in out.stdout
  bad = run_process(
      cmd[:4] + ["--config.clip.treshold=1"], limit=300, what="the launcher", cwd=ROOT, env=env
  )
  assert bad.returncode != 0 and "treshold" in bad.stderr


def _losses(workdir) -> np.ndarray:
  rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
  return np.array([[r["step"], r["loss"], r["clip/pre_clip_norm"]] for r in rows])


DP_ARGS = [
    "--config=experiments/configs/explosion.py",
    "--config.num_epochs=4",
    "--config.length=5",
    "--config.clip.name=global_norm",
    "--config.clip.threshold=2.5",
    "--config.eval_every=5",
    "--config.progress=False",
    "--config.tensorboard=False",
]


def _launch(workdir, devices: int, *extra, processes: int = 1):
  """Runs the launcher in `processes` processes with `devices` fake CPU devices each."""
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={devices}",
  }
  cmd = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *DP_ARGS, *extra]
  if processes > 1:
    with socket.socket() as sock:  # a free port for the coordinator
      sock.bind(("localhost", 0))
      port = sock.getsockname()[1]
    cmd += [
        "--distributed",
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={processes}",
    ]
  cmds = [cmd + ([f"--process_id={i}"] if processes > 1 else []) for i in range(processes)]
  what = f"the launcher ({processes} process(es), {devices} devices)"
  for done in run_processes(cmds, limit=300, what=what, cwd=ROOT, env=env):
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="session")
def single_device_run(tmp_path_factory):
  """The one-device launch both multi-device tests compare with, run once per session.

  Under pytest-xdist the workers share it through a directory above their own
  temporary roots; an exclusive lock makes the first worker run it and the
  other wait for it.
  """
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp/popen-gwN: the session's root is above
    shared = shared.parent
  workdir = shared / "single_device_run"
  with open(shared / "single_device_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.json").exists():
      _launch(workdir, 1, "--config.mesh.data=1")
  return json.loads((workdir / "summary.json").read_text()), _losses(workdir)


@pytest.mark.slow
def test_launcher_runs_data_parallel_over_all_local_devices(tmp_path, single_device_run):
  """8 fake CPU devices: the batch is split over them and the run matches one device."""
  summary1, losses1 = single_device_run
  _launch(tmp_path / "dp", 8, "--config.mesh.data=-1")
  summary8 = json.loads((tmp_path / "dp" / "summary.json").read_text())
  assert summary1["data_parallel_devices"] == 1 and summary8["data_parallel_devices"] == 8
  losses8 = _losses(tmp_path / "dp")
  assert losses8.shape == losses1.shape and losses1.shape[0] == 20
  # Same steps; only the order of the cross-device sums differs.
  np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
  assert summary8["test_accuracy"] == pytest.approx(summary1["test_accuracy"], abs=0.01)


@pytest.mark.slow
def test_launcher_runs_on_two_hosts_and_resumes(tmp_path, single_device_run):
  """Two processes (jax.distributed, 4 CPU devices each) killed after step 8, then resumed."""
  summary1, losses1 = single_device_run
  workdir = tmp_path / "two_hosts"
  # Checkpoints at the eval points 5, 10, 15, 19: halted after step 10.
  _launch(workdir, 4, "--config.mesh.data=-1", "--config.halt_after_step=8", processes=2)
  assert not (workdir / "summary.json").exists() and len(_losses(workdir)) == 11
  _launch(workdir, 4, "--config.mesh.data=-1", processes=2)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["data_parallel_devices"] == 8 and summary["finished"]
  losses = _losses(workdir)  # written once (by process 0), each step once
  np.testing.assert_array_equal(losses[:, 0], np.arange(20))
  np.testing.assert_allclose(losses, losses1, rtol=1e-4)
  assert summary["test_accuracy"] == pytest.approx(summary1["test_accuracy"], abs=0.01)


def test_data_parallel_mesh_rejects_bad_sizes():
  config = explosion.get_config()
  config.mesh.data = 1000
  with pytest.raises(ValueError, match="mesh.data"):
    train.data_parallel_mesh(config)
  config.mesh.data = 1
  assert train.data_parallel_mesh(config) is None


# ------------------------------------------------------------------ book settings


def test_frozen_embedding_does_not_move_and_is_outside_the_norm():
  c = tiny_config(name="global_norm", threshold=1e-3)
  c.model.freeze_embedding = True
  model = train.model_from_config(c)
  splits = train.load_splits(c)
  x, y = jnp.asarray(splits["train"].x[:8]), jnp.asarray(splits["train"].y[:8])
  params = model.init(jax.random.key(0), x[:1])["params"]
  opt = optim.make_optimizer(c)
  batch = (x, y, jnp.ones(8, jnp.float32))
  new, _, metrics = train.train_step(
      params, opt.init(params), batch, model=model, opt=opt, reduction="sum"
  )
  np.testing.assert_array_equal(new["embedding"], params["embedding"])
  assert float(metrics["grad_norm/embedding"]) == 0.0
  assert not np.array_equal(new["rnn"]["W"], params["rnn"]["W"])


BOOK_SMOKE = {
    "name": "smoke",
    "book": "explosion",
    "overrides": {"length": 5, "eval_every": 4},
    "seeds": [0, 1],
    "epochs": [1],
    "inits": ["zeros", "xavier"],
    "global_norm": [1.0],
    "norm": [5.0],
    "freeze": [False],
    "freeze_epochs": [],
    "map_init": "xavier",
    "map_epochs": 1,
    "map_seeds": [0, 1],
    "map_thresholds": [1.0],
    "map_lrs": [0.2],
    "map_reductions": ["sum"],
}


@pytest.mark.slow
def test_book_report_runs_and_resumes_from_its_grids(tmp_path):
  from experiments import book

  book.run(BOOK_SMOKE, tmp_path, "book.md")
  text = (tmp_path / "book.md").read_text()
  assert "| clip_by_global_norm(1) |" in text and "| clip_by_norm (per tensor)(5) |" in text
  assert (tmp_path / "figures" / "book_lr_map.png").exists()
  grids = sorted((tmp_path / "_grids").glob("*.npz"))
  assert len(grids) == 2 * 3 + 2  # inits x clippers, and the map's two
  stamps = {p: p.stat().st_mtime_ns for p in grids}
  (tmp_path / "book.md").unlink()
  book.run(BOOK_SMOKE, tmp_path, "book.md")  # every grid read back, none recomputed
  assert {p: p.stat().st_mtime_ns for p in grids} == stamps
  assert (tmp_path / "book.md").read_text().split("\n")[4:] == text.split("\n")[4:]
  with pytest.raises(ValueError, match="delete it"):  # a cached grid of other seeds
    book.run({**BOOK_SMOKE, "seeds": [0, 1, 2]}, tmp_path, "book.md")


def test_book_interval_and_spectral_radius():
  from experiments import book

  mean, half = book.interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / np.sqrt(3))
  u = np.array([[[0.0, 2.0], [-2.0, 0.0]], [[np.nan, 0.0], [0.0, 1.0]]])
  np.testing.assert_allclose(book.spectral_radius(u), [2.0, np.nan])


@pytest.mark.slow
def test_book_memory_report_with_the_long_range_tasks(tmp_path):
  from experiments import book

  profile = {
      "name": "smoke_memory",
      "book": "memory",
      "overrides": {"n_train": 16, "n_eval": 8, "num_epochs": 1, "eval_every": 2, "length": 5},
      "memory_cells": ["srn"],
      "memory_lengths": [5],
      "memory_seeds": [0, 1],
      "memory_epochs": 1,
      "memory_clip": 1.0,
      "tasks": ["adding"],
      "task_cells": ["srn"],
      "task_seeds": [0, 1],
      "task_clip": 1.0,
  }
  book.run(profile, tmp_path, "memory.md")
  text = (tmp_path / "memory.md").read_text()
  assert "| srn + clip(1) |" in text and "| adding (5) | srn |" in text
  assert (tmp_path / "figures" / "book_memory_flow.png").exists()
  assert len(list((tmp_path / "_grids").glob("*.npz"))) == 4
