"""One of two local jax.distributed processes (4 CPU devices each) clipping over all 8.

``python tests/multiprocess_check.py PORT PROCESS_ID`` (tests/test_distributed.py
starts both). Each process builds the same data from one seed, places its own
shards (``jax.make_array_from_callback``), and runs on the 8-device mesh:
the global-norm clip under jit (FSDP-style layout) and inside shard_map
(``axis_name='auto'``), and DP-SGD under jit (batch split over the devices) and
inside shard_map. Every result is gathered to each process and compared with the
float64 reference; each process prints ``RESULT setup max_err`` lines and
``MULTIPROCESS OK <process id>``.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipjax  # noqa: E402
from tests import reference as ref  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
rng = np.random.default_rng(0)
TOL = 2e-6


def place(host: dict, specs: dict) -> dict:
  """Global arrays from the same host values on every process (each fills its shards)."""

  def array(v: np.ndarray, spec: P) -> jax.Array:
    return jax.make_array_from_callback(v.shape, NamedSharding(mesh, spec), lambda i: v[i])

  return {k: array(v, specs[k]) for k, v in host.items()}


def gathered(tree):
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def report(setup: str, got: dict, want: dict, norm: float | None = None, want_norm=None) -> None:
  err = max(
      float(
          np.max(np.abs(np.asarray(got[k], np.float64) - want[k])) / max(1.0, np.abs(want[k]).max())
      )
      for k in want
  )
  if norm is not None:
    err = max(err, abs(norm - want_norm) / want_norm)
  print(f"RESULT {setup} {err:.3g}", flush=True)
  assert err <= TOL, (setup, err)


# The global norm: FSDP-style layout, a replicated leaf beside sharded ones.
g_host = {
    "w": rng.standard_normal((16, 8)).astype(np.float32),
    "b": rng.standard_normal((8,)).astype(np.float32),
    "gain": rng.standard_normal(()).astype(np.float32),
}
specs = {"w": P("data"), "b": P("data"), "gain": P()}
keys = sorted(g_host)
want = dict(zip(keys, ref.clip_by_global_norm([g_host[k] for k in keys], 1.0)))
want_norm = ref.global_norm([g_host[k] for k in keys])
g = place(g_host, specs)

tx = clipjax.clip_by_global_norm(1.0)
out, state = jax.jit(lambda g: tx.update(g, tx.init(g)))(g)
report("jit-global_norm", gathered(out), want, float(state.pre_clip_norm), want_norm)

auto = clipjax.clip_by_global_norm(1.0, axis_name="auto")
f = jax.jit(
    jax.shard_map(
        lambda g: (lambda o, s: (o, s.pre_clip_norm))(*auto.update(g, auto.init(g))),
        mesh=mesh,
        in_specs=(specs,),
        out_specs=(specs, P()),
    )
)
out, norm = f(g)
report("shard_map-auto-global_norm", gathered(out), want, float(norm), want_norm)

# DP-SGD: 16 examples, 2 per device, 8 per process.
x_host = rng.standard_normal((16, 8)).astype(np.float32)
y_host = rng.standard_normal((16, 4)).astype(np.float32)
p_host = {"w": rng.standard_normal((8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}


def loss(p, x, y):
  return jnp.sum((x @ p["w"] + p["b"] - y) ** 2)


per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
dp_want, norms = ref.per_example_clip_tree(per_example(p_host, x_host, y_host), 1.0)
xy = place({"x": x_host, "y": y_host}, {"x": P("data"), "y": P("data")})
params = place(p_host, {"w": P(), "b": P()})

dp = clipjax.per_example_clip(1.0, reduction="sum")
out, state = jax.jit(lambda p, x, y: dp.update(per_example(p, x, y), dp.init(p)))(
    params, xy["x"], xy["y"]
)
report("jit-per_example_clip", gathered(out), dp_want, float(state.max_example_norm), norms.max())

dp_ax = clipjax.per_example_clip(1.0, reduction="sum", axis_name="data")


def local(p, x, y):
  p = jax.lax.pcast(p, "data", to="varying")
  out, s = dp_ax.update(per_example(p, x, y), dp_ax.init(p))
  return out, s.mean_example_norm


f = jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))
)
out, mean_norm = f(params, xy["x"], xy["y"])
report("shard_map-per_example_clip", gathered(out), dp_want, float(mean_norm), norms.mean())
print(f"MULTIPROCESS OK {jax.process_index()}", flush=True)
jax.distributed.shutdown()
