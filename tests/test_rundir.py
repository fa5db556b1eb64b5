"""Runs that cannot be silently mixed or corrupted: each failure scenario in a temporary workdir.

Config change on resume, torn log, corrupt or missing checkpoint files,
concurrent launches, a diverged run, bad config values, one-line launcher errors.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from experiments import main as launcher  # noqa: E402
from experiments import rundir, train, validate  # noqa: E402
from experiments.configs import explosion  # noqa: E402
from tests.conftest import override, run_process  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides):
  """10 steps of length-5 digit sum; evaluated and checkpointed after steps 3, 6 and 9."""
  c = explosion.get_config()
  c.length, c.num_epochs, c.eval_every = 5, 2, 3
  c.progress, c.tensorboard = False, False
  c.clip.name, c.clip.threshold = "global_norm", 5.0
  return override(c, **overrides)


def rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: what every repaired run must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = train.train_and_evaluate(small_config(), str(workdir))
  return workdir, summary


def halted(workdir, step: int = 5, **overrides):
  summary = train.train_and_evaluate(small_config(halt_after_step=step, **overrides), str(workdir))
  assert not summary["finished"]
  return summary


def assert_same_run(workdir, reference_dir):
  for name in ("metrics.jsonl", "eval.jsonl"):
    assert (workdir / name).read_text() == (reference_dir / name).read_text(), name
  a = train.restore_latest(small_config(), str(reference_dir))
  b = train.restore_latest(small_config(), str(workdir))
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------ config


def test_a_different_config_is_refused_and_the_workdir_left_as_it_was(tmp_path, reference):
  halted(tmp_path)
  before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  for key, value in [
      ("clip.threshold", 20.0),
      ("optimizer.learning_rate", 0.1),
      ("seed", 1),
      ("clip.name", "norm"),
      ("model.hidden_size", 16),
      ("length", 10),
  ]:
    with pytest.raises(rundir.ConfigError, match=f"config.{key}: .* in the workdir"):
      train.train_and_evaluate(small_config(**{key: value}), str(tmp_path))
  after = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  assert before == after
  # The run itself is intact: resumed with its own config it matches the reference.
  train.train_and_evaluate(small_config(), str(tmp_path))
  assert_same_run(tmp_path, reference[0])


def test_a_finished_run_is_not_reported_under_a_new_config(tmp_path, reference):
  train.train_and_evaluate(small_config(), str(tmp_path))
  with pytest.raises(rundir.ConfigError, match="clip.threshold"):
    train.train_and_evaluate(small_config(**{"clip.threshold": 20.0}), str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["clip"]["threshold"] == 5.0


def test_num_epochs_may_grow_only_when_allowed_and_is_recorded(tmp_path, reference):
  train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path))
  with pytest.raises(rundir.ConfigError, match="--allow_config_change=num_epochs"):
    train.train_and_evaluate(small_config(), str(tmp_path))
  with pytest.raises(rundir.ConfigError, match="accepts only"):
    train.train_and_evaluate(small_config(), str(tmp_path), allow_changes=["seed"])
  summary = train.train_and_evaluate(small_config(), str(tmp_path), allow_changes=["num_epochs"])
  assert summary["finished"] and summary["steps"] == summary["total_steps"] == 10
  change = rows(tmp_path / rundir.CHANGES_FILE)
  assert change[0]["changes"] == {"num_epochs": {"was": 1, "now": 2}}
  # Lowering below the steps already run is refused, even when allowed.
  with pytest.raises(rundir.ConfigError, match="can only grow"):
    train.train_and_evaluate(
        small_config(num_epochs=1), str(tmp_path), allow_changes=["num_epochs"]
    )


def test_checkpoints_without_a_config_are_refused(tmp_path):
  halted(tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(rundir.ConfigError, match="no config.json"):
    train.train_and_evaluate(small_config(), str(tmp_path))


BAD_CONFIGS = [
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate must be a finite"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate must be a finite number > 0"),
    ("optimizer.momentum", 1.0, "optimizer.momentum"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("model.hidden_size", 0, "model.hidden_size must be an integer >= 1"),
    ("num_epochs", 0, "num_epochs must be an integer >= 1"),
    ("eval_every", -1, "eval_every must be an integer >= 0"),
    ("length", 7, "length must be one of"),
    ("task", "copy", "task must be one of"),
    ("model.cell", "rnn", "model.cell must be one of"),
    ("model.srn_init", "ones", "model.srn_init"),
    ("loss_reduction", "max", "loss_reduction"),
    ("matmul_precision", "tf32", "matmul_precision must be one of"),
    ("clip.name", "clip_everything", "clip.name must be one of"),
    ("clip.threshold", float("inf"), "clip.threshold must be a finite number"),
    ("clip.threshold", -1.0, "config.clip: max_norm must be >= 0"),
    ("clip.nonfinite", "ignore", "clip.nonfinite"),
    ("clip.name", "spam", "config.clip: clip.name='spam' needs optimizer.name='adam'"),
    ("mesh.data", 0, "mesh.data must be -1"),
]


@pytest.mark.parametrize(
    "key,value,message", BAD_CONFIGS, ids=[f"{k}={v}" for k, v, _ in BAD_CONFIGS]
)
def test_bad_config_values_are_rejected_before_anything_is_written(tmp_path, key, value, message):
  workdir = tmp_path / "run"
  with pytest.raises(rundir.ConfigError, match=message):
    train.train_and_evaluate(small_config(**{key: value}), str(workdir))
  assert not workdir.exists()


def test_validate_accepts_the_shipped_configs():
  from experiments.configs import adding, memory, temporal_order

  for mod in (explosion, adding, memory, temporal_order):
    validate.validate_config(mod.get_config())


# --------------------------------------------------------------------- logs


def test_a_torn_log_line_is_dropped_on_resume(tmp_path, reference):
  halted(tmp_path)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 6, "loss": 12.')  # a kill in the middle of a write
  with (tmp_path / "eval.jsonl").open("a") as f:
    f.write("\x00\x00\x00")  # a full disk: garbage at the end
  with pytest.warns(UserWarning, match="unreadable line"):
    summary = train.train_and_evaluate(small_config(), str(tmp_path))
  assert summary["finished"]
  assert_same_run(tmp_path, reference[0])


def test_truncate_log_keeps_rows_before_the_resume_step(tmp_path):
  path = tmp_path / "log.jsonl"
  path.write_text('{"step": 0}\n{"step": 1}\nnot json\n{"step": 2}\n{"no_step": 1}\n{"step": 3')
  with pytest.warns(UserWarning, match="dropped 3 unreadable"):
    assert rundir.truncate_log(path, 2) == 3
  assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


# -------------------------------------------------------------- checkpoints


def _newest_checkpoint(workdir) -> pathlib.Path:
  steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  return max(steps, key=lambda p: int(p.name))


def _data_files(checkpoint: pathlib.Path) -> list[pathlib.Path]:
  return sorted(
      (p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )


@pytest.fixture
def abandoned_reads_collected():
  """Collects garbage after the test, while its warning filter still holds."""
  yield
  gc.collect()


def orbax_abandoned_reads(test):
  """Orbax abandons its reads of a damaged checkpoint; their coroutines are reported
  as unraisable exceptions when collected. The test checks what the run does.

  They are collected at the test's end: left to the garbage collector, they were
  reported (up to 21 warnings) in whichever test ran next.
  """
  test = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")(test)
  return pytest.mark.usefixtures("abandoned_reads_collected")(test)


@orbax_abandoned_reads
@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, damage):
  halted(tmp_path)  # checkpoints after steps 3 and 6 (saved as steps 4 and 7)
  newest = _newest_checkpoint(tmp_path)
  assert newest.name == "7"
  target = _data_files(newest)[-1]  # the largest file: the arrays
  data = bytearray(target.read_bytes())
  if damage == "flip_byte":
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
  elif damage == "truncate":
    target.write_bytes(bytes(data[: len(data) // 2]))
  else:
    target.unlink()
  with pytest.warns(UserWarning, match="checkpoint at step 7 .* is damaged"):
    summary = train.train_and_evaluate(small_config(), str(tmp_path))
  assert summary["finished"]
  assert list((tmp_path / "corrupt_checkpoints").iterdir())  # kept for inspection
  assert_same_run(tmp_path, reference[0])


@orbax_abandoned_reads
def test_a_checkpoint_whose_content_does_not_match_its_digest_is_not_used(tmp_path):
  ckpt = rundir.Checkpoints(tmp_path)
  good = {"w": jnp.arange(4, dtype=jnp.float32), "step": jnp.int32(1)}
  ckpt.save(1, good)
  ocp = ckpt._ocp
  bad = {"w": jnp.arange(4, dtype=jnp.float32) + 1, "step": jnp.int32(2)}
  # A state that is not what its digest says: a silent corruption of the data.
  ckpt.manager.save(
      2,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(bad),
          digest=ocp.args.JsonSave({"sha256": rundir.state_digest(good)}),
      ),
  )
  ckpt.wait()
  with pytest.warns(UserWarning, match="step 2 .* does not match the digest"):
    restored = ckpt.restore_latest(good)
  np.testing.assert_array_equal(restored["w"], good["w"])
  assert ckpt.manager.all_steps() == [1]


@orbax_abandoned_reads
def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  halted(tmp_path)
  for step in (tmp_path / "checkpoints").iterdir():
    if step.name.isdigit():
      for f in _data_files(step):
        f.unlink()
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(rundir.WorkdirError, match="no checkpoint .* restores"):
    train.train_and_evaluate(small_config(), str(tmp_path))
  # Nothing is moved when nothing restores (the cause may be the code, not the files).
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_state_digest_sees_every_bit():
  state = {"a": np.zeros(3, np.float32), "b": np.int32(1)}
  d = rundir.state_digest(state)
  assert d == rundir.state_digest({"a": np.zeros(3, np.float32), "b": np.int32(1)})
  flipped = np.zeros(3, np.float32)
  flipped.view(np.uint32)[1] ^= 1  # the smallest denormal
  assert rundir.state_digest({"a": flipped, "b": np.int32(1)}) != d
  assert rundir.state_digest({"a": np.zeros(3, np.float64), "b": np.int32(1)}) != d
  assert rundir.state_digest({"c": np.zeros(3, np.float32), "b": np.int32(1)}) != d


# ---------------------------------------------------------- concurrent launch


def test_a_second_launch_on_a_busy_workdir_fails_and_writes_nothing(tmp_path):
  with rundir.locked(tmp_path):
    with pytest.raises(rundir.WorkdirError, match=f"in use by another run \\(pid {os.getpid()}"):
      train.train_and_evaluate(small_config(), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()
  # Released: the workdir can be used again.
  with rundir.locked(tmp_path):
    pass


def _launch(workdir, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
      sys.executable,
      "-m",
      "experiments.main",
      "--config=experiments/configs/explosion.py",
      f"--workdir={workdir}",
      "--config.length=5",
      "--config.num_epochs=1",
      "--config.progress=False",
      "--config.tensorboard=False",
      *extra,
  ]
  return run_process(cmd, limit=300, what="the launcher", cwd=ROOT, env=env)


def test_launcher_errors_are_one_line(tmp_path):
  with rundir.locked(tmp_path):
    busy = _launch(tmp_path)
  assert busy.returncode == 2
  assert busy.stderr.strip().count("\n") == 0, busy.stderr
  assert busy.stderr.startswith("error: workdir ") and "in use by another run" in busy.stderr
  bad = _launch(tmp_path / "new", "--config.optimizer.learning_rate=nan")
  assert bad.returncode == 2 and bad.stderr.strip() == (
      "error: config.optimizer.learning_rate must be a finite number > 0, got nan."
  )
  assert not (tmp_path / "new").exists()
  verbose = _launch(tmp_path / "new", "--config.batch_size=0", "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert verbose.stderr.strip().splitlines()[-1].startswith("error: config.batch_size")


def test_clip_kwargs_are_set_from_the_command_line(tmp_path):
  out = _launch(
      tmp_path,
      "--config.clip.name=global_norm",
      "--config.clip.kwargs.ord=1",
      "--config.clip.kwargs.nonfinite=zero",
  )
  assert out.returncode == 0, out.stderr
  kwargs = json.loads((tmp_path / "config.json").read_text())["clip"]["kwargs"]
  assert kwargs == {"ord": 1, "nonfinite": "zero"}
  unknown = _launch(tmp_path / "b", "--config.clip.name=global_norm", "--config.clip.kwargs.ordd=1")
  assert unknown.returncode == 2 and "config.clip.kwargs" in unknown.stderr
  assert "ordd" in unknown.stderr


def test_split_clip_kwargs_reads_literals_and_words():
  argv, kwargs = launcher.split_clip_kwargs(
      [
          "prog",
          "--config.clip.kwargs.ord=3",
          "--config.clip.kwargs.mode=percentile",
          "--config.clip.kwargs.axis=(0, 1)",
          "--workdir=x",
      ]
  )
  assert argv == ["prog", "--workdir=x"]
  assert kwargs == {"ord": 3, "mode": "percentile", "axis": (0, 1)}


# --------------------------------------------------------------- divergence


def test_a_diverged_run_stops_cleanly_and_says_where(tmp_path):
  config = small_config(
      **{"clip.name": "none", "optimizer.name": "adam", "optimizer.learning_rate": 1e38}
  )
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["finished"] and summary["status"] == "diverged"
  step = summary["diverged_at_step"]
  assert 0 <= step < summary["steps"] < summary["total_steps"]
  metrics = rows(tmp_path / "metrics.jsonl")
  assert [r["params_finite"] for r in metrics].index(False) == step
  assert summary["best_step"] < step  # non-finite parameters are never "best"
  evals = rows(tmp_path / "eval.jsonl")
  assert np.isnan(evals[-1]["spectral_radius_U"])
  assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
  # Launched again, it reports the same and does not train on.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["status"] == "diverged" and again["steps"] == summary["steps"]
  assert len(rows(tmp_path / "metrics.jsonl")) == len(metrics)


def test_spectral_radius_of_non_finite_parameters_is_nan():
  params = {"rnn": {"U": np.full((3, 3), np.nan, np.float32)}}
  assert np.isnan(train.spectral_radius(params))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--config=experiments/configs/nope.py"], "--config: no such file"),
        (["--config.nonexistent=3"], "overrides: --config.nonexistent"),
        (["--config.num_epochs=abc"], "--config.num_epochs=abc"),
        (["--bogus=1"], "Unknown command line flag 'bogus'"),
    ],
)
def test_a_bad_config_or_flag_is_one_line(tmp_path, args, fragment):
  """They were tracebacks of 57-58 lines (issue 37, item 4)."""
  cmd = [sys.executable, "-m", "experiments.main", f"--workdir={tmp_path}"]
  if not any(a.startswith("--config=") for a in args):
    cmd.append("--config=experiments/configs/explosion.py")
  out = run_process(cmd + args, limit=120, what="the launcher", cwd=ROOT)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr
