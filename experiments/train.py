"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The train step is a pure jitted function of (params, opt_state, step index);
steps between two evaluation points run as one ``lax.scan``. Everything the
run needs to continue (params, optimizer state, best-dev params, counters) is
checkpointed with Orbax at every evaluation point, and a run started in a
workdir that has checkpoints resumes from the latest one, bit-identically.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import clipjax
from experiments import data as data_lib
from experiments import models, optim, rundir, validate

# ------------------------------------------------------------------ pure pieces


def model_from_config(config) -> models.SequenceClassifier:
  m = config.model
  vocab = {"digit_sum": 10, "temporal_order": len(data_lib.TEMPORAL_VOCAB), "adding": 0}
  classes = {"digit_sum": 19, "temporal_order": 4, "adding": 1}
  return models.SequenceClassifier(
      cell=m.cell,
      vocab_size=vocab[config.task],
      embed_size=m.embed_size,
      hidden_size=m.hidden_size,
      num_classes=classes[config.task],
      srn_init=m.srn_init,
      freeze_embedding=m.get("freeze_embedding", False),
  )


def is_regression(model: models.SequenceClassifier) -> bool:
  return model.num_classes == 1


def per_example_loss(model, params, x, y, perturb=None):
  out = model.apply({"params": params}, x, perturb)
  if is_regression(model):
    err = out[:, 0] - y
    return err**2, jnp.abs(err) < 0.04  # Hochreiter & Schmidhuber's success criterion
  ce = optax.softmax_cross_entropy_with_integer_labels(out, y)
  return ce, jnp.argmax(out, axis=-1) == y


def batch_loss(params, model, x, y, mask, reduction: str):
  """Summed (the book's reduction='sum') or mean loss over the real examples."""
  losses, _ = per_example_loss(model, params, x, y)
  total = jnp.sum(losses * mask)
  return total if reduction == "sum" else total / jnp.maximum(jnp.sum(mask), 1)


def leaf_names(tree) -> list[str]:
  return [
      "/".join(str(getattr(k, "key", k)) for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def train_step(params, opt_state, batch, *, model, opt, reduction):
  """One update. Returns new params, state and this step's metrics (a dict of scalars)."""
  x, y, mask = batch
  loss, grads = jax.value_and_grad(batch_loss)(params, model, x, y, mask, reduction)
  updates, opt_state = opt.update(grads, opt_state, params, loss=loss)
  params = optax.apply_updates(params, updates)
  names = leaf_names(grads)
  metrics = {
      "loss": loss,
      "grad_norm": clipjax.global_norm(grads),
      # False once the run has diverged (the driver stops there).
      "params_finite": jnp.all(
          jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
      ),
  }
  grad_norms = jax.tree.leaves(clipjax.leaf_norms(grads))  # overflow-safe
  metrics.update({f"grad_norm/{n}": v for n, v in zip(names, grad_norms)})
  clipped = optax.tree.get(opt_state, "clipped_grad_norms")
  metrics.update({f"clipped_grad_norm/{n}": v for n, v in zip(names, jax.tree.leaves(clipped))})
  metrics.update(clipjax.clip_stats(opt_state, prefix="clip/"))
  return params, opt_state, metrics


def make_segment_fn(model, opt, reduction):
  """f(params, opt_state, step_ids, batches, num_valid=None): the steps in `step_ids`, one lax.scan.

  Step s uses minibatch s % num_batches: the fixed, unshuffled order of the
  book's DataLoader. `batches` is (xs, ys, masks), each with the minibatch
  index first and the example index second. With `num_valid` (an int32
  scalar, traced), only the first `num_valid` steps run; the others leave the
  parameters and state as they are and report zero metrics. Every segment of a
  run can then have one length (`segment_length`), so the segment is compiled
  once per run, and a resumed run runs the same program as an uninterrupted one.
  """

  def segment(params, opt_state, step_ids, batches, num_valid=None):
    xs, ys, masks = batches

    def step(carry, s):
      params, opt_state = carry
      i = s % xs.shape[0]
      params, opt_state, m = train_step(
          params, opt_state, (xs[i], ys[i], masks[i]), model=model, opt=opt, reduction=reduction
      )
      return (params, opt_state), m

    if num_valid is None:
      (params, opt_state), metrics = jax.lax.scan(step, (params, opt_state), step_ids)
      return params, opt_state, metrics

    def body(carry, position_and_step):
      position, s = position_and_step
      metrics_shape = jax.eval_shape(step, carry, s)[1]

      def skip(carry, s):
        del s
        return carry, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), metrics_shape)

      return jax.lax.cond(position < num_valid, step, skip, carry, s)

    positions = jnp.arange(step_ids.shape[0], dtype=jnp.int32)
    (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), (positions, step_ids))
    return params, opt_state, metrics

  return segment


