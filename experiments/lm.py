"""A decoder-only Flax NNX language model trained through injected faults, clipped or not.

    python -m experiments.lm --config=experiments/configs/lm.py --workdir=/tmp/lm \
        --config.clip.name=zclip
    python -m experiments.lm --config=experiments/configs/lm.py --workdir=/tmp/lm_cmp \
        --compare=none,global_norm,zclip,skip_spikes --seeds=0,1,2

The first trains one run and writes its per-step rows (loss, learning rate,
fault flag, the clippers' stats) to ``metrics.jsonl`` and TensorBoard event
files through :class:`clipjax.StatsLogger`, and ``summary.json``. The second
trains every clipper x seed and writes ``compare.json``, ``compare.md`` (a
table) and ``compare.png`` (loss curves) to the workdir.

The clippers: ``none`` (AdamW alone), ``global_norm``
(``optax.clip_by_global_norm``, the usual practice), ``zclip``
(:func:`clipjax.zclip`) and ``skip_spikes`` (:func:`clipjax.skip_spikes`
around AdamW, watching the gradient norm and the loss). The model is built and
updated the NNX way: ``nnx.Optimizer(model, optax.chain(clipper, optax.adamw(...)),
wrt=nnx.Param)``.

Runs do not checkpoint: each is seconds to minutes long at the sizes here.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import clipjax

CLIPPERS = ("none", "global_norm", "zclip", "skip_spikes")
CLEAN = "none, no faults"  # compare's reference row
FAULT_KINDS = ("none", "batch", "lr")

# ------------------------------------------------------------------------ data


def markov_source(vocab: int, branching: int, seed: int) -> np.ndarray:
  """An order-2 Markov source: next-token probabilities for every (a, b) context.

  Each context leads to `branching` tokens with random (Dirichlet) weights, so
  the source is learnable but not deterministic. Returns (vocab, vocab, vocab).
  """
  rng = np.random.default_rng(seed)
  probs = np.zeros((vocab, vocab, vocab))
  for a in range(vocab):
    for b in range(vocab):
      nxt = rng.choice(vocab, size=branching, replace=False)
      probs[a, b, nxt] = rng.dirichlet(np.ones(branching))
  return probs


def entropy_rate(probs: np.ndarray, samples: np.ndarray) -> float:
  """The source's conditional entropy (nats/token), averaged over contexts as they occur."""
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=-1)
  return float(np.mean(h[samples[:, :-2], samples[:, 1:-1]]))


def sample(probs: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """`n` sequences of `length` tokens from the source (int32)."""
  vocab = probs.shape[0]
  cum = np.cumsum(probs, axis=-1)
  out = np.zeros((n, length), np.int32)
  out[:, :2] = rng.integers(vocab, size=(n, 2))
  for t in range(2, length):
    u = rng.random(n)[:, None]
    nxt = (u > cum[out[:, t - 2], out[:, t - 1]]).sum(-1)
    out[:, t] = np.minimum(nxt, vocab - 1)
  return out


# ----------------------------------------------------------------------- model


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention and an MLP."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=heads, in_features=width, decode=False, dtype=dtype, rngs=rngs
    )
    self.norm2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(width, mlp_ratio * width, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * width, width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class DecoderLM(nnx.Module):
  """Token + learned position embeddings, `depth` blocks, a final norm and an output head."""

  def __init__(self, config: ml_collections.ConfigDict, dtype: Any, rngs: nnx.Rngs):
    m = config.model
    self.embed = nnx.Embed(config.vocab_size, m.width, dtype=dtype, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.seq_len, m.width)))
    self.blocks = nnx.List(
        [Block(m.width, m.heads, m.mlp_ratio, dtype, rngs) for _ in range(m.depth)]
    )
    self.norm = nnx.LayerNorm(m.width, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(m.width, config.vocab_size, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[: tokens.shape[-1]].astype(self.dtype)
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x)).astype(jnp.float32)  # logits in float32


def compute_dtype(name: str) -> Any:
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# ------------------------------------------------------------------- optimizer


