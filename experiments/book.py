"""The book's own settings (issue 15): both initialisations, per-tensor vs global
clipping, the threshold x learning-rate map, and memory by length at 500 epochs.

Run through ``experiments.report`` (one command per study; every grid's results
are cached under ``OUTDIR/_grids``, so an interrupted run resumes where it
stopped and a finished one only rewrites the report):

    python -m experiments.report --profile=book --outdir=docs/book
    python -m experiments.report --profile=book_memory --outdir=docs/book

Every table gives the mean over seeds with a 95% Student-t interval, and names
the commit, the machine and the matmul precision.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Callable

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import sweep  # noqa: E402
from experiments.configs import adding, explosion, memory, temporal_order  # noqa: E402

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (n - 1).
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    19: 2.093,
    24: 2.064,
    29: 2.045,
}

# A step whose W, U and b gradients all have norm below this is "dead" (the tanh
# units are saturated and nothing flows back): the book's symptom.
DEAD = 1e-4


def interval(values) -> tuple[float, float]:
  """(mean, half-width of the 95% Student-t interval) over seeds."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float(v.mean()), float("nan")
  df = v.size - 1
  # An absent df takes the next smaller one's quantile (a wider interval).
  t = 1.96 if df >= 30 else _T975.get(df, _T975[max(k for k in _T975 if k <= df)])
  return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(v.size))


def fmt(values, digits: int = 3) -> str:
  m, h = interval(values)
  return f"{m:.{digits}f} ± {h:.{digits}f}"


def spectral_radius(u: np.ndarray) -> np.ndarray:
  """Largest |eigenvalue| of each trailing square matrix (NaN where not finite)."""
  u = np.asarray(u, np.float64)
  flat = u.reshape(-1, *u.shape[-2:])
  out = np.full(flat.shape[0], np.nan)
  ok = np.all(np.isfinite(flat), axis=(1, 2))
  if ok.any():
    out[ok] = np.max(np.abs(np.linalg.eigvals(flat[ok])), axis=-1)
  return out.reshape(u.shape[:-2])


@functools.cache
def provenance() -> str:
  """The commit, the machine and the backend, for every table's header.

  Read once per process, at its first grid: the code that runs is what was
  imported then, whatever is edited afterwards.
  """
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "experiments", "clipjax"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    commit += " (with uncommitted changes)" if dirty else ""
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (
      f"commit {commit}; {platform.node() or 'host'}: {dev.platform} ({kind}), "
      f"{os.cpu_count()} CPU cores, jax {jax.__version__}"
  )


# The provenance of every grid a report read (a resumed study may span commits),
# and the seconds their computation took.
_SOURCES: set[str] = set()
_SECONDS: list[float] = []


def cached_grid(
    outdir: pathlib.Path, key: str, compute: Callable[[], dict], grid: dict | None = None
) -> dict:
  """A grid's results from OUTDIR/_grids/KEY.npz, computed and saved if absent.

  Each grid records the commit and machine that computed it (`provenance`) and
  what it was run over (`grid`: seeds, thresholds, overrides); a cached grid
  run over something else is an error, not a silently wrong table.
  """
  path = outdir / "_grids" / f"{key}.npz"
  spec = json.dumps(grid or {}, sort_keys=True)
  if path.exists():
    with np.load(path) as f:
      res = {k: f[k] for k in f.files}
    if "grid" in res and str(res["grid"]) != spec:
      raise ValueError(
          f"{path} was computed over {res['grid']}, not {spec}: delete it (or use another "
          "--outdir) to recompute it."
      )
    _SOURCES.add(str(res["provenance"]))
    _SECONDS.append(float(res["seconds"]))
    return res
  path.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  res = compute()
  res["seconds"] = np.float64(time.perf_counter() - t0)
  res["provenance"] = np.asarray(provenance())
  res["grid"] = np.asarray(spec)
  _SOURCES.add(str(res["provenance"]))
  tmp = path.with_suffix(".tmp.npz")
  np.savez_compressed(tmp, **res)
  os.replace(tmp, path)  # a grid is either complete on disk or absent
  _SECONDS.append(float(res["seconds"]))
  print(f"  {key}: {float(res['seconds']):.0f} s", flush=True)
  return res