def segment_length(points: Sequence[int]) -> int:
  """The longest run of steps between evaluation points (after step p, for p in `points`)."""
  starts = [0] + [p + 1 for p in points[:-1]]
  return max(end - start + 1 for start, end in zip(starts, points))


def data_parallel_mesh(config) -> jax.sharding.Mesh | None:
  """A 1-D ('data',) mesh over `config.mesh.data` devices (-1: all); None for 1.

  The devices are all of JAX's devices, so after ``jax.distributed.initialize``
  the mesh spans every host. Under ``jit`` the minibatches are split over the
  mesh along the example axis and the parameters and optimizer state are
  replicated: XLA all-reduces the summed loss's gradients, and the clipper's
  global norm needs no axis_name.
  """
  n = config.get("mesh", {}).get("data", 1)
  devices = jax.devices()
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise rundir.ConfigError(
        f"config.mesh.data must be -1 or in [1, {len(devices)}] (devices), got {n}."
    )
  if jax.process_count() > 1 and n != len(devices):
    raise rundir.ConfigError(
        f"config.mesh.data={n}: with {jax.process_count()} processes the mesh must span "
        f"all {len(devices)} devices (mesh.data=-1)."
    )
  if config.batch_size % n:
    raise rundir.ConfigError(
        f"config.batch_size {config.batch_size} must be divisible by mesh.data={n}."
    )
  if n == 1:
    return None
  return jax.sharding.Mesh(np.array(devices[:n]), ("data",))


def place(tree, mesh, spec):
  """Host arrays -> arrays laid out on `mesh` with PartitionSpec `spec` (no mesh: one device).

  Every process holds the same host data (the datasets are generated from a
  fixed seed), so each one fills the shards on its own devices: this works
  unchanged across hosts.
  """
  if mesh is None:
    return jax.tree.map(jnp.asarray, tree)
  sharding = jax.sharding.NamedSharding(mesh, spec)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def evaluate(params, model, split: data_lib.Split):
  """(accuracy, mean per-example loss) on a whole split."""
  return _evaluate(params, jnp.asarray(split.x), jnp.asarray(split.y), model=model)


# Jitted, with the model static: called eagerly, the model's time scan was
# compiled anew at every evaluation point (0.2-0.3 s each on the CPU).
@functools.partial(jax.jit, static_argnames="model")
def _evaluate(params, x, y, *, model):
  losses, correct = per_example_loss(model, params, x, y)
  return jnp.mean(correct.astype(jnp.float32)), jnp.mean(losses)


def grad_flow(params, model, x, y):
  """||dL/dh_t|| for t = 1..T (summed loss over the batch): vanishing vs exploding over BPTT."""
  shape = model.perturbation_shape(x)

  def loss(e):
    losses, _ = per_example_loss(model, params, x, y, e)
    return jnp.sum(losses)

  g = jax.grad(loss)(jnp.zeros(shape, jnp.float32))
  return jnp.sqrt(jnp.sum(g**2, axis=(1, 2)))


def spectral_radius(params) -> float | None:
  """Largest |eigenvalue| of the SRN's recurrent matrix U (None for other cells)."""
  u = params.get("rnn", {}).get("U")
  if u is None or u.shape[0] != u.shape[1]:
    return None
  u = np.asarray(u, np.float64)
  if not np.all(np.isfinite(u)):  # a diverged run: eigvals would raise
    return float("nan")
  return float(np.max(np.abs(np.linalg.eigvals(u))))


def improves(dev_acc, best_dev):
  """The book's runner keeps the parameters of a strictly better dev accuracy."""
  return dev_acc > best_dev


def load_splits(config) -> dict[str, data_lib.Split]:
  return data_lib.make_dataset(
      config.task,
      config.length,
      seed=config.data_seed,
      n_train=config.get("n_train", 0),
      n_eval=config.get("n_eval", 0),
  )


def eval_points(total_steps: int, eval_every: int) -> list[int]:
  """Steps after which the book evaluates: every `eval_every` (not 0) and the last."""
  pts = {s for s in range(eval_every, total_steps, eval_every)} if eval_every > 0 else set()
  return sorted(pts | {total_steps - 1})


# ------------------------------------------------------------------ the driver


