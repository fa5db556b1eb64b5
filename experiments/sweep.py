"""Many runs as one program: seeds x thresholds of one clipper, jitted and vmapped.

Each run is the same training as `train.train_and_evaluate` (same data order,
evaluation points and best-dev selection) without the I/O: the whole run,
from initialisation to the test accuracy of the best-dev parameters, is one
pure function of (init key, threshold), which is vmapped over the grid. The
threshold enters the clipper as a traced value.

    python -m experiments.sweep --config=experiments/configs/explosion.py \
        --clippers=none,global_norm --thresholds=0.5,1,5,20 --seeds=0,1,2 --out=results/sweep.json
"""

from __future__ import annotations

import copy
import itertools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import data as data_lib
from experiments import optim, train

TRACE_KEYS = (
    "loss",
    "grad_norm",
    "grad_norm/rnn/W",
    "grad_norm/rnn/U",
    "grad_norm/rnn/b",
    "clipped_grad_norm/rnn/W",
    "clipped_grad_norm/rnn/U",
    "clipped_grad_norm/rnn/b",
)


def make_run(config, clip_name: str):
  """run(key, threshold) -> dict of per-run results, a pure function of its inputs.

  The run is `train`'s loop without the I/O: the same segment function (every
  segment `train.segment_length` long, only its first `count` steps taken), the
  same evaluation after each point and the same best-dev rule. The segments
  are one ``lax.scan`` over the evaluation points, so the program's size does
  not grow with their number.
  """
  config = copy.deepcopy(config)
  config.clip.name = clip_name
  splits = train.load_splits(config)
  train_batches = data_lib.batches(splits["train"], config.batch_size)
  total = config.num_epochs * train_batches[0].shape[0]
  points = train.eval_points(total, config.eval_every)
  length = train.segment_length(points)
  starts = np.asarray([0] + [p + 1 for p in points[:-1]], np.int32)
  counts = np.asarray(points, np.int32) - starts + 1
  # Where each step's metrics sit in the (points, length) grid of segment outputs.
  taken = np.concatenate([i * length + np.arange(c) for i, c in enumerate(counts)])
  model = train.model_from_config(config)
  x0 = jnp.asarray(splits["train"].x[:1])
  # The diagnostics' probe: the first training minibatch (a full one).
  probe_x, probe_y = jnp.asarray(train_batches[0][0]), jnp.asarray(train_batches[1][0])

  def run(key, threshold):
    params = model.init(key, x0)["params"]
    flow_start = train.grad_flow(params, model, probe_x, probe_y)
    opt = optim.make_optimizer(config, threshold=threshold)
    segment = train.make_segment_fn(model, opt, config.loss_reduction)
    batches = tuple(jnp.asarray(a) for a in train_batches)

    def to_next_point(carry, start_and_count):
      params, opt_state, best_dev, best_test = carry
      start, count = start_and_count
      ids = start + jnp.arange(length, dtype=jnp.int32)
      params, opt_state, metrics = segment(params, opt_state, ids, batches, count)
      dev_acc, _ = train.evaluate(params, model, splits["dev"])
      test_acc, _ = train.evaluate(params, model, splits["test"])
      better = train.improves(dev_acc, best_dev)
      best_dev = jnp.where(better, dev_acc, best_dev)
      best_test = jnp.where(better, test_acc, best_test)
      traces = {k: metrics[k] for k in TRACE_KEYS if k in metrics}
      # Diagnostics at every evaluation point: ||dL/dh_t|| over the time steps
      # (summed loss, first minibatch) and the SRN's recurrent matrix.
      at_point = {"grad_flow": train.grad_flow(params, model, probe_x, probe_y)}
      u = params.get("rnn", {}).get("U")
      if u is not None and u.ndim == 2 and u.shape[0] == u.shape[1]:
        at_point["U"] = u
      return (params, opt_state, best_dev, best_test), (dev_acc, traces, at_point)

    init = (params, opt.init(params), jnp.float32(-1), jnp.float32(0))
    (_, _, best_dev, best_test), (dev_curve, traces, at_points) = jax.lax.scan(
        to_next_point, init, (jnp.asarray(starts), jnp.asarray(counts))
    )
    out = {
        "best_dev_accuracy": best_dev,
        "test_accuracy": best_test,
        "final_dev_accuracy": dev_curve[-1],
        "dev_curve": dev_curve,
        # (points + 1, T): at initialisation, then after each evaluation point.
        "grad_flow": jnp.concatenate([flow_start[None], at_points["grad_flow"]]),
    }
    if "U" in at_points:  # (points, h, h): spectral radii are computed on the host
      out["U"] = at_points["U"]
    out.update({k: v.reshape(-1)[taken] for k, v in traces.items()})
    return out

  return run, total