def _config(module, profile: dict, **fields):
  """module.get_config() with the profile's `overrides` (tests shrink runs) and `fields`."""
  c = module.get_config()
  for key, value in {**profile.get("overrides", {}), **fields}.items():
    *path, last = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  return c


def _cached_sweep(
    outdir: pathlib.Path, key: str, profile: dict, config, clipper: str, seeds, thresholds
) -> dict:
  """One sweep (clipper x thresholds x seeds), from the cache when it was run before."""
  grid = {
      "seeds": list(seeds),
      "thresholds": [float(t) for t in thresholds],
      "overrides": profile.get("overrides", {}),
  }
  return cached_grid(
      outdir,
      key,
      lambda: sweep.run_grid(copy.deepcopy(config), clipper, seeds, thresholds)[0],
      grid,
  )


def dead_fraction(res: dict) -> np.ndarray:
  """(seeds, thresholds): the fraction of steps with every W, U, b gradient norm < DEAD."""
  norms = np.stack([res[f"grad_norm/rnn/{k}"] for k in ("W", "U", "b")])
  return np.mean(np.max(norms, axis=0) < DEAD, axis=-1)


def flow_ratio(res: dict, point: int) -> np.ndarray:
  """||dL/dh_1|| / ||dL/dh_T|| at one diagnostic point (0: initialisation, -1: the end)."""
  flow = np.asarray(res["grad_flow"], np.float64)[..., point, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    return flow[..., 0] / flow[..., -1]


def _rows(res: dict, clipper: str, thresholds, **fields) -> list[dict]:
  dead = dead_fraction(res) if "grad_norm/rnn/W" in res else None
  rho = spectral_radius(res["U"][..., -1, :, :]) if "U" in res else None
  start, end = flow_ratio(res, 0), flow_ratio(res, -1)
  rows = []
  for j, t in enumerate(thresholds):
    row = {
        "clipper": clipper,
        "threshold": None if clipper == "none" else float(t),
        "test_accuracy": res["test_accuracy"][:, j].tolist(),
        "flow_ratio_start": start[:, j].tolist(),
        "flow_ratio_end": end[:, j].tolist(),
        **fields,
    }
    if dead is not None:
      row["dead_fraction"] = dead[:, j].tolist()
    if rho is not None:
      row["spectral_radius_end"] = rho[:, j].tolist()
    rows.append(row)
  return rows


# ------------------------------------------------------------------ items 1 and 2

_FROZEN = "frozen (as in the seed's PyTorch)"


def explosion_rows(profile: dict, outdir: pathlib.Path) -> list[dict]:
  """Both initialisations x epochs x (no clip, global norm, per-tensor norm) x seeds."""
  rows = []
  for init in profile["inits"]:
    for frozen in profile["freeze"]:
      for epochs in profile["epochs"] if not frozen else profile["freeze_epochs"]:
        c = _config(
            explosion,
            profile,
            **{"model.srn_init": init, "num_epochs": epochs, "model.freeze_embedding": frozen},
        )
        grids = [
            ("none", [0.0]),
            ("global_norm", profile["global_norm"]),
            ("norm", profile["norm"]),
        ]
        for clipper, thresholds in grids:
          key = f"explosion_{init}_{'frozen' if frozen else 'trained'}_{epochs}_{clipper}"
          res = _cached_sweep(outdir, key, profile, c, clipper, profile["seeds"], thresholds)
          rows += _rows(res, clipper, thresholds, init=init, frozen=frozen, epochs=epochs)
  return rows


def _label(r: dict) -> str:
  if r["clipper"] == "none":
    return "none"
  name = {"global_norm": "clip_by_global_norm", "norm": "clip_by_norm (per tensor)"}
  return f"{name.get(r['clipper'], r['clipper'])}({r['threshold']:g})"


def explosion_tables(rows: list[dict], profile: dict) -> list[str]:
  lines = []
  for frozen in profile["freeze"]:
    epochs_list = profile["epochs"] if not frozen else profile["freeze_epochs"]
    for epochs in epochs_list:
      sel = [r for r in rows if r["epochs"] == epochs and r["frozen"] == frozen]
      lines += [
          f"### {epochs} epochs, embedding {_FROZEN if frozen else 'trained'}",
          "",
          "| clipper | "
          + " | ".join(f"test acc. ({i})" for i in profile["inits"])
          + " | "
          + " | ".join(f"dead steps ({i})" for i in profile["inits"])
          + " |",
          "|---|" + "---:|" * (2 * len(profile["inits"])),
      ]
      zeros = [r for r in sel if r["init"] == profile["inits"][0]]
      for r0 in zeros:
        same = [
            next(r for r in sel if r["init"] == i and _label(r) == _label(r0))
            for i in profile["inits"]
        ]
        acc = " | ".join(fmt(r["test_accuracy"]) for r in same)
        dead = " | ".join(fmt(r["dead_fraction"], 2) for r in same)
        lines.append(f"| {_label(r0)} | {acc} | {dead} |")
      lines.append("")
  return lines


def diagnosis_table(rows: list[dict], profile: dict, epochs: int) -> list[str]:
  """Why the initialisations differ: gradient flow and U's spectral radius, per init."""
  lines = [
      "| init | clipper | ‖dL/dh_1‖ / ‖dL/dh_T‖ at init | same, at the end | "
      "spectral radius of U at the end | dead steps (min / median / max over seeds) |",
      "|---|---|---:|---:|---:|---|",
  ]
  keep = {
      "none",
      "clip_by_global_norm(1)",
      "clip_by_global_norm(20)",
      "clip_by_norm (per tensor)(5)",
  }
  for r in rows:
    if r["epochs"] != epochs or r["frozen"] or _label(r) not in keep:
      continue
    d = np.asarray(r["dead_fraction"])
    lines.append(
        f"| {r['init']} | {_label(r)} | {np.median(r['flow_ratio_start']):.1e} | "
        f"{np.median(r['flow_ratio_end']):.1e} | {fmt(r['spectral_radius_end'], 2)} | "
        f"{d.min():.2f} / {np.median(d):.2f} / {d.max():.2f} |"
    )
  return lines + [""]


def plot_explosion(rows: list[dict], profile: dict, path: pathlib.Path) -> None:
  epochs_list = profile["epochs"]
  fig, axes = plt.subplots(1, len(epochs_list), figsize=(5 * len(epochs_list), 4), sharey=True)
  for ax, epochs in zip(np.atleast_1d(axes), epochs_list):
    for init, color in zip(profile["inits"], ("tab:blue", "tab:orange")):
      for clipper, style in (("global_norm", "o-"), ("norm", "s--")):
        sel = [
            r
            for r in rows
            if r["epochs"] == epochs
            and not r["frozen"]
            and r["init"] == init
            and r["clipper"] == clipper
        ]
        stats = [interval(r["test_accuracy"]) for r in sel]
        ax.errorbar(
            [r["threshold"] for r in sel],
            [m for m, _ in stats],
            yerr=[h for _, h in stats],
            fmt=style,
            color=color,
            capsize=3,
            label=f"{init}, {'global' if clipper == 'global_norm' else 'per tensor'}",
        )
      none = next(
          r
          for r in rows
          if r["epochs"] == epochs
          and not r["frozen"]
          and r["init"] == init
          and r["clipper"] == "none"
      )
      ax.axhline(np.mean(none["test_accuracy"]), linestyle=":", color=color)
    ax.set_xscale("log")
    ax.set_title(f"{epochs} epochs (dotted: no clipping)")
    ax.set_xlabel("threshold")
  np.atleast_1d(axes)[0].set_ylabel("test accuracy (best dev), 95% interval")
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------ item 3


def lr_map_rows(profile: dict, outdir: pathlib.Path) -> list[dict]:
  rows = []
  for reduction in profile["map_reductions"]:
    for lr in profile["map_lrs"]:
      c = _config(
          explosion,
          profile,
          **{
              "model.srn_init": profile["map_init"],
              "num_epochs": profile["map_epochs"],
              "loss_reduction": reduction,
              "optimizer.learning_rate": lr,
          },
      )
      for clipper, thresholds in (("none", [0.0]), ("global_norm", profile["map_thresholds"])):
        key = f"lrmap_{profile['map_init']}_{reduction}_{lr:g}_{profile['map_epochs']}_{clipper}"
        res = _cached_sweep(outdir, key, profile, c, clipper, profile["map_seeds"], thresholds)
        rows += _rows(res, clipper, thresholds, reduction=reduction, lr=lr)
  return rows


def plot_lr_map(rows: list[dict], profile: dict, path: pathlib.Path) -> None:
  reductions, lrs = profile["map_reductions"], profile["map_lrs"]
  cols = [None, *profile["map_thresholds"]]
  fig, axes = plt.subplots(2, len(reductions), figsize=(6 * len(reductions), 8), squeeze=False)
  for j, reduction in enumerate(reductions):
    for i, (field, title, cmap) in enumerate(
        (("test_accuracy", "test accuracy", "viridis"), ("dead_fraction", "dead steps", "magma"))
    ):
      grid = np.full((len(lrs), len(cols)), np.nan)
      for r in rows:
        if r["reduction"] == reduction:
          grid[lrs.index(r["lr"]), cols.index(r["threshold"])] = np.mean(r[field])
      ax = axes[i, j]
      im = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower", vmin=0)
      for (a, b), v in np.ndenumerate(grid):
        ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
      ax.set_xticks(range(len(cols)), ["none"] + [f"{t:g}" for t in cols[1:]])
      ax.set_yticks(range(len(lrs)), [f"{x:g}" for x in lrs])
      ax.set_xlabel("clip_by_global_norm threshold")
      ax.set_ylabel("SGD learning rate")
      ax.set_title(f"{title}, {reduction} loss")
      fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def lr_map_table(rows: list[dict], profile: dict) -> list[str]:
  cols = [None, *profile["map_thresholds"]]
  lines = []
  for reduction in profile["map_reductions"]:
    lines += [
        f"### {reduction} loss: test accuracy (dead steps)",
        "",
        "| lr | " + " | ".join("none" if t is None else f"{t:g}" for t in cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for lr in profile["map_lrs"]:
      cells = []
      for t in cols:
        r = next(
            r for r in rows if r["reduction"] == reduction and r["lr"] == lr and r["threshold"] == t
        )
        cells.append(f"{fmt(r['test_accuracy'], 2)} ({np.mean(r['dead_fraction']):.2f})")
      lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


# ------------------------------------------------------------------ items 4 and 5


def memory_rows(profile: dict, outdir: pathlib.Path) -> tuple[list[dict], dict[tuple, np.ndarray]]:
  rows: list[dict] = []
  flows: dict[tuple, np.ndarray] = {}
  for cell in profile["memory_cells"]:
    for length in profile["memory_lengths"]:
      c = _config(
          memory,
          profile,
          **{"model.cell": cell, "length": length, "num_epochs": profile["memory_epochs"]},
      )
      for clipper, thr in (("none", [0.0]), ("global_norm", [profile["memory_clip"]])):
        key = f"memory_{cell}_{length}_{profile['memory_epochs']}_{clipper}"
        res = _cached_sweep(outdir, key, profile, c, clipper, profile["memory_seeds"], thr)
        rows += _rows(res, clipper, thr, cell=cell, length=length)
        flows[(cell, length, clipper)] = np.asarray(res["grad_flow"][:, 0], np.float64)
        if "U" in res:
          flows[(cell, length, clipper, "rho")] = spectral_radius(res["U"][:, 0])
  return rows, flows


def _memory_row(rows: list[dict], cell: str, length: int, clipper: str) -> dict:
  return next(
      r for r in rows if r["cell"] == cell and r["length"] == length and r["clipper"] == clipper
  )


def _by_length(lengths: list[int], column: str, body: list[tuple[str, list[str]]]) -> list[str]:
  """A table with a column per length (`column`, formatted with n=length), a row per body entry."""
  lines = [
      "| cell | " + " | ".join(column.format(n=n) for n in lengths) + " |",
      "|---|" + "---:|" * len(lengths),
  ]
  return lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in body] + [""]


def memory_table(rows: list[dict], profile: dict) -> list[str]:
  lengths = profile["memory_lengths"]
  body = []
  for cell in profile["memory_cells"]:
    for clipper in ("none", "global_norm"):
      cells = [fmt(_memory_row(rows, cell, n, clipper)["test_accuracy"], 2) for n in lengths]
      label = cell + ("" if clipper == "none" else f" + clip({profile['memory_clip']:g})")
      body.append((label, cells))
  return _by_length(lengths, "L={n}", body)


def memory_flow_table(rows: list[dict], profile: dict) -> list[str]:
  """Median over seeds of ||dL/dh_1|| / ||dL/dh_T|| at initialisation and at the end."""
  lengths = profile["memory_lengths"]

  def ratios(r: dict) -> str:
    return f"{np.median(r['flow_ratio_start']):.0e} / {np.median(r['flow_ratio_end']):.0e}"

  body = [
      (cell, [ratios(_memory_row(rows, cell, n, "none")) for n in lengths])
      for cell in profile["memory_cells"]
  ]
  return _by_length(lengths, "L={n}: init / end", body)


def plot_memory_flow(flows: dict, profile: dict, path: pathlib.Path) -> None:
  """Per cell: ||dL/dh_t|| against t at the start, middle and end of training."""
  cells, lengths = profile["memory_cells"], profile["memory_lengths"]
  fig, axes = plt.subplots(1, len(cells) + 1, figsize=(5 * (len(cells) + 1), 4))
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(lengths)))
  for ax, cell in zip(axes, cells):
    for length, color in zip(lengths, colors):
      flow = flows[(cell, length, "none")]  # (seeds, points, T)
      mid = flow.shape[1] // 2
      for point, style, name in ((0, ":", "start"), (mid, "--", "middle"), (-1, "-", "end")):
        curve = np.exp(np.mean(np.log(np.maximum(flow[:, point], 1e-30)), axis=0))
        ax.plot(
            np.arange(1, length + 1),
            curve,
            style,
            color=color,
            label=f"L={length}" if name == "end" else None,
        )
    ax.set_yscale("log")
    ax.set_title(f"{cell}: ||dL/dh_t|| (dotted: start, dashed: middle, solid: end)", fontsize=8)
    ax.set_xlabel("time step t")
  axes[0].set_ylabel("geometric mean over seeds (no clipping)")
  axes[0].legend(fontsize=7)
  ax = axes[-1]
  for length, color in zip(lengths, colors):
    rho = flows.get(("srn", length, "none", "rho"))
    if rho is not None:
      ax.plot(np.nanmedian(rho, axis=0), color=color, label=f"L={length}")
  ax.set_title("SRN: spectral radius of U (median over seeds)", fontsize=8)
  ax.set_xlabel("evaluation point")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------ the long-range tasks

