"""Run in a separate process with 8 fake CPU devices (see test_sharding.py)."""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipjax  # noqa: E402
from clipjax import _forms  # noqa: E402
from tests.conftest import forms_named  # noqa: E402

# argv: the forms to check (conftest.forms_named: 'cond', 'multiscale', 'gpu'; default
# all), and "--layouts" for the
# checks that do not depend on them (test_sharding.py runs one process per
# implementation, so that the two share the test workers).
_impls = [a for a in sys.argv[1:] if not a.startswith("--")]
IMPLEMENTATIONS = tuple(_impls) or ("cond", "multiscale", "gpu")
LAYOUTS = "--layouts" in sys.argv or not _impls

if hasattr(jax, "shard_map"):
  shard_map = jax.shard_map
else:  # older jax
  from jax.experimental.shard_map import shard_map  # type: ignore[assignment]


def _in_forms(tx, name):
  return _forms.with_forms(tx, lambda: forms_named(name))


assert len(jax.devices()) == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
rng = np.random.default_rng(0)


def tree(scale=1.0):
  return {
      "w": jnp.asarray(rng.standard_normal((16, 6)) * scale, jnp.float32),
      "b": jnp.asarray(rng.standard_normal((8,)) * scale, jnp.float32),
  }


def close(a, b, tol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol * 1e-3)


MAKERS = {
    "global_l2": lambda **kw: clipjax.clip_by_global_norm(1.0, **kw),
    "global_inf": lambda **kw: clipjax.clip_by_global_norm(0.5, ord="inf", **kw),
    "global_l1": lambda **kw: clipjax.clip_by_global_norm(2.0, ord=1, **kw),
    "per_leaf": lambda **kw: clipjax.clip_by_norm(1.0, **kw),
    "block_rms": lambda **kw: clipjax.clip_by_block_rms(0.1, **kw),
    "autoclip": lambda **kw: clipjax.autoclip(50.0, **kw),
}

# One transform and one compiled function per case, run at both scales: a new
# closure would be traced and compiled again.
for impl in IMPLEMENTATIONS:
  for name, make in MAKERS.items():
    tx = _in_forms(make(), impl)
    update = jax.jit(tx.update)
    tx_ax = _in_forms(make(axis_name="x"), impl)

    def local(g, tx_ax=tx_ax):
      out, s = tx_ax.update(g, tx_ax.init(g))
      return out, s.pre_clip_norm

    f = jax.jit(shard_map(local, mesh=mesh, in_specs=(P("x"),), out_specs=(P("x"), P())))
    for scale in (1.0, 1e20):
      print(impl, scale, name, flush=True)
      g = tree(scale)
      expected, st = update(g, tx.init(g))

      # 1. jit with the gradients sharded over the mesh (data- / fully-sharded layout).
      sharded = jax.device_put(g, NamedSharding(mesh, P("x")))
      out, st2 = update(sharded, tx.init(g))
      close(out, expected)
      np.testing.assert_allclose(float(st2.pre_clip_norm), float(st.pre_clip_norm), rtol=1e-6)

      # 2. shard_map with axis_name: the norm is reduced across shards.
      out, norm = f(sharded)
      close(out, expected)
      np.testing.assert_allclose(float(norm), float(st.pre_clip_norm), rtol=1e-6)

# 3. Data-parallel layout (gradients replicated on every device) under jit.
for make in MAKERS.values() if LAYOUTS else ():
  g = tree(1.0)
  tx = make()
  expected, _ = tx.update(g, tx.init(g))
  replicated = jax.device_put(g, NamedSharding(mesh, P()))
  close(jax.jit(tx.update)(replicated, tx.init(g))[0], expected)