def scale_on_fault(lr_scale: float) -> optax.GradientTransformationExtraArgs:
  """Multiplies the update by `lr_scale` on a step called with ``fault=True`` (an lr spike)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, fault=False, **extra):
    del params, extra
    factor = jnp.where(fault, lr_scale, 1.0)
    return jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_tx(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, o.warmup_steps, config.steps, end_value=o.learning_rate * 0.1
  )
  lr_fault = config.faults.lr_scale if config.faults.kind == "lr" else 1.0
  adamw = [optax.adamw(schedule, weight_decay=o.weight_decay), scale_on_fault(lr_fault)]
  name = config.clip.name
  if name == "none":
    return optax.chain(*adamw)
  if name == "global_norm":
    return optax.chain(optax.clip_by_global_norm(config.clip.max_norm), *adamw)
  if name == "zclip":
    return clipjax.chain(clipjax.zclip(), *adamw)
  if name == "skip_spikes":
    return clipjax.skip_spikes(clipjax.chain(*adamw), use_loss=True)
  raise ValueError(f"clip.name must be one of {CLIPPERS}, got {name!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects bad values before anything runs (one clear error naming the key)."""
  if config.clip.name not in CLIPPERS:
    raise ValueError(f"clip.name must be one of {CLIPPERS}, got {config.clip.name!r}")
  if config.faults.kind not in FAULT_KINDS:
    raise ValueError(f"faults.kind must be one of {FAULT_KINDS}, got {config.faults.kind!r}")
  if config.compute_dtype not in ("auto", "float32", "bfloat16"):
    raise ValueError(f"compute_dtype must be auto, float32 or bfloat16: {config.compute_dtype!r}")
  for key in ("vocab_size", "seq_len", "batch_size", "steps", "log_every", "eval_batches"):
    if int(config[key]) < 1:
      raise ValueError(f"{key} must be >= 1, got {config[key]}")
  if not 1 <= config.branching <= config.vocab_size:
    raise ValueError(f"branching must be in [1, vocab_size], got {config.branching}")
  m = config.model
  if m.width < 1 or m.depth < 1 or m.heads < 1 or m.width % m.heads:
    raise ValueError(
        f"model.width must be a positive multiple of model.heads: {m.width}, {m.heads}"
    )
  if not np.isfinite(config.optimizer.learning_rate) or config.optimizer.learning_rate <= 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}")


# ---------------------------------------------------------------------- training