TASKS = {"adding": adding, "temporal_order": temporal_order}


def task_rows(profile: dict, outdir: pathlib.Path) -> list[dict]:
  """The adding and temporal-order problems at their configs, with and without clipping."""
  rows = []
  for task in profile["tasks"]:
    module = TASKS[task]
    for cell in profile["task_cells"]:
      c = _config(module, profile, **{"model.cell": cell})
      for clipper, thr in (("none", [0.0]), ("global_norm", [profile["task_clip"]])):
        key = f"task_{task}_{cell}_{c.length}_{c.num_epochs}_{clipper}"
        res = _cached_sweep(outdir, key, profile, c, clipper, profile["task_seeds"], thr)
        rows += _rows(res, clipper, thr, task=task, cell=cell, length=c.length)
  return rows


def task_table(rows: list[dict], profile: dict) -> list[str]:
  lines = [
      "| task (length) | cell | no clipping | clip_by_global_norm" f"({profile['task_clip']:g}) |",
      "|---|---|---:|---:|",
  ]
  for task in profile["tasks"]:
    for cell in profile["task_cells"]:
      sel = {r["clipper"]: r for r in rows if r["task"] == task and r["cell"] == cell}
      acc = [fmt(sel[k]["test_accuracy"], 2) for k in ("none", "global_norm")]
      lines.append(f"| {task} ({sel['none']['length']}) | {cell} | {acc[0]} | {acc[1]} |")
  return lines + [""]