def batched(run, batch_size: int | None = None):
  """jit(f)(keys, thresholds) running `run` over the grid as one program.

  batch_size None: all runs vmapped together (one wide program; on an H100 a
  64-way sweep took 0.03x the time of 64 sequential runs). batch_size b:
  ``lax.map`` over chunks of b vmapped runs, which bounds memory; on the 2-core
  CPU neither form was consistently faster than the other (benchmarks/RESULTS.md).
  """
  if batch_size is None:
    return jax.jit(jax.vmap(run))
  return jax.jit(
      lambda keys, thr: jax.lax.map(lambda a: run(*a), (keys, thr), batch_size=batch_size)
  )


def run_grid(config, clip_name: str, seeds, thresholds, batch_size: int | None = None):
  """Results for every (seed, threshold), shaped (len(seeds), len(thresholds), ...).

  batch_size: see `batched`.
  """
  run, total = make_run(config, clip_name)
  grid = list(itertools.product(seeds, thresholds))
  keys = jnp.stack([jax.random.key(s) for s, _ in grid])
  thr = jnp.asarray([t for _, t in grid], jnp.float32)
  fn = batched(run, batch_size)
  t0 = time.perf_counter()
  with jax.default_matmul_precision(config.matmul_precision):  # traced (and compiled) here
    out = jax.block_until_ready(fn(keys, thr))
  seconds = time.perf_counter() - t0
  shape = (len(seeds), len(thresholds))
  out = {k: np.asarray(v).reshape(shape + v.shape[1:]) for k, v in out.items()}
  return out, {"seconds_including_compile": seconds, "steps_per_run": total, "runs": len(grid)}


def summarize(results, seeds, thresholds, clip_name) -> list[dict]:
  rows = []
  for j, t in enumerate(thresholds):
    acc = results["test_accuracy"][:, j]
    rows.append(
        {
            "clipper": clip_name,
            "threshold": float(t) if clip_name != "none" else None,
            "seeds": list(seeds),
            "test_accuracy": acc.tolist(),
            "test_mean": float(acc.mean()),
            "test_std": float(acc.std()),
            "best_dev_mean": float(results["best_dev_accuracy"][:, j].mean()),
        }
    )
  return rows


FLAGS = flags.FLAGS


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds.split(",")]
  thresholds = [float(t) for t in FLAGS.thresholds.split(",")]
  rows = []
  for name in FLAGS.clippers.split(","):
    thr = thresholds if name != "none" else [0.0]
    res, timing = run_grid(FLAGS.config, name, seeds, thr)
    for row in summarize(res, seeds, thr, name):
      row.update(timing)
      rows.append(row)
      print(json.dumps({k: row[k] for k in ("clipper", "threshold", "test_mean", "test_std")}))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file with get_config().")
  flags.DEFINE_string("clippers", "none,global_norm", "Comma-separated clipper names.")
  flags.DEFINE_string("thresholds", "0.5,1,5,20", "Comma-separated thresholds.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated init seeds.")
  flags.DEFINE_string("out", "", "Where to write the JSON rows.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