class _Writers:
  """metrics.jsonl / eval.jsonl (always) and TensorBoard event files: clipjax's writers."""

  def __init__(
      self, workdir: pathlib.Path, resume_step: int, tensorboard: bool, enabled: bool = True
  ):
    self.train_path = workdir / "metrics.jsonl"
    self.eval_path = workdir / "eval.jsonl"
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    # Rows written after the checkpoint we resume from belong to lost work, and a
    # line cut short by a kill cannot be read: drop both.
    for path in (self.train_path, self.eval_path):
      rundir.truncate_log(path, resume_step)
    # Each write is synced to disk: the logs must survive what the checkpoints survive.
    self.jsonl = {p: clipjax.JsonlWriter(p, fsync=True) for p in (self.train_path, self.eval_path)}
    if tensorboard:
      self.tb = clipjax.TensorBoardWriter(workdir / "tensorboard", purge_step=resume_step or None)

  def write(self, path: pathlib.Path, rows: list[dict]):
    if not self.enabled:
      return
    self.jsonl[path].write(rows)
    if self.tb is not None:
      self.tb.write(rows)

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _to_rows(metrics: dict, first_step: int, n: int) -> list[dict]:
  """The first `n` steps' metrics as log rows (the rest of a segment did not run)."""
  host = jax.device_get(metrics)
  return [{"step": first_step + i, **{k: _py(v[i]) for k, v in host.items()}} for i in range(n)]


def _py(v):
  v = np.asarray(v)
  return (
      bool(v)
      if v.dtype == np.bool_
      else (int(v) if np.issubdtype(v.dtype, np.integer) else float(v))
  )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    allow_changes: Sequence[str] = (),
) -> dict[str, Any]:
  """Trains, evaluates on dev at the book's points, tests the best-dev params.

  Writes to `workdir`: metrics.jsonl (every step), eval.jsonl (every eval
  point: dev accuracy/loss, spectral radius of U, ||dL/dh_t||), TensorBoard
  event files, Orbax checkpoints, and summary.json. Returns the summary.

  The config is validated before anything is written, a workdir serves one
  run (a resume whose config differs fails, except for the keys named in
  `allow_changes`, see :mod:`experiments.rundir`), one launch at a time. A run
  whose parameters become non-finite stops there and reports
  ``status='diverged'`` with the step.

  Raises:
    experiments.rundir.RunError: a bad config value, a config that does not
      match the workdir's, a busy workdir, or no intact checkpoint.
  """
  validate.validate_config(config)
  path = pathlib.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0  # multi-host: one process writes the logs
  with (
      rundir.locked(path) if lead else contextlib.nullcontext(),
      jax.default_matmul_precision(config.matmul_precision),
  ):
    return _train_and_evaluate(config, path, lead, allow_changes)


