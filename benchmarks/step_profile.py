"""Where each variant's step spends its time: device kernels, launches and host dispatch.

`benchmarks.model_shapes` times each clipper + Adam on a GPT-2-shaped tree and
counts the kernels of its compiled program; this script says where a slow step's
time goes. For each variant (same names and steps as model_shapes) it reports,
per step:

- ``wall``: `reps` steps dispatched back to back and one block at the end, the
  median over interleaved rounds (model_shapes' figure);
- ``call``: how long the Python call of the compiled step takes to return when
  the device is idle (the host's share: argument checks, buffer handling,
  launches; a step whose ``call`` is close to its ``wall`` is bound by the host);
- ``device``: the summed duration of the device's events in a profiler trace of
  `steps` steps (kernels and copies), and their number; ``busy`` is that sum
  over the wall time of the traced steps;
- the kernels that took the most device time, with the HLO instruction each
  ran, so that the compiled program (``--hlo``) says what they are;
- the host events that took the most time in the trace (per step).

    python -m benchmarks.step_profile [--tree gpt2-small] [--dtype float32] \
        [--kinds global_norm,given_norm,spam,adagc] [--json out.json] [--hlo DIR]

The trace is read with ``jax.profiler.ProfileData``; on the CPU the device
columns stay empty (XLA's CPU backend runs its kernels as host code).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import json
import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import common, model_shapes
from clipjax import _base, _numerics
from clipjax._numerics import split as _split
from clipjax._numerics import sums as _sums

# Lines of a device plane that the profiler derives from the others (they would
# count every kernel twice).
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Source", "Framework", "TensorFlow")


# Host events of the tracing itself and of this script's Python frames.
_OURS = ("$profiler.py", "$contextlib.py", "$common.py", "$api.py", "$step_profile.py")


def _is_device_plane(name: str) -> bool:
  return name.startswith("/device:") and "CPU" not in name


def summarize_trace(path: str, steps: int, top: int) -> dict[str, Any]:
  """Per-step device time, event count and top kernels/host events of one xplane.pb."""
  prof = jax.profiler.ProfileData.from_file(path)
  dev_total, dev_count = 0.0, 0
  kernels: collections.Counter[str] = collections.Counter()
  kernel_n: collections.Counter[str] = collections.Counter()
  host: collections.Counter[str] = collections.Counter()
  lines: dict[str, list[float]] = {}
  span = [float("inf"), float("-inf")]
  for plane in prof.planes:
    device = _is_device_plane(plane.name)
    for line in plane.lines:
      if device and line.name.startswith(_DERIVED_LINES):
        continue
      tot, n = 0.0, 0
      for ev in line.events:
        dur = ev.duration_ns
        tot += dur
        n += 1
        if device:
          stats = dict(ev.stats)
          op = stats.get("hlo_op") or stats.get("tf_op") or ""
          key = f"{ev.name} [{op}]" if op and op != ev.name else ev.name
          kernels[key] += dur
          kernel_n[key] += 1
          span[0] = min(span[0], ev.start_ns)
          span[1] = max(span[1], ev.start_ns + dur)
        elif plane.name.startswith("/host:") and dur > 0 and not ev.name.startswith(_OURS):
          host[ev.name] += dur
      if n:
        lines[f"{plane.name} | {line.name}"] = [n / steps, tot / steps / 1e6]
      if device:
        dev_total += tot
        dev_count += n
  per = 1e6 * steps  # ns -> ms per step
  return {
      "device_ms": dev_total / per,
      "device_events": dev_count / steps,
      "device_span_ms": (span[1] - span[0]) / per if dev_count else 0.0,
      "top_kernels": [
          [k, round(v / per, 4), kernel_n[k] / steps] for k, v in kernels.most_common(top)
      ],
      "top_host": [[k, round(v / per, 4)] for k, v in host.most_common(top)],
      "lines": lines,
  }


def profile_variant(fn, steps: int, top: int) -> dict[str, Any]:
  """Traces `steps` calls of fn (blocking once at the end) and summarizes the trace."""
  with tempfile.TemporaryDirectory() as d:
    common.block(fn())
    with jax.profiler.trace(d):
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn()
      common.block(out)
      wall = (time.perf_counter() - t0) / steps * 1e3
    (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    out = summarize_trace(path, steps, top)
  out["traced_wall_ms"] = wall
  out["busy"] = out["device_ms"] / wall if wall else 0.0
  return out


def _profile_or_error(fn, steps: int, top: int) -> dict[str, Any]:
  # A profiler that cannot attach to the device (no CUPTI) must not cost the timings.
  try:
    return profile_variant(fn, steps, top)
  except Exception as e:  # noqa: BLE001 - reported in the output instead
    empty = {"device_ms": 0.0, "device_events": 0, "busy": 0.0, "top_kernels": [], "top_host": []}
    return empty | {"error": f"{type(e).__name__}: {e}"}


def call_ms(fn, calls: int) -> float:
  """Median time for a call to return with the device idle (blocking after each)."""
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    common.block(out)
  return statistics.median(times) * 1e3


def _plain_rescue(xs, s0_parts, s0, p, dtype, axes, red):
  del xs, s0_parts, axes, red
  return _numerics.Split(_split._safe_root(s0, p), jnp.zeros(s0.shape, jnp.int32))


def _untied(old, new):
  del old
  return new


# Diagnostic changes to the library, applied while a variant is traced (its
# numbers are not clipjax's): KIND@PATCH names the variant.
PATCHES = {
    # the rescue branch reduced to one root of the plain sums: what a conditional
    # with an almost empty branch costs (wrong only where a sum left the range)
    "tinyrescue": (_sums, "_rescued_norms", _plain_rescue),
    # the state's written-only fields not tied to their inputs (before 2026-11-30)
    "untied": (_base, "_tie", _untied),
    # the rescue branch groups leaves of one size up to 2^24 entries, large ones
    # too: fewer kernels in the branch, a copy of those leaves when it runs
    "biggroups": (_sums, "GROUP_LEAF_ELEMENTS", 2**24),
}


@contextlib.contextmanager
def _patched(patch: str | None):
  if patch is None:
    yield
    return
  module, attr, value = PATCHES[patch]
  old = getattr(module, attr)
  setattr(module, attr, value)
  try:
    yield
  finally:
    setattr(module, attr, old)


def _counters(n: int, vector: bool) -> optax.GradientTransformation:
  """A transform whose state is n float32 counters (n scalars, or one vector), each read and bumped.

  Chained before Adam, it measures what state buffers crossing the step cost:
  the per-leaf statistics of adagc and record_leaf_norms are one scalar per leaf.
  """

  def init(params):
    del params
    return (
        jnp.zeros((n,), jnp.float32) if vector else [jnp.zeros([], jnp.float32) for _ in range(n)]
    )

  def update(updates, state, params=None):
    del params
    return updates, jax.tree.map(lambda c: c + 1, state)

  return optax.GradientTransformation(init, update)


def build(
    tree: str,
    dtype: str,
    kinds: list[str],
    hlo_dir: pathlib.Path | None,
    impls: list[str],
    extra: tuple[str, ...] = (),
    patched: tuple[str, ...] = (),
    counters: tuple[int, ...] = (),
) -> model_shapes.Steps:
  """model_shapes' variants compiled; `patched` adds KIND@PATCH ones (PATCHES[PATCH] applied).

  `counters` adds Adam with n more state scalars ("adam+n scalars") and with one
  vector of n ("adam+vector(n)"), for each n.
  """
  factories = dict(model_shapes.variants(kinds, impls, extra))
  for n in counters:
    for vector, label in ((False, f"adam+{n} scalars"), (True, f"adam+vector({n})")):
      factories[label] = functools.partial(
          lambda n, vector: optax.chain(_counters(n, vector), optax.adam(model_shapes.LR)),
          n,
          vector,
      )
  patches: dict[str, str | None] = dict.fromkeys(factories)
  for name in patched:
    kind, patch = name.split("@")
    factories[name] = functools.partial(model_shapes.KINDS[kind][1], "auto")
    patches[name] = patch
  opts = {k: f() for k, f in factories.items()}
  return model_shapes.build_steps(
      tree, dtype, opts, hlo_dir, threads=8, tracing=lambda k: _patched(patches[k])
  )


def markdown(res: dict[str, Any]) -> str:
  lines = [
      "| variant | wall (ms) | / adam | call (ms) | device (ms) | busy | device events | kernels |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  adam = res["variants"].get("adam", {"wall_ms": float("nan")})["wall_ms"]
  for k, r in res["variants"].items():
    p = r["profile"]
    lines.append(
        f"| {k} | {r['wall_ms']:.3f} | {r['wall_ms'] / adam:.3f}x | {r['call_ms']:.3f} | "
        f"{p['device_ms']:.3f} | "
        f"{p['busy']:.2f} | {p['device_events']:.0f} | {sum(r['kernels'].values())} |"
    )
  for k, r in res["variants"].items():
    lines += ["", f"{k}: top kernels (ms/step, count/step)"]
    lines += [f"  {ms:8.4f} {n:5.0f}  {name[:150]}" for name, ms, n in r["profile"]["top_kernels"]]
    lines += [f"{k}: top host events (ms/step)"]
    lines += [f"  {ms:8.4f}  {name[:150]}" for name, ms in r["profile"]["top_host"][:8]]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--tree", default="gpt2-small", choices=sorted(model_shapes.TREES))
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--kinds", default="global_norm,given_norm,spam,adagc")
  ap.add_argument("--impls", default="auto", help="norm implementations timed for every kind")
  ap.add_argument("--extra", default="", help="more variants, e.g. global_norm/clipjax-multiscale")
  ap.add_argument("--patched", default="", help="diagnostic variants KIND@PATCH (see PATCHES)")
  ap.add_argument("--counters", default="", help="Adam with n more state scalars, e.g. 148,296")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--steps", type=int, default=10, help="steps in each variant's trace")
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--json", default=None)
  ap.add_argument("--hlo", default=None, help="folder for each variant's optimized HLO")
  args = ap.parse_args(argv)
  hlo_dir = pathlib.Path(args.hlo) if args.hlo else None
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)
  kinds = list(model_shapes.KINDS) if args.kinds == "all" else args.kinds.split(",")
  header = f"machine: {common.machine()}, optax {optax.__version__}"
  print(header, flush=True)
  steps = build(
      args.tree,
      args.dtype,
      kinds,
      hlo_dir,
      args.impls.split(","),
      tuple(x for x in args.extra.split(",") if x),
      tuple(x for x in args.patched.split(",") if x),
      tuple(int(x) for x in args.counters.split(",") if x),
  )
  walls = common.interleaved(steps.fns, rounds=args.rounds, reps=args.reps)
  res: dict[str, Any] = {"machine": header, "tree": args.tree, "dtype": args.dtype, "variants": {}}
  for k, fn in steps.fns.items():
    res["variants"][k] = {
        "wall_ms": walls[k] * 1e3,
        "call_ms": call_ms(fn, 20),
        "kernels": steps.kernels[k],
        "profile": _profile_or_error(fn, args.steps, args.top),
    }
    if args.json:  # after every variant, so that a run cut short keeps what it measured
      pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
  print(markdown(res), flush=True)


if __name__ == "__main__":
  main()
