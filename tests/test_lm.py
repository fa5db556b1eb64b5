"""The Flax NNX language-model example: data, model, faults, the real loop on a shrunk config."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("flax")
from experiments import lm  # noqa: E402
from experiments.configs import lm as lm_config  # noqa: E402
from tests.conftest import override  # noqa: E402


def tiny(**overrides):
  c = lm_config.get_config()
  # 30 steps: skip_spikes watches from its 20th value on; the fault hits step 25.
  c.steps, c.batch_size, c.seq_len, c.eval_batches, c.log_every = 30, 4, 8, 1, 7
  c.model.width, c.model.depth, c.model.heads = 16, 1, 2
  c.optimizer.warmup_steps = 2
  c.faults.steps = (25,)
  return override(c, **overrides)


def test_markov_source_rows_are_distributions_with_the_given_branching():
  probs = lm.markov_source(8, 3, seed=0)
  np.testing.assert_allclose(probs.sum(-1), 1.0)
  assert np.all((probs > 0).sum(-1) == 3)
  seqs = lm.sample(probs, 200, 10, np.random.default_rng(0))
  assert seqs.shape == (200, 10) and seqs.dtype == np.int32
  # Every observed transition has positive probability under the source.
  assert np.all(probs[seqs[:, :-2], seqs[:, 1:-1], seqs[:, 2:]] > 0)
  assert 0 < lm.entropy_rate(probs, seqs) <= np.log(3) + 1e-9


def test_lr_fault_scales_only_the_fault_step():
  tx = lm.scale_on_fault(30.0)
  g = {"w": np.ones(2, np.float32)}
  u, _ = tx.update(g, tx.init(g), fault=True)
  np.testing.assert_array_equal(u["w"], [30.0, 30.0])
  u, _ = tx.update(g, tx.init(g), fault=False)
  np.testing.assert_array_equal(u["w"], [1.0, 1.0])


@pytest.mark.slow
@pytest.mark.parametrize("name", lm.CLIPPERS)
def test_every_clipper_trains_and_logs_its_stats(tmp_path, name):
  summary = lm.train(tiny(**{"clip.name": name}), str(tmp_path))
  assert summary["finite"] and np.isfinite(summary["final_eval_loss"])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(30))
  assert [r["fault"] for r in rows] == [s == 25 for s in range(30)]
  if name in ("zclip", "skip_spikes"):  # clipjax's stats come from the nnx.Optimizer's state
    assert rows[-1]["clip/num_steps"] == 30
  if name == "skip_spikes":  # a loss 1000x its history is skipped
    assert rows[25]["clip/skipped"] and not any(r["clip/skipped"] for r in rows[:25])
  if name == "zclip":  # a gradient norm far above its history is clipped
    assert rows[25]["clip/clipped"]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "summary.json").read_text())["clipper"] == name


@pytest.mark.slow
def test_compare_writes_a_table_and_a_figure(tmp_path):
  config = tiny(steps=8, **{"faults.steps": (4,)})
  rows = lm.compare(config, ["none", "zclip"], [0, 1], str(tmp_path))
  assert [r["clipper"] for r in rows] == [lm.CLEAN, "none", "zclip"]
  table = (tmp_path / "compare.md").read_text()
  assert f"| {lm.CLEAN} |" in table and "| none |" in table and "| zclip |" in table
  assert (tmp_path / "compare.png").stat().st_size > 0
  saved = json.loads((tmp_path / "compare.json").read_text())
  assert set(saved["curves"]) == {f"{c}/{s}" for c in (lm.CLEAN, "none", "zclip") for s in (0, 1)}


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("clip.name", "adagc", "clip.name"),
        ("faults.kind", "fire", "faults.kind"),
        ("steps", 0, "steps"),
        ("model.heads", 3, "model.width"),
        ("optimizer.learning_rate", float("nan"), "learning_rate"),
        ("branching", 99, "branching"),
        ("compute_dtype", "fp8", "compute_dtype"),
    ],
)
def test_bad_config_values_are_rejected(key, value, message):
  with pytest.raises(ValueError, match=message):
    lm.validate(tiny(**{key: value}))
