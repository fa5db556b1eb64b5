"""Runs the explosion study end to end and writes a markdown report with figures.

    python -m experiments.report --profile=demo --outdir=results   # CPU, minutes
    python -m experiments.report --profile=full --outdir=docs      # docs/experiments.md

1. The book's setup without clipping and with clip_by_global_norm(20), as
   two logged runs (train_and_evaluate): per-step gradient norms of W, U, b,
   ||dL/dh_t|| over BPTT and the spectral radius of U at every evaluation.
2. A sweep (one vmapped program per clipper) over thresholds, the adaptive
   clippers and seeds, at 50 and (full profile) 200 epochs: test accuracy of
   the best-dev parameters, mean +- std over seeds.
3. (full profile) Memory: SRN vs LSTM vs GRU by sequence length, with and
   without clipping.
Every number in the report is computed by this run.
"""

from __future__ import annotations

import copy
import json
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import data, optim, sweep, train  # noqa: E402
from experiments.configs import explosion, memory  # noqa: E402

_BOOK_MEMORY = {
    "book": "memory",
    "memory_cells": ["srn", "lstm", "gru"],
    "memory_lengths": [5, 10, 15, 20, 25, 30, 35],
    "memory_seeds": list(range(8)),
    "memory_epochs": 500,
    "memory_clip": 1.0,
    "tasks": ["adding", "temporal_order"],
    "task_cells": ["srn", "lstm"],
    "task_seeds": list(range(5)),
    "task_clip": 1.0,
}

PROFILES = {
    "demo": {
        "seeds": [0, 1, 2],
        "epochs": [50],
        "thresholds": [0.5, 1.0, 5.0, 20.0],
        "autoclip": [10.0, 50.0],
        "zclip": [2.5],
        "memory": False,
    },
    "full": {
        "seeds": list(range(10)),
        "epochs": [50, 200],
        "thresholds": [0.1, 0.5, 1.0, 5.0, 20.0],
        "autoclip": [10.0, 50.0],
        "zclip": [1.5, 2.5],
        "memory": True,
        "memory_lengths": [10, 20, 30],
        "memory_seeds": [0, 1, 2],
        "memory_epochs": 50,
    },
    # Sweep only, sized for an accelerator: every grid is one vmapped program.
    # The book's settings (issue 15, items 1-3): experiments/book.py.
    "book": {
        "book": "explosion",
        "seeds": list(range(16)),
        "epochs": [50, 200, 1000],
        "inits": ["zeros", "xavier"],
        "global_norm": [0.1, 0.5, 1.0, 2.0, 5.0, 20.0],
        "norm": [1.0, 2.0, 5.0, 10.0],
        "freeze": [False, True],
        "freeze_epochs": [200],
        "map_init": "xavier",
        "map_epochs": 200,
        "map_seeds": list(range(8)),
        "map_thresholds": [0.1, 0.3, 1.0, 3.0, 10.0, 50.0],
        "map_lrs": [0.01, 0.03, 0.1, 0.2, 0.5],
        "map_reductions": ["sum", "mean"],
    },
    # Memory by length at the book's 500 epochs (issue 15, items 4-5): 64 min on
    # the 2-core CPU.
    "book_memory": _BOOK_MEMORY,
    # Three of its lengths (its grids are a subset of book_memory's, reused when
    # both write to one outdir): about 30 min on that CPU.
    "book_memory_cpu": {**_BOOK_MEMORY, "memory_lengths": [10, 20, 35]},
    "accelerator_sweep": {
        "seeds": list(range(16)),
        "epochs": [50, 200, 1000],
        "thresholds": [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0],
        "autoclip": [10.0, 50.0, 90.0],
        "zclip": [1.5, 2.5],
        "memory": False,
        "sweep_only": True,
    },
}


