"""RNN experiment throughput: PyTorch reference loop vs JAX, and sweep scaling.

- `torch`: the source's PyTorch SRN loop (Python loop over time, SGD lr 0.2,
  summed CE, clip_grad_norm_(20)) on the CPU, if torch is installed.
- `jax per-step`: one jitted train step per Python call (our train_step).
- `jax scan`: the training loop as used by experiments.train: 100 steps per
  lax.scan, per-step metrics included.
- sweep scaling: K runs of the full 50-epoch explosion experiment as one
  vmapped program, as one program mapping over the runs in sequence
  (``lax.map``, experiments.sweep's batch_size=1), and as K calls of the
  jitted single-run program (compile time excluded throughout).

    python -m benchmarks.rnn_throughput [--ks 1,8,16,64] [--epochs 50]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from experiments import data as data_lib
from experiments import optim, sweep, train
from experiments.configs import explosion


def torch_steps_per_second(steps: int = 250) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  torch.manual_seed(0)
  nn = torch.nn

  # The book's SRN + Model_RNN4SeqClass, verbatim in structure.
  class SRN(nn.Module):  # type: ignore[name-defined]

    def __init__(self):
      super().__init__()
      self.emb = nn.init.xavier_uniform_(torch.empty(10, 32))
      self.W = nn.Parameter(torch.zeros(32, 32))
      self.U = nn.Parameter(torch.zeros(32, 32))
      self.b = nn.Parameter(torch.zeros(1, 32))
      self.linear = nn.Linear(32, 19)

    def forward(self, x):
      e = self.emb[x]
      h = torch.zeros(x.shape[0], 32)
      for t in range(x.shape[1]):
        h = torch.tanh(e[:, t] @ self.W + h @ self.U + self.b)
      return self.linear(h)

  split = data_lib.nndl_digit_sum(20)["train"]
  xs, ys = torch.as_tensor(split.x).long(), torch.as_tensor(split.y).long()
  model = SRN()
  opt = torch.optim.SGD(model.parameters(), lr=0.2)
  loss_fn = nn.CrossEntropyLoss(reduction="sum")

  def step(i):
    lo = (i % 5) * 64
    loss = loss_fn(model(xs[lo : lo + 64]), ys[lo : lo + 64])
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=20, norm_type=2)
    opt.step()
    opt.zero_grad()

  for i in range(20):
    step(i)
  t0 = time.perf_counter()
  for i in range(steps):
    step(i)
  return steps / (time.perf_counter() - t0)


def _config(epochs):
  c = explosion.get_config()
  c.num_epochs = epochs
  c.clip.name, c.clip.threshold = "global_norm", 20.0
  return c


def jax_steps_per_second(steps: int = 1000) -> tuple[float, float]:
  c = _config(1)
  model = train.model_from_config(c)
  splits = train.load_splits(c)
  batches = data_lib.batches(splits["train"], c.batch_size)
  opt = optim.make_optimizer(c)
  params = model.init(jax.random.key(0), jnp.asarray(splits["train"].x[:1]))["params"]
  state = opt.init(params)
  xs, ys, ms = (jnp.asarray(a) for a in batches)

  step = jax.jit(lambda p, s, b: train.train_step(p, s, b, model=model, opt=opt, reduction="sum"))
  p, s = params, state
  for i in range(10):
    p, s, m = step(p, s, (xs[i % 5], ys[i % 5], ms[i % 5]))
  jax.block_until_ready(p)
  t0 = time.perf_counter()
  for i in range(steps):
    p, s, m = step(p, s, (xs[i % 5], ys[i % 5], ms[i % 5]))
  jax.block_until_ready(p)
  per_step = steps / (time.perf_counter() - t0)

  seg = functools.partial(jax.jit(train.make_segment_fn(model, opt, "sum")), batches=(xs, ys, ms))
  ids = jnp.arange(100)
  p, s, _ = seg(params, state, ids)
  jax.block_until_ready(p)
  t0 = time.perf_counter()
  for k in range(steps // 100):
    p, s, _ = seg(p, s, ids + 100 * k)
  jax.block_until_ready(p)
  return per_step, (steps // 100) * 100 / (time.perf_counter() - t0)


def sweep_scaling(ks, epochs: int, reps: int = 3) -> list[dict]:
  """Seconds for K runs: vmapped, lax.map in sequence (one program), and K separate calls."""
  c = _config(epochs)
  run, total = sweep.make_run(c, "global_norm")
  single = jax.jit(run)
  key = jax.random.key(0)

  def timed(f, *args):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(f(*args))
    return (time.perf_counter() - t0) / reps

  t_single = timed(single, key, jnp.float32(20.0))
  rows = []
  for k in ks:
    keys = jax.random.split(key, k)
    thr = jnp.linspace(0.5, 20.0, k, dtype=jnp.float32)
    t_vmap = timed(sweep.batched(run, None), keys, thr)
    t_map = timed(sweep.batched(run, 1), keys, thr)
    rows.append(
        {
            "k": k,
            "vmapped_s": t_vmap,
            "mapped_s": t_map,
            "sequential_s": k * t_single,
            "steps": total,
        }
    )
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--ks", default="1,8,16,64")
  ap.add_argument("--epochs", type=int, default=50)
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args(argv)
  print(f"machine: {common.machine()}\n")
  ts = None if args.skip_torch else torch_steps_per_second()
  per_step, scan = jax_steps_per_second()
  print("| loop | steps/s | vs torch |")
  print("|---|---:|---:|")
  if ts is not None:
    print(f"| PyTorch reference (CPU) | {ts:.0f} | 1.0x |")
  for name, v in (("jax jit per step", per_step), ("jax lax.scan segments", scan)):
    rel = f"{v / ts:.1f}x" if ts else "n/a"
    print(f"| {name} | {v:.0f} | {rel} |")
  print(
      f"\nsweep of the {args.epochs}-epoch explosion run (global_norm clip), "
      "K vmapped vs K sequential:\n"
  )
  print("| K | vmapped (s) | lax.map (s) | K sequential calls (s) | vmapped / seq | map / seq |")
  print("|---:|---:|---:|---:|---:|---:|")
  for r in sweep_scaling([int(k) for k in args.ks.split(",")], args.epochs):
    seq = r["sequential_s"]
    print(
        f"| {r['k']} | {r['vmapped_s']:.3f} | {r['mapped_s']:.3f} | {seq:.3f} | "
        f"{r['vmapped_s'] / seq:.2f} | {r['mapped_s'] / seq:.2f} |",
        flush=True,
    )


if __name__ == "__main__":
  main()