def _task_setup(profile: dict) -> str:
  parts = []
  for task in profile["tasks"]:
    c = TASKS[task].get_config()
    parts.append(
        f"{task}: length {c.length}, {c.n_train} training sequences, {c.optimizer.name} lr "
        f"{c.optimizer.learning_rate:g}, batch {c.batch_size}, {c.loss_reduction} loss, "
        f"{c.num_epochs} epochs"
    )
  return "; ".join(parts)


# ------------------------------------------------------------------ the reports


def _header(title: str, profile: dict, outdir: pathlib.Path, t0: float) -> list[str]:
  """A report's title and how it was made: command, precision, time, the grids' sources."""
  precision = explosion.get_config().matmul_precision
  return [
      f"# {title}",
      "",
      f"Generated by `python -m experiments.report --profile={profile['name']} "
      f"--outdir={outdir}` (matmul precision `{precision}`, full float32). Its "
      f"{len(_SECONDS)} grids took {sum(_SECONDS) / 60:.0f} min to compute (cached in "
      f"`_grids/`; this report: {time.perf_counter() - t0:.0f} s), by: "
      + "; ".join(sorted(_SOURCES))
      + ".",
      "",
  ]


def write_explosion_report(profile: dict, outdir: pathlib.Path, name: str) -> None:
  t0 = time.perf_counter()
  figdir = outdir / "figures"
  figdir.mkdir(parents=True, exist_ok=True)
  print("1/2 explosion sweeps: both initialisations, global and per-tensor clipping", flush=True)
  rows = explosion_rows(profile, outdir)
  plot_explosion(rows, profile, figdir / "book_explosion.png")
  print("2/2 threshold x learning-rate map", flush=True)
  map_rows = lr_map_rows(profile, outdir)
  plot_lr_map(map_rows, profile, figdir / "book_lr_map.png")
  (outdir / "book_results.json").write_text(json.dumps(rows + map_rows))
  seeds = profile["seeds"]
  text = [
      *_header(
          "The book's settings: initialisations, per-tensor clipping, the threshold x lr map",
          profile,
          outdir,
          t0,
      ),
      "Setup: the book's explosion experiment (SRN on digit sum, length 20, 300 train / 100 "
      "dev / 100 test, SGD lr 0.2, batch 64 unshuffled, summed cross-entropy, dev evaluation "
      "every 100 steps, test accuracy of the best-dev parameters). Seeds "
      f"{seeds[0]}..{seeds[-1]} ({len(seeds)}) vary the model initialisation. Every cell: "
      "mean ± half-width of the 95% Student-t interval over seeds. Dead steps: the fraction of "
      f"steps whose W, U and b gradients all have norm < {DEAD:g}. `zeros`: W, U, b = 0 (the "
      "seed's PyTorch code); `xavier`: Xavier-uniform W, U, b (Paddle's default, the book's).",
      "",
      "Each grid (one clipper, its thresholds x the seeds) is one vmapped program "
      "(`experiments.sweep`). That pays on an accelerator (a 64-way sweep took 0.03x the "
      "time of 64 sequential runs on an H100) and is about even with sequential runs on a "
      '2-core CPU (1.01x-1.09x; benchmarks/RESULTS.md, "Sweep scaling").',
      "",
      "**One seed is not a result.** The explosion is chaotic: the same seed run alone "
      "(`train_and_evaluate`) and inside a vmapped sweep agrees to float32 rounding for "
      "three steps (W's gradient norm 20.743149 vs 20.743141 at step 2), the fourth step's "
      "gradient of norm 750 amplifies the rounding difference to 3e-3 (9.0672 vs 9.0947 at "
      "step 4), and the runs part: seed 0 without clipping at 50 epochs ends at 0.09 test "
      "accuracy run alone, 0.06 in a sweep of one seed and 0.09 in a sweep of three (the "
      "vmapped matmuls round differently with the batch width). This is why the logged run "
      "and the sweep of `docs/experiments.md` disagree for one seed, and why every number "
      "here is a distribution over seeds.",
      "",
      "## Both initialisations, global and per-tensor clipping",
      "",
      *explosion_tables(rows, profile),
      "![test accuracy by threshold](figures/book_explosion.png)",
      "",
      "### Gradient flow and saturation (trained embedding)",
      "",
      "Medians over seeds of ‖dL/dh_1‖ / ‖dL/dh_T‖ (how much of the loss's gradient reaches "
      "the first time step; first training minibatch), with U's spectral radius after the "
      "last step and the distribution of dead steps over seeds.",
      "",
      *[
          line
          for epochs in profile["epochs"]
          for line in [f"{epochs} epochs:", "", *diagnosis_table(rows, profile, epochs)]
      ],
      f"## Threshold x learning rate ({profile['map_init']} init, {profile['map_epochs']} "
      f"epochs, seeds 0..{len(profile['map_seeds']) - 1})",
      "",
      *lr_map_table(map_rows, profile),
      "![threshold x learning rate](figures/book_lr_map.png)",
      "",
  ]
  (outdir / name).write_text("\n".join(text))
  print(f"wrote {outdir / name}")