def _read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def logged_runs(outdir: pathlib.Path) -> dict[str, dict]:
  """The no-clip and clip-at-20 runs of the book's setup, fully logged."""
  runs = {}
  for name, clip in (("no clipping", "none"), ("clip_by_global_norm(20)", "global_norm")):
    c = explosion.get_config()
    c.clip.name, c.clip.threshold, c.progress = clip, 20.0, False
    workdir = outdir / "runs" / clip
    summary = train.train_and_evaluate(c, str(workdir))
    runs[name] = {
        "summary": summary,
        "train": _read_jsonl(workdir / "metrics.jsonl"),
        "eval": _read_jsonl(workdir / "eval.jsonl"),
    }
  return runs


def plot_grad_norms(runs, path, keep_steps=None):
  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True)
  for ax, (name, run) in zip(np.atleast_1d(axes), runs.items()):
    rows = run["train"][:keep_steps]
    steps = [r["step"] for r in rows]
    for leaf, style, color in (("W", "*", "b"), ("U", "-.", "tab:pink"), ("b", "--", "y")):
      vals = [max(r[f"grad_norm/rnn/{leaf}"], 1e-12) for r in rows]
      ax.plot(steps, vals, style, color=color, label=f"{leaf}_grad_l2", markersize=3)
    ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.legend(loc="upper right")
  np.atleast_1d(axes)[0].set_ylabel("L2 norm of the gradient (before clipping)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_grad_flow(runs, path):
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for name, run in runs.items():
    for e in run["eval"]:
      flow = np.maximum(np.asarray(e["grad_flow"]), 1e-30)
      axes[0].plot(np.arange(1, len(flow) + 1), flow, label=f"{name}, step {e['step']}", alpha=0.8)
    axes[1].plot(
        [e["step"] for e in run["eval"]],
        [e["spectral_radius_U"] for e in run["eval"]],
        "o-",
        label=name,
    )
  axes[0].set_yscale("log")
  axes[0].set_xlabel("time step t")
  axes[0].set_ylabel("||dL/dh_t|| (first training batch)")
  axes[0].legend(fontsize=7)
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("spectral radius of U")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def explosion_sweeps(profile) -> list[dict]:
  rows = []
  for epochs in profile["epochs"]:
    c = explosion.get_config()
    c.num_epochs = epochs
    grids = [
        ("none", [0.0]),
        ("global_norm", profile["thresholds"]),
        ("autoclip", profile["autoclip"]),
        ("zclip", profile["zclip"]),
    ]
    for name, thresholds in grids:
      res, timing = sweep.run_grid(c, name, profile["seeds"], thresholds)
      for row in sweep.summarize(res, profile["seeds"], thresholds, name):
        row.update(epochs=epochs, **timing)
        rows.append(row)
  return rows


def memory_sweeps(profile) -> list[dict]:
  rows = []
  for cell in ("srn", "lstm", "gru"):
    for length in profile["memory_lengths"]:
      c = memory.get_config()
      c.model.cell, c.length = cell, length
      c.num_epochs = profile.get("memory_epochs", c.num_epochs)
      for name, thr in (("none", [0.0]), ("global_norm", [1.0])):
        res, timing = sweep.run_grid(copy.deepcopy(c), name, profile["memory_seeds"], thr)
        for row in sweep.summarize(res, profile["memory_seeds"], thr, name):
          row.update(cell=cell, length=length, **timing)
          rows.append(row)
  return rows


def plot_threshold_sweep(rows, path):
  fig, ax = plt.subplots(figsize=(6, 4))
  for epochs in sorted({r["epochs"] for r in rows}):
    sel = [r for r in rows if r["epochs"] == epochs and r["clipper"] == "global_norm"]
    ax.errorbar(
        [r["threshold"] for r in sel],
        [r["test_mean"] for r in sel],
        yerr=[r["test_std"] for r in sel],
        marker="o",
        capsize=3,
        label=f"global norm, {epochs} epochs",
    )
    none = [r for r in rows if r["epochs"] == epochs and r["clipper"] == "none"][0]
    ax.axhline(none["test_mean"], linestyle=":", color="gray")
  ax.set_xscale("log")
  ax.set_xlabel("clip threshold (max_norm)")
  ax.set_ylabel("test accuracy (best dev)")
  ax.set_title("dotted: no clipping")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt_threshold(r):
  if r["clipper"] == "none":
    return "-"
  return f"{optim.threshold_arg(r['clipper'])}={r['threshold']:g}"


def sweep_table(rows) -> list[str]:
  lines = [
      "| epochs | clipper | hyperparameter | test acc. mean +- std | best dev mean |",
      "|---:|---|---|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['epochs']} | {r['clipper']} | {_fmt_threshold(r)} | "
        f"{r['test_mean']:.3f} +- {r['test_std']:.3f} | {r['best_dev_mean']:.3f} |"
    )
  return lines


def _precision_note() -> str:
  p = explosion.get_config().matmul_precision
  return f"Matmul precision: `{p}` (config.matmul_precision" + (
      "; full float32 on every backend)." if p == "highest" else "; the backend's choice)."
  )


def write_sweep_markdown(path, rows, profile, seconds, machine):
  lines = [
      "# Explosion setup: clipper and threshold sweep",
      "",
      f"Generated by `python -m experiments.report --profile={profile['name']}` on "
      f"{machine} ({seconds:.0f} s including compilation). The book's setup (SRN, "
      "length 20, SGD lr 0.2, batch 64, summed cross-entropy); seeds "
      f"{profile['seeds'][0]}..{profile['seeds'][-1]} vary the model initialisation; test "
      "accuracy of the best-dev parameters. " + _precision_note(),
      "",
  ]
  lines += sweep_table(rows)
  lines.append("")
  pathlib.Path(path).write_text("\n".join(lines))


def write_markdown(path, figdir_rel, runs, rows, mem_rows, profile, seconds):
  lines = [
      "# The gradient-explosion experiment",
      "",
      "Generated by `python -m experiments.report` "
      f"(profile `{profile['name']}`, {seconds:.0f} s on this machine). "
      "Every number below comes from that run.",
      "",
      "This report uses the zero initialisation of the seed's PyTorch code. At the book's "
      "own settings (Xavier-uniform W, U, b) small thresholds do rescue the model: see "
      "[book.md](book.md).",
      "",
      "Setup (the book's): SRN h_t = tanh(x_t W + h_{t-1} U + b) with W, U, b "
      "zero-initialised, embedding 10->32 (Xavier), linear head to 19 classes; "
      "digit-sum data of length 20 "
      "(300 train / 100 dev / 100 test, NumPy seed 0); SGD lr 0.2, batch 64 without "
      "shuffling, summed cross-entropy; dev evaluation after steps 100, 200, ... and the "
      "last; test accuracy of the best-dev parameters. " + _precision_note(),
      "",
      "The book: " + data.BOOK,
      "",
      "## Two logged runs: no clipping vs clip_by_global_norm(20)",
      "",
      "| run | test acc. | best dev acc. (step) | grad norm step 0 | max grad norm | "
      "steps with all W,U,b grads < 1e-4 |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, run in runs.items():
    s = run["summary"]
    g = [r["grad_norm"] for r in run["train"]]
    dead = sum(all(r[f"grad_norm/rnn/{k}"] < 1e-4 for k in "WUb") for r in run["train"])
    lines.append(
        f"| {name} | {s['test_accuracy']:.2f} | {s['best_dev_accuracy']:.2f} "
        f"({s['best_step']}) | {g[0]:.3g} | {max(g):.3g} | {dead} / {len(g)} |"
    )
  lines += [
      "",
      f"![gradient norms]({figdir_rel}/grad_norms.png)",
      "",
      f"First 40 steps (the book's figure): ![first 40]({figdir_rel}/grad_norms_40.png)",
      "",
      "||dL/dh_t|| across the 20 time steps at each evaluation, and the spectral " "radius of U:",
      "",
      f"![gradient flow]({figdir_rel}/grad_flow.png)",
      "",
      "## Clippers and thresholds",
      "",
      f"Seeds (model initialisation): {profile['seeds']}. Test accuracy of the best-dev "
      "parameters, mean +- std over seeds; chance is about 0.05-0.10.",
      "",
  ] + sweep_table(rows)
  lines += ["", f"![threshold sweep]({figdir_rel}/threshold_sweep.png)", ""]
  if mem_rows:
    lines += [
        "## Memory: SRN vs LSTM vs GRU by length",
        "",
        f"Adam lr 1e-3, batch 8, mean cross-entropy, {profile['memory_epochs']} epochs; "
        "test accuracy of the "
        "best-dev parameters, mean over seeds "
        f"{profile['memory_seeds']}; clipping = clip_by_global_norm(1).",
        "",
        "| cell | " + " | ".join(f"L={n}" for n in profile["memory_lengths"]) + " |",
        "|---|" + "---:|" * len(profile["memory_lengths"]),
    ]
    for cell in ("srn", "lstm", "gru"):
      for clip in ("none", "global_norm"):
        cells = [
            next(
                r
                for r in mem_rows
                if r["cell"] == cell and r["length"] == n and r["clipper"] == clip
            )
            for n in profile["memory_lengths"]
        ]
        label = f"{cell}{' + clip' if clip != 'none' else ''}"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{r['test_mean']:.2f} +- {r['test_std']:.2f}" for r in cells)
            + " |"
        )
    lines.append("")
  pathlib.Path(path).write_text("\n".join(lines))


FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "demo", list(PROFILES), "How much to run.")
flags.DEFINE_string("outdir", "results", "Where the report, figures and runs go.")
flags.DEFINE_string("report_name", "README.md", "File name of the markdown report.")