def loss_fn(model: DecoderLM, tokens: jax.Array, scale: jax.Array) -> jax.Array:
  logits = model(tokens[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return scale * jnp.mean(ce)


@nnx.jit
def train_step(model, optimizer, tokens, scale, fault):
  loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, scale)
  optimizer.update(model, grads, loss=loss, fault=fault)
  return loss


@nnx.jit
def eval_loss(model, tokens):
  return loss_fn(model, tokens, jnp.float32(1.0))


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Trains one run; returns its summary and per-step losses. Writes logs when `workdir` is set."""
  validate(config)
  probs = markov_source(config.vocab_size, config.branching, config.data_seed)
  rng = np.random.default_rng(config.seed + 1000)
  held_out = sample(probs, config.eval_batches * config.batch_size, config.seq_len + 1, rng)
  floor = entropy_rate(probs, held_out)
  dtype = compute_dtype(config.compute_dtype)
  model = DecoderLM(config, dtype, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, make_tx(config), wrt=nnx.Param)
  fault_steps = set(config.faults.steps) if config.faults.kind != "none" else set()

  logger = None
  if workdir is not None:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_best_effort(indent=2))
    for stale in (out / "metrics.jsonl",):
      stale.unlink(missing_ok=True)  # a run starts from step 0: no resume
    logger = clipjax.StatsLogger(
        clipjax.JsonlWriter(out / "metrics.jsonl"),
        clipjax.TensorBoardWriter(out / "tensorboard"),
        every=config.log_every,
    )

  # Every batch drawn up front (one vectorised pass), the faulty ones replaced.
  data = sample(probs, config.steps * config.batch_size, config.seq_len + 1, rng)
  data = data.reshape(config.steps, config.batch_size, config.seq_len + 1)
  scales = np.ones(config.steps, np.float32)
  for s in fault_steps:
    if config.faults.kind == "batch" and s < config.steps:
      data[s] = rng.integers(config.vocab_size, size=data[s].shape, dtype=np.int32)
      scales[s] = config.faults.loss_scale
  # nnx.cached_partial: the graph traversal of model and optimizer done once, not per step.
  step_fn = nnx.cached_partial(train_step, model, optimizer)

  losses = []
  t0 = time.perf_counter()
  for step in range(config.steps):
    fault, scale = step in fault_steps, scales[step]
    loss = step_fn(jnp.asarray(data[step]), jnp.float32(scale), jnp.bool_(fault))
    losses.append(loss / scale)  # on the device: fetched once at the end
    if logger is not None:
      logger.log(step, optimizer.opt_state, loss=loss / scale, fault=fault)
  if logger is not None:
    logger.close()
  losses_np = np.asarray(jax.device_get(losses), np.float64)
  held = jnp.asarray(held_out)
  evals = [
      float(eval_loss(model, held[i : i + config.batch_size]))
      for i in range(0, len(held_out), config.batch_size)
  ]
  summary = {
      "clipper": config.clip.name,
      "seed": config.seed,
      "fault": config.faults.kind,
      "final_eval_loss": float(np.mean(evals)),
      "entropy_rate": floor,
      "finite": bool(np.all(np.isfinite(losses_np))),
      "seconds": time.perf_counter() - t0,
      "backend": jax.default_backend(),
      "compute_dtype": jnp.dtype(dtype).name,
  }
  if workdir is not None:
    (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
  return {**summary, "losses": losses_np}


# ---------------------------------------------------------------------- compare


def smooth(x: np.ndarray, k: int = 9) -> np.ndarray:
  """A centred running median (robust to the fault steps themselves)."""
  pad = np.pad(x, k // 2, mode="edge")
  return np.array([np.median(pad[i : i + k]) for i in range(len(x))])


def compare(
    config: ml_collections.ConfigDict, clippers: Sequence[str], seeds: Sequence[int], workdir: str
) -> list[dict[str, Any]]:
  """Every clipper x seed; writes compare.json, compare.md and compare.png to `workdir`."""
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  # The reference: AdamW alone on the same batches with no fault.
  variants = [(CLEAN, "none", "none")] + [(name, name, config.faults.kind) for name in clippers]
  runs = []
  for label, name, kind in variants:
    for seed in seeds:
      c = config.copy_and_resolve_references()
      c.clip.name, c.faults.kind, c.seed = name, kind, seed
      r = {**train(c), "clipper": label}
      runs.append(r)
      print(f"{label:18s} seed {seed}: final eval loss {r['final_eval_loss']:.4f}", flush=True)
  clippers = [CLEAN, *clippers]
  floor = runs[0]["entropy_rate"]
  faults = sorted(config.faults.steps) if config.faults.kind != "none" else []
  after = faults[-1] + 1 if faults else 0
  rows = []
  for name in clippers:
    mine = [r for r in runs if r["clipper"] == name]
    final = np.array([r["final_eval_loss"] for r in mine])
    curves = np.stack([r["losses"] for r in mine])
    # Train loss over the 50 steps after the last fault, median per step, mean over seeds.
    post = np.mean([np.median(c[after : after + 50]) for c in curves]) if faults else np.nan
    rows.append(
        {
            "clipper": name,
            "final_eval_loss_mean": float(final.mean()),
            "final_eval_loss_std": float(final.std()),
            "excess_over_entropy": float(final.mean() - floor),
            "train_loss_after_faults": float(post),
            "all_finite": all(r["finite"] for r in mine),
            "seeds": list(seeds),
        }
    )
  meta = {
      "fault": config.faults.kind,
      "fault_steps": faults,
      "entropy_rate": floor,
      "steps": config.steps,
      "backend": runs[0]["backend"],
      "compute_dtype": runs[0]["compute_dtype"],
      "device": str(jax.devices()[0].device_kind),
  }
  (out / "compare.json").write_text(
      json.dumps(
          {
              "meta": meta,
              "rows": rows,
              "curves": {f"{r['clipper']}/{r['seed']}": r["losses"].tolist() for r in runs},
          },
          indent=1,
      )
  )
  lines = [
      f"Fault: `{meta['fault']}` at steps {faults}; {config.steps} steps, seeds {list(seeds)}, "
      f"{meta['backend']} ({meta['device']}), {meta['compute_dtype']} activations. "
      f"Source entropy rate (best achievable loss): {floor:.4f} nats/token.",
      "",
      "| clipper | final eval loss (mean +- std) | excess over the entropy rate "
      "| train loss, 50 steps after the last fault | all finite |",
      "|---|---:|---:|---:|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['clipper']} | {r['final_eval_loss_mean']:.4f} +- {r['final_eval_loss_std']:.4f} "
        f"| {r['excess_over_entropy']:.4f} | {r['train_loss_after_faults']:.4f} "
        f"| {r['all_finite']} |"
    )
  (out / "compare.md").write_text("\n".join(lines) + "\n")
  _plot(runs, clippers, faults, floor, out / "compare.png")
  return rows


def _plot(runs, clippers, faults, floor, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, name in enumerate(clippers):
    curves = np.stack([r["losses"] for r in runs if r["clipper"] == name])
    style = {"color": "black", "ls": "-.", "lw": 1.0} if name == CLEAN else {"color": f"C{i}"}
    ax.plot(smooth(np.mean(curves, axis=0)), label=name, **style)
  for s in faults:
    ax.axvline(s, color="grey", lw=0.6, ls=":")
  ax.axhline(floor, color="black", lw=0.8, ls="--", label="entropy rate")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (running median, mean over seeds)")
  ax.set_yscale("log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------- launcher

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  validate(config)
  if FLAGS.compare:
    clippers = FLAGS.compare.split(",")
    for name in clippers:
      if name not in CLIPPERS:
        raise app.UsageError(f"--compare: {name!r} is not one of {CLIPPERS}")
    seeds = [int(s) for s in FLAGS.seeds.split(",")]
    compare(config, clippers, seeds, FLAGS.workdir)
    print((pathlib.Path(FLAGS.workdir) / "compare.md").read_text())
  else:
    summary = train(config, FLAGS.workdir)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().")
  flags.DEFINE_string("workdir", None, "Where the logs (or the comparison) go.")
  flags.DEFINE_string("compare", "", "Comma-separated clippers: run each x --seeds instead.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds for --compare.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