def _train_and_evaluate(
    config, workdir: pathlib.Path, lead: bool, allow_changes: Sequence[str]
) -> dict[str, Any]:
  checkpoints = rundir.Checkpoints(workdir, lead=lead)
  changes = rundir.check_config(
      workdir, config, resuming=checkpoints.has_any(), allow_changes=allow_changes
  )
  mesh = data_parallel_mesh(config)
  P = jax.sharding.PartitionSpec
  splits = load_splits(config)
  train_batches = data_lib.batches(splits["train"], config.batch_size)
  steps_per_epoch = train_batches[0].shape[0]
  total_steps = config.num_epochs * steps_per_epoch
  points = eval_points(total_steps, config.eval_every)
  length = segment_length(points)
  batches = place(train_batches, mesh, P(None, "data"))
  held_out = {
      k: data_lib.Split(*place((v.x, v.y), mesh, P())) for k, v in splits.items() if k != "train"
  }

  model = model_from_config(config)
  opt = optim.make_optimizer(config)
  # Laid out on the mesh before restoring, so that Orbax restores to that layout.
  state = place(_initial_state(config, model, opt, splits), mesh, P())
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    state = restored
  start = int(state.step)
  if start > total_steps:
    raise rundir.ConfigError(
        f"config.num_epochs={config.num_epochs} gives {total_steps} steps, but the run in "
        f"{workdir} is already at step {start}; num_epochs can only grow."
    )
  if lead:  # only now: a refused launch leaves the workdir as it was
    rundir.write_config(workdir, config, changes)
  writers = _Writers(workdir, start, config.get("tensorboard", True), enabled=lead)

  segment = jax.jit(make_segment_fn(model, opt, config.loss_reduction), donate_argnums=(0, 1))
  probe = place((train_batches[0][0], train_batches[1][0]), mesh, P())
  flow = jax.jit(functools.partial(grad_flow, model=model))
  halt_after = config.get("halt_after_step", -1)

  diverged = int(state.diverged_step)
  bar = _progress(config, total_steps, start) if lead and diverged < 0 else None
  t0 = time.perf_counter()
  params, opt_state = state.params, state.opt_state
  for end in points:
    if end < start or diverged >= 0:
      continue
    # Every segment has the run's longest length (one compiled program); only
    # the steps up to `end` run.
    ids = jnp.arange(start, start + length, dtype=jnp.int32)
    count = end - start + 1
    params, opt_state, metrics = segment(params, opt_state, ids, batches, jnp.int32(count))
    rows = _to_rows(metrics, start, count)
    writers.write(writers.train_path, rows)
    bad = [r["step"] for r in rows if not r["params_finite"]]
    if bad:  # non-finite parameters: nothing after this step can recover
      diverged = bad[0]
      state = state._replace(**place({"diverged_step": np.int32(diverged)}, mesh, P()))
    dev_acc, dev_loss = (float(v) for v in evaluate(params, model, held_out["dev"]))
    row = {
        "step": end,
        "epoch": end // steps_per_epoch,
        "dev_accuracy": dev_acc,
        "dev_loss": dev_loss,
        "grad_flow": [float(v) for v in flow(params, x=probe[0], y=probe[1])],
    }
    rho = spectral_radius(params)
    if rho is not None:
      row["spectral_radius_U"] = rho
    writers.write(writers.eval_path, [row])
    # Never parameters that are not finite.
    if diverged < 0 and improves(dev_acc, float(state.best_dev)):
      # Host scalars go onto the mesh too: a multi-host checkpoint holds global arrays only.
      state = state._replace(
          best_params=jax.tree.map(jnp.copy, params),
          **place({"best_dev": np.float32(dev_acc), "best_step": np.int32(end)}, mesh, P()),
      )
    state = state._replace(
        params=params, opt_state=opt_state, **place({"step": np.int32(end + 1)}, mesh, P())
    )
    checkpoints.save(end + 1, state)
    if bar is not None:
      bar.update(end + 1 - start)
      bar.set_postfix(loss=f"{rows[-1]['loss']:.4g}", dev=f"{dev_acc:.3f}")
    start = end + 1
    if 0 <= halt_after <= end:  # simulate a killed run (tests of resume)
      break
  checkpoints.wait()
  if bar is not None:
    bar.close()
  writers.close()

  finished = start >= total_steps or diverged >= 0
  test_acc, test_loss = (float(v) for v in evaluate(state.best_params, model, held_out["test"]))
  summary = {
      "finished": finished,
      "status": ("diverged" if diverged >= 0 else "finished" if finished else "stopped"),
      "diverged_at_step": diverged if diverged >= 0 else None,
      "steps": start,
      "total_steps": total_steps,
      "best_dev_accuracy": float(state.best_dev),
      "best_step": int(state.best_step),
      "test_accuracy": test_acc,
      "test_loss": test_loss,
      "final_dev_accuracy": float(evaluate(params, model, held_out["dev"])[0]),
      "seconds": time.perf_counter() - t0,
      "data_parallel_devices": 1 if mesh is None else mesh.size,
  }
  if finished and lead:
    rundir.atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
  return summary


def _progress(config, total, start):
  if not config.get("progress", True):
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=start, unit="step", leave=False)


class TrainState(NamedTuple):
  """Everything a run checkpoints. The counters are scalar arrays (-1: none yet)."""

  params: Any
  opt_state: Any
  best_params: Any  # the parameters with the best dev accuracy so far
  best_dev: jax.Array  # float32
  best_step: jax.Array  # int32
  step: jax.Array  # int32, the next step to run
  diverged_step: jax.Array  # int32, the first step whose parameters were not finite


def _initial_state(config, model, opt, splits) -> TrainState:
  """Everything a run checkpoints, freshly initialised."""
  # Jitted: run eagerly, the initialisers and the optimizer's init compiled about
  # 170 small programs (5-6 s per run on the CPU, before the first step). The
  # values are the same bits.
  x0 = jnp.asarray(splits["train"].x[:1])
  params = jax.jit(lambda key: model.init(key, x0)["params"])(jax.random.key(config.seed))
  # best_params must not alias params: the segment donates its inputs.
  return TrainState(
      params=params,
      opt_state=jax.jit(opt.init)(params),
      best_params=jax.tree.map(jnp.copy, params),
      best_dev=jnp.float32(-1.0),
      best_step=jnp.int32(-1),
      step=jnp.int32(0),
      diverged_step=jnp.int32(-1),
  )


def restore_latest(config, workdir: str) -> TrainState:
  """The latest intact checkpoint in `workdir` (params, opt_state, best_params, counters)."""
  splits = load_splits(config)
  model = model_from_config(config)
  opt = optim.make_optimizer(config)
  # Only the structure, shapes and dtypes are needed: nothing is computed.
  like = jax.eval_shape(lambda: _initial_state(config, model, opt, splits))
  state = rundir.Checkpoints(pathlib.Path(workdir)).restore_latest(like)
  if state is None:
    raise rundir.WorkdirError(f"no checkpoint in {workdir}.")
  return state