def write_memory_report(profile: dict, outdir: pathlib.Path, name: str) -> None:
  t0 = time.perf_counter()
  figdir = outdir / "figures"
  figdir.mkdir(parents=True, exist_ok=True)
  rows, flows = memory_rows(profile, outdir)
  plot_memory_flow(flows, profile, figdir / "book_memory_flow.png")
  tasks = task_rows(profile, outdir) if profile.get("tasks") else []
  (outdir / "book_memory_results.json").write_text(json.dumps(rows + tasks))
  seeds = profile["memory_seeds"]
  text = [
      *_header("Memory by length at the book's settings: SRN vs LSTM vs GRU", profile, outdir, t0),
      f"Digit sum; Adam lr 1e-3, batch 8, mean cross-entropy, {profile['memory_epochs']} epochs "
      f"(the book's); seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}); test accuracy of the best-dev "
      "parameters, mean ± 95% Student-t half-width; clipping = "
      f"clip_by_global_norm({profile['memory_clip']:g}).",
      "",
      *memory_table(rows, profile),
      "How much of the gradient reaches the first time step, ‖dL/dh_1‖ / ‖dL/dh_T‖ "
      "(median over seeds, no clipping, first training minibatch), at initialisation and "
      "after the last step:",
      "",
      *memory_flow_table(rows, profile),
      "![gradient flow by cell and length](figures/book_memory_flow.png)",
      "",
  ]
  if tasks:
    seeds = profile["task_seeds"]
    text += [
        "## The long-range tasks: adding and temporal order",
        "",
        f"{_task_setup(profile)}. Seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}); test "
        "accuracy of the best-dev parameters (adding: the fraction of sequences predicted "
        "within 0.04, Hochreiter & Schmidhuber's criterion), mean ± 95% Student-t half-width.",
        "",
        *task_table(tasks, profile),
    ]
  (outdir / name).write_text("\n".join(text))
  print(f"wrote {outdir / name}")


def run(profile: dict, outdir: pathlib.Path, name: str) -> None:
  if profile.get("book") == "explosion":
    write_explosion_report(profile, outdir, name)
  else:
    write_memory_report(profile, outdir, name)