# 4. A 2-D mesh (data x model) with explicit axis types: a fully-sharded kernel, a
# bias sharded over 'model' only, a replicated scalar gain. Under jit, and inside
# shard_map with a per-leaf axis_name (None for the replicated leaf).
AXES = ("data", "model")
mesh2 = jax.make_mesh((2, 4), AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
specs = {"w": P("data", "model"), "b": P("model"), "gain": P()}
per_leaf_axes = {"w": ("data", "model"), "b": "model", "gain": None}
MAKERS_2D = dict(MAKERS, zclip=lambda **kw: clipjax.zclip(**kw))


def tree2(scale):
  return {
      "w": jnp.asarray(rng.standard_normal((16, 8)) * scale, jnp.float32),
      "b": jnp.asarray(rng.standard_normal((8,)) * scale, jnp.float32),
      "gain": jnp.asarray(rng.standard_normal(()) * scale + 3 * scale, jnp.float32),
  }


for impl in IMPLEMENTATIONS:
  for name, make in MAKERS_2D.items():
    tx = _in_forms(make(), impl)
    update = jax.jit(tx.update)
    # zclip's history adds nothing to a one-step layout check inside shard_map.
    f2d: Any = None
    if name != "zclip":
      tx_ax = _in_forms(make(axis_name=lambda u: per_leaf_axes), impl)

      def local(g, tx_ax=tx_ax):
        out, s = tx_ax.update(g, tx_ax.init(g))
        return out, s.pre_clip_norm

      f2d = jax.jit(shard_map(local, mesh=mesh2, in_specs=(specs,), out_specs=(specs, P())))
    for scale in (1.0, 1e20):
      print("2d", impl, scale, name, flush=True)
      g = tree2(scale)
      placed = {k: jax.device_put(v, NamedSharding(mesh2, specs[k])) for k, v in g.items()}
      expected, st = update(g, tx.init(g))
      with jax.set_mesh(mesh2):
        out = update(placed, tx.init(g))[0]
      close(out, expected)
      assert out["w"].sharding.spec == specs["w"], out["w"].sharding
      if f2d is not None:
        out, norm = f2d(placed)
        close(out, expected)
        np.testing.assert_allclose(float(norm), float(st.pre_clip_norm), rtol=1e-6)

# One axis name for every leaf counts the replicated leaves once per shard. With
# shard_map's type check (check_vma) clipjax reads the leaves' types and refuses
# an axis a leaf does not vary over (JAX's psum would not: it multiplies an
# invariant value by the axis size); without the check the types say nothing and
# the norm silently comes out too large.
if LAYOUTS:
  g = tree2(1.0)
  placed = {k: jax.device_put(v, NamedSharding(mesh2, specs[k])) for k, v in g.items()}
  naive = clipjax.clip_by_global_norm(1.0, axis_name=AXES)

  def naive_norm(g):
    return naive.update(g, naive.init(g))[1].pre_clip_norm

  try:
    jax.jit(shard_map(naive_norm, mesh=mesh2, in_specs=(specs,), out_specs=P()))(placed)
    raise AssertionError("shard_map accepted a psum over axes a leaf is not sharded over")
  except ValueError as e:
    assert "psum" in str(e), e
  unchecked = shard_map(naive_norm, mesh=mesh2, in_specs=(specs,), out_specs=P(), check_vma=False)
  n_naive, n_true = float(jax.jit(unchecked)(placed)), float(clipjax.global_norm(g))
  assert n_naive > n_true * 1.01, (n_naive, n_true)
  print(f"one axis_name for all leaves, check_vma=False: norm {n_naive:.4f}, true {n_true:.4f}")

# 5. AGC inside shard_map: kernels sharded along their unit-reduction axis (0).
for impl in IMPLEMENTATIONS:
  tx = _in_forms(clipjax.adaptive_grad_clip(0.05), impl)
  tx_ax = _in_forms(clipjax.adaptive_grad_clip(0.05, axis_name="x"), impl)
  agc_fn = jax.jit(
      shard_map(
          lambda g, w, tx_ax=tx_ax: tx_ax.update(g, tx_ax.init(w), w)[0],
          mesh=mesh,
          in_specs=(P("x"), P("x")),
          out_specs=P("x"),
      )
  )
  for scale in (1.0, 1e20):
    print("agc", impl, scale, flush=True)
    g, params = tree(scale), tree(1.0)
    expected = tx.update(g, tx.init(params), params)[0]
    close(
        agc_fn(
            jax.device_put(g, NamedSharding(mesh, P("x"))),
            jax.device_put(params, NamedSharding(mesh, P("x"))),
        ),
        expected,
    )

# 6. optax's clip_by_global_norm inside shard_map clips each shard by its own norm.
if LAYOUTS:
  g = tree(1.0)
  sharded = jax.device_put(g, NamedSharding(mesh, P("x")))
  ox = optax.clip_by_global_norm(1.0)
  optax_fn = shard_map(
      lambda g: ox.update(g, ox.init(g))[0], mesh=mesh, in_specs=(P("x"),), out_specs=P("x")
  )
  per_shard = jax.jit(optax_fn)(sharded)
  true_clip = clipjax.clip_by_global_norm(1.0).update(g, clipjax.clip_by_global_norm(1.0).init(g))[
      0
  ]
  n_optax = float(optax.tree.norm(per_shard))
  n_true = float(optax.tree.norm(true_clip))
  assert abs(n_true - 1.0) < 1e-5 and n_optax > 2.0, (n_optax, n_true)
  print(
      f"optax inside shard_map: update norm {n_optax:.3f} (per-shard clipping); "
      f"clipjax with axis_name: {n_true:.6f}"
  )
print("SHARDING OK")
sys.exit(0)