def main(argv):
  del argv
  # Orbax logs every checkpoint save at INFO through absl: keep the console to progress.
  logging.set_verbosity(logging.WARNING)
  profile = {"name": FLAGS.profile, **PROFILES[FLAGS.profile]}
  outdir = pathlib.Path(FLAGS.outdir)
  figdir = outdir / "figures"
  figdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  if profile.get("book"):
    from experiments import book

    default_name = {"explosion": "book_settings.md", "memory": "book_memory.md"}[profile["book"]]
    name = default_name if FLAGS.report_name == "README.md" else FLAGS.report_name
    book.run(profile, outdir, name)
    return
  if profile.get("sweep_only"):
    import jax

    rows = explosion_sweeps(profile)
    plot_threshold_sweep(rows, figdir / "threshold_sweep_accelerator.png")
    (outdir / "sweep_results_accelerator.json").write_text(json.dumps(rows, indent=2))
    dev = jax.devices()[0]
    write_sweep_markdown(
        outdir / FLAGS.report_name,
        rows,
        profile,
        time.perf_counter() - t0,
        getattr(dev, "device_kind", dev.platform),
    )
    print(f"wrote {outdir / FLAGS.report_name}")
    return
  print("1/3 logged runs (no clipping, clip at 20)", flush=True)
  runs = logged_runs(outdir / "_work" if FLAGS.profile == "full" else outdir)
  plot_grad_norms(runs, figdir / "grad_norms.png")
  plot_grad_norms(runs, figdir / "grad_norms_40.png", keep_steps=40)
  plot_grad_flow(runs, figdir / "grad_flow.png")
  print("2/3 sweeps over clippers, thresholds and seeds", flush=True)
  rows = explosion_sweeps(profile)
  plot_threshold_sweep(rows, figdir / "threshold_sweep.png")
  mem_rows = []
  if profile.get("memory"):
    print("3/3 memory: SRN vs LSTM vs GRU by length", flush=True)
    mem_rows = memory_sweeps(profile)
  (outdir / "sweep_results.json").write_text(json.dumps(rows + mem_rows, indent=2))
  report = outdir / FLAGS.report_name
  write_markdown(report, "figures", runs, rows, mem_rows, profile, time.perf_counter() - t0)
  print(f"wrote {report}")


if __name__ == "__main__":
  app.run(main)
