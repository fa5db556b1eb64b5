"""Every clipper + Adam compiled for an H100 or a TPU v5e on this machine, without one.

XLA compiles for a GPU or a TPU on a CPU-only machine (deviceless
ahead-of-time compilation), and the program it produces is the one the device
runs (on GPT-2 small the H100 programs compiled this way had the kernel counts
an H200 run measured). This module compiles each kind of
`benchmarks.model_shapes` (clipper + Adam, optax's equivalent, Adam alone) on
GPT-2-shaped trees and reads the optimized program:

- ``kernels``: the device operations of the entry computation (fusions,
  copies, library calls; a conditional counts once), and ``conditionals``;
- ``bytes``: what those kernels read and write (operands + results; a
  conditional counts its result only, its branch runs rarely), and
  ``passes``: the bytes beyond Adam's, in reads of the gradients (GPU; on the
  TPU the HLO's operands count copies and layouts, and XLA's own ``bytes
  accessed``, kept as ``xla_bytes``, counts each fusion's operands whole: the
  cycles are the measure there);
- on the TPU, ``cycles``: XLA's cost model, the ``estimated_cycles`` of the
  entry computation's kernels summed (a conditional's branches left out), and
  ``branch_cycles``: its costliest branch's (the rescue of the norms), beside.

Timings need a device (`benchmarks.model_shapes`); these numbers show before one
is lent whether a change adds kernels, passes or branches, and
tests/test_accel_programs.py guards them. It runs in the accelerator venvs
that ``make accel`` makes outside the repository (benchmarks/accel_setup.sh)::

    ~/.cache/clipjax-accel/cuda/bin/python -m benchmarks.accel_programs --target h100 \\
        [--trees gpt2-small,gpt2-medium] [--dtypes bfloat16,float32] [--kinds all] \\
        [--json out.json] [--md out.md] [--hlo DIR]
    ~/.cache/clipjax-accel/tpu/bin/python -m benchmarks.accel_programs --target tpu-v5e ...

The clippers trace under ``jax.default_device(<the target>)``, so they take the
target's program forms (`clipjax._forms`), not this CPU's.
"""

from __future__ import annotations

import os

# What deviceless compilation needs, set before jax starts.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import model_shapes as ms  # noqa: E402
from benchmarks.clip_adam import make_step  # noqa: E402

# The H100 SXM (80 GB) as XLA's GPU compiler models it (its gpu_device_info).
H100 = """
gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

TARGETS = ("h100", "tpu-v5e")
SETUP_HINT = "run `make accel` and use its venvs (benchmarks/accel_setup.sh)"

_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2}
_ITEM_BYTES |= {"f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")


def device(target: str) -> Any:
  """The target's first device, from a deviceless topology (no accelerator needed)."""
  from jax.experimental import topologies

  try:
    if target == "h100":
      topo = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
    else:
      topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # no plugin for the platform in this venv
    raise SystemExit(
        f"accel_programs: cannot compile for {target} here ({type(e).__name__}): {SETUP_HINT}"
    ) from None
  return topo.devices[0]


def _computation(hlo: str, name: str | None) -> str:
  """The body of computation `name` (None: the entry computation) of an HLO module."""
  if name is None:
    start = hlo.index("\nENTRY ")
  else:
    m = re.search(r"\n%?" + re.escape(name) + r" ", hlo)
    if m is None:
      return ""
    start = m.start()
  body = hlo[start:]
  return body[: body.index("\n}")]


def _nbytes(shape: str) -> int:
  return sum(
      _ITEM_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
      for t, dims in _ARRAY.findall(shape)
  )


@dataclasses.dataclass
class Program:
  """What one compiled step does (see the module docstring)."""

  kernels: dict[str, int]
  bytes: int
  cycles: int
  branch_cycles: int

  @property
  def total(self) -> int:
    return sum(self.kernels.values())

  @property
  def conditionals(self) -> int:
    return self.kernels.get("conditional", 0)


def analyse(hlo: str) -> Program:
  """Kernels, bytes and (TPU) estimated cycles of an optimized HLO module's entry computation."""
  entry = _computation(hlo, None)
  sizes: dict[str, int] = {}
  kernels: dict[str, int] = {}
  total = cycles = branch_cycles = 0
  for line in entry.splitlines()[1:]:
    m = _INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))
    if m is None:
      continue
    name, shape, op, rest = m.groups()
    sizes[name] = _nbytes(shape)
    if op in ms.NOT_KERNELS:
      continue
    kernels[op] = kernels.get(op, 0) + 1
    cycles += sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', rest))
    if op == "conditional":  # its branch runs rarely: the result only
      total += sizes[name]
      branches = re.findall(r"(?:branch_computations=\{|_computation=)([^,}]+(?:, %[^,}]+)*)", rest)
      names = [b.strip().lstrip("%") for group in branches for b in group.split(",")]
      branch_cycles = max(
          [branch_cycles]
          + [
              sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', _computation(hlo, b)))
              for b in names
          ]
      )
      continue
    operands = rest.split(")", 1)[0]
    total += sizes[name] + sum(
        sizes.get(a.strip().lstrip("%"), 0) for a in operands.split(",") if a.strip()
    )
  return Program(kernels, total, cycles, branch_cycles)


