"""Global-norm clipping inside shard_map: optax vs clipjax (run it: 8 fake CPU devices).

    python docs/examples/shard_map_clipping.py
"""

import os

# Must be set before JAX starts: 8 CPU devices stand in for 8 accelerators.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipjax  # noqa: E402

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
rng = np.random.default_rng(0)
grads = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((64,)), jnp.float32)}
print(f"global norm of the gradients: {float(clipjax.global_norm(grads)):.4f}")

# 1. Plain jit over sharded arrays: XLA reduces across devices; no axis_name.
sharded = jax.device_put(grads, NamedSharding(mesh, P("x")))
tx = clipjax.clip_by_global_norm(1.0)
out, state = jax.jit(tx.update)(sharded, tx.init(grads))
print(f"jit, sharded arrays:     pre-clip norm {float(state.pre_clip_norm):.4f}, "
      f"update norm {float(optax.tree.norm(out)):.4f}")


# 2. Inside shard_map each device sees only its shard. optax's norm is then the
# shard's norm: every shard is clipped to norm 1 on its own.
def clip_with(tx):
  def local(g):
    updates, state = tx.update(g, tx.init(g))
    return updates, optax.tree.get(state, "pre_clip_norm", jnp.float32(jnp.nan))
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P())))


out, _ = clip_with(optax.clip_by_global_norm(1.0))(sharded)
print(f"shard_map, optax:        update norm {float(optax.tree.norm(out)):.4f} "
      "(each of 8 shards clipped to 1)")
out, norm = clip_with(clipjax.clip_by_global_norm(1.0, axis_name="x"))(sharded)
print(f"shard_map, clipjax:      pre-clip norm {float(norm):.4f}, "
      f"update norm {float(optax.tree.norm(out)):.4f}")

# 3. Mixed layouts: a 2-D mesh; 'w' sharded over both axes, 'b' over 'model' only,
# 'gain' replicated everywhere. Give each leaf the axes it is sharded over; None
# for a replicated leaf, which must be counted once, not once per device.
mesh2 = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
grads2 = {"w": grads["w"], "b": grads["b"], "gain": jnp.float32(3.0)}
specs = {"w": P("data", "model"), "b": P("model"), "gain": P()}
placed = {k: jax.device_put(v, NamedSharding(mesh2, specs[k])) for k, v in grads2.items()}
tx = clipjax.clip_by_global_norm(
    1.0, axis_name=lambda g: {"w": ("data", "model"), "b": "model", "gain": None})
local = jax.shard_map(lambda g: tx.update(g, tx.init(g))[1].pre_clip_norm, mesh=mesh2,
                      in_specs=(specs,), out_specs=P())
print(f"mixed layout, per-leaf axis_name: pre-clip norm {float(jax.jit(local)(placed)):.4f} "
      f"(unsharded: {float(clipjax.global_norm(grads2)):.4f})")