def compile_variants(
    target: str,
    tree: str,
    dtype: str,
    kinds: list[str],
    hlo_dir: pathlib.Path | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
  """One row per variant (Adam, and optax's and clipjax's per kind) of `tree` in `dtype`."""
  dev = device(target)
  mesh = jax.sharding.Mesh(np.array([dev]), ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  d, layers = ms.TREES[tree]
  dt = jnp.dtype(dtype)
  params = {
      k: jax.ShapeDtypeStruct(s, dt, sharding=replicated)
      for k, s in ms.gpt2_shapes(d, layers).items()
  }
  grad_bytes = sum(math.prod(p.shape) * dt.itemsize for p in params.values())
  rows = []
  with jax.default_device(dev):
    for name, factory in ms.variants(kinds, ["auto"]).items():
      opt = factory()
      state = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
          jax.eval_shape(opt.init, params),
      )
      t0 = time.perf_counter()
      compiled = make_step(opt).lower(params, state, params).compile()
      text = compiled.as_text()
      program = analyse(text)
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
      rows.append(
          dict(
              target=target,
              tree=tree,
              dtype=dtype,
              variant=name.replace("/clipjax-auto", "/clipjax"),
              kernels=program.total,
              conditionals=program.conditionals,
              by_kind=program.kernels,
              bytes=program.bytes,
              xla_bytes=float(cost.get("bytes accessed", -1)),
              gradient_bytes=grad_bytes,
              cycles=program.cycles,
              branch_cycles=program.branch_cycles,
              compile_s=round(time.perf_counter() - t0, 2),
          )
      )
      if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{target}_{tree}_{dtype}_{name.replace('/', '_')}.txt").write_text(text)
      r = rows[-1]
      log(
          f"{target} {tree} {dtype} {r['variant']:22s} kernels {r['kernels']:4d} "
          f"({r['conditionals']}) bytes {r['bytes'] / 1e9:.4f} GB cycles {r['cycles']}"
      )
  adam = rows[0]
  for r in rows:
    r["passes"] = (r["bytes"] - adam["bytes"]) / grad_bytes
    r["cycles_vs_adam"] = r["cycles"] / adam["cycles"] if adam["cycles"] else None
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  """One table per (target, tree, dtype): each clipjax kind beside optax's equivalent."""
  out = []
  groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["target"], r["tree"], r["dtype"]), []).append(r)
  for (target, tree, dtype), rs in groups.items():
    by = {r["variant"]: r for r in rs}
    tpu = target.startswith("tpu")
    adam = by["adam"]
    cost = f"{adam['cycles']:,} cycles" if tpu else f"{adam['bytes'] / 1e9:.3f} GB"
    out.append(f"\n**{target}, {tree}, {dtype}** (Adam alone: {adam['kernels']} kernels, {cost})")
    # (On a TPU, XLA's bytes accessed count each fusion's operands whole, copies and
    # layouts included: the cycles are the measure to read there.)
    head = "| clipper + Adam | kernels (conditionals) clipjax / optax |"
    head += (
        " cycles / Adam clipjax / optax | rescue branch cycles / Adam |"
        if tpu
        else (" passes clipjax / optax |")
    )
    rule = "|---|---|---|---|" if tpu else "|---|---|---|"
    out += ["", head, rule]
    for kind in dict.fromkeys(v.split("/")[0] for v in by if v != "adam"):
      ours, ref = by.get(f"{kind}/clipjax"), by.get(f"{kind}/optax")

      def cell(r: dict[str, Any] | None, fmt: str) -> str:
        return "-" if r is None else fmt.format(**r)

      line = (
          f"| {kind} | {cell(ours, '{kernels} ({conditionals})')} / "
          f"{cell(ref, '{kernels} ({conditionals})')} |"
      )
      if not tpu:
        line += f" {cell(ours, '{passes:.3f}')} / {cell(ref, '{passes:.3f}')} |"
      else:
        line += (
            f" {cell(ours, '{cycles_vs_adam:.3f}')} / {cell(ref, '{cycles_vs_adam:.3f}')} |"
            f" {(ours['branch_cycles'] / by['adam']['cycles']) if ours else 0:.2f} |"
        )
      out.append(line)
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", choices=TARGETS, required=True)
  ap.add_argument("--trees", default="gpt2-small")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--kinds", default="all")
  ap.add_argument("--json", type=pathlib.Path)
  ap.add_argument("--md", type=pathlib.Path)
  ap.add_argument("--hlo", type=pathlib.Path)
  a = ap.parse_args(argv)
  kinds = list(ms.KINDS) if a.kinds == "all" else a.kinds.split(",")
  unknown = [k for k in kinds if k not in ms.KINDS] + [
      t for t in a.trees.split(",") if t not in ms.TREES
  ]
  if unknown:
    ap.error(f"unknown kinds or trees: {unknown}; kinds: {list(ms.KINDS)}, trees: {list(ms.TREES)}")
  rows = []
  for tree in a.trees.split(","):
    for dtype in a.dtypes.split(","):
      rows += compile_variants(a.target, tree, dtype, kinds, a.hlo)
  if a.json:
    a.json.write_text(json.dumps(rows, indent=1))
  table = markdown(rows)
  if a.md:
    a.md.write_text(table)
  print(table)


if __name__ == "__main__":
  main()
