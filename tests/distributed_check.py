"""Every transform of the catalogue on 8 fake CPU devices, against the float64 references.

Run by tests/test_distributed.py in a process of its own (the device count is
fixed when jax starts): ``python tests/distributed_check.py GROUP``, GROUP one
of ``jit`` (jit over Auto and Explicit meshes, 1-D and 2-D, data, FSDP-style,
tensor-parallel and mixed layouts; the replicated layout is
tests/sharding_check.py's), ``shard_map`` (check_vma on with
``axis_name='auto'`` and with the gradients' PartitionSpecs, check_vma off
with the PartitionSpecs; sharded, replicated and mixed leaves) or ``dp``
(DP-SGD: jit on Auto and Explicit meshes, shard_map as a user writes it).

For each (setup, transform) it checks the update against the catalogue's
float64 reference and every stat against the unsharded run's, and prints one
line ``RESULT setup case max_err``; the last line is ``DISTRIBUTED OK n`` with
the number of (setup, transform) pairs checked.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipjax  # noqa: E402
from tests import clippers  # noqa: E402
from tests import reference as ref  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
rng = np.random.default_rng(0)

# The catalogue's dict trees (group_norm labels dense and bias), shaped so that
# every dimension split below divides by the mesh axes.
SHAPES = {"bias": (8,), "conv": (8, 2, 8), "dense": (16, 8), "heads": (8, 16), "scalar": ()}
# Update tolerance against float64 (float32 rounding of sums over 8 devices),
# and the stats' against the unsharded run.
TOL = 2e-6


def tree(scale: float) -> dict:
  return {k: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32) for k, s in SHAPES.items()}


# Layouts: a PartitionSpec per leaf. On the 1-D mesh ('data',) and the 2-D mesh
# ('data', 'model') of 2 x 4 devices.
REPLICATED = {k: P() for k in SHAPES}
FSDP = {"bias": P("data"), "conv": P("data"), "dense": P("data"), "heads": P("data"), "scalar": P()}
TP = {
    "bias": P(),
    "conv": P(None, None, "data"),
    "dense": P(None, "data"),
    "heads": P(None, "data"),
    "scalar": P(),
}
MIXED = {"bias": P(), "conv": P("data"), "dense": P(None, "data"), "heads": P(), "scalar": P()}
FSDP_TP = {
    "bias": P("model"),
    "conv": P(None, None, "model"),
    "dense": P("data", "model"),
    "heads": P("model", "data"),
    "scalar": P(),
}
MIXED_2D = {
    "bias": P(),
    "conv": P(("data", "model")),
    "dense": P("data", None),
    "heads": P(None, "model"),
    "scalar": P(),
}


def mesh1(kind: AxisType):
  return jax.make_mesh((8,), ("data",), axis_types=(kind,))


def mesh2(kind: AxisType):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def place(t: dict, mesh, layout: dict) -> dict:
  return {k: jax.device_put(v, NamedSharding(mesh, layout[k])) for k, v in t.items()}


def max_err(out, expected) -> float:
  errs = [0.0]
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
    errs.append(float(np.max(np.abs(x - y), initial=0.0)) / scale)
  return max(errs)


def stats_err(got: dict, want: dict) -> float:
  assert got.keys() == want.keys(), (sorted(got), sorted(want))
  errs = [0.0]
  for k in want:
    g, w = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
    if w.dtype == bool or np.issubdtype(np.asarray(want[k]).dtype, np.integer):
      assert np.array_equal(g, w), (k, g, w)
    else:  # non-finite stats (e.g. no history yet) must match exactly
      finite = np.isfinite(w)
      assert np.array_equal(g[~finite], w[~finite], equal_nan=True), (k, g, w)
      d = np.abs(g[finite] - w[finite]) / np.maximum(1.0, np.abs(w[finite]))
      errs.append(float(np.max(d, initial=0.0)))
  return max(errs)


def steps_err(outs, stats, want_out, want_stats) -> float:
  """The largest error over several steps' updates and stats."""
  return max(
      max(max_err(o, w) for o, w in zip(outs, want_out)),
      max(stats_err(s, w) for s, w in zip(stats, want_stats)),
  )


checked = 0


def report(setup: str, case: str, err: float) -> None:
  global checked
  print(f"RESULT {setup} {case} {err:.3g}", flush=True)
  assert err <= TOL, (setup, case, err)
  checked += 1


def catalogue_step(tx, extra: dict):
  """One step from a fresh state: (update, stats)."""

  def step(g, p):
    out, state = tx.update(g, tx.init(p), p, **extra)
    return out, clipjax.clip_stats(state)

  return step


def expected_for(case, g, params):
  leaves, treedef = jax.tree.flatten(g)
  ref = case.reference(leaves, jax.tree.leaves(params))
  tx = case.build()
  _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, **case.extra_args(g)))(g, params)
  return jax.tree.unflatten(treedef, ref), clipjax.clip_stats(state)


def jit_setups():
  """(name, mesh, layout) for jit over a mesh."""
  return [
      ("jit-auto-1d-fsdp", mesh1(AxisType.Auto), FSDP),
      ("jit-explicit-1d-tp", mesh1(AxisType.Explicit), TP),
      ("jit-auto-2d-fsdp_tp", mesh2(AxisType.Auto), FSDP_TP),
      ("jit-explicit-2d-fsdp_tp", mesh2(AxisType.Explicit), FSDP_TP),
      ("jit-explicit-2d-mixed", mesh2(AxisType.Explicit), MIXED_2D),
  ]


def run_jit() -> None:
  setups = jit_setups()
  g, params = tree(1.0), tree(1.0)
  for case in clippers.CASES:
    expected, want_stats = expected_for(case, g, params)
    step = jax.jit(catalogue_step(case.build(), case.extra_args(g)))
    for name, mesh, layout in setups:
      with jax.set_mesh(mesh):
        out, stats = step(place(g, mesh, layout), place(params, mesh, layout))
      explicit = mesh.axis_types[0] == AxisType.Explicit
      for k, v in out.items() if explicit else ():  # the update keeps the gradients' layout
        assert v.sharding.is_equivalent_to(NamedSharding(mesh, layout[k]), v.ndim), (name, k)
      report(name, case.name, max(max_err(out, expected), stats_err(stats, want_stats)))
  run_sequences(in_shard_map=False)


def shard_map_setups():
  """(name, mesh, layout, check_vma, axis_name given to the clipper)."""
  m1, m2 = mesh1(AxisType.Explicit), mesh2(AxisType.Explicit)
  return [
      ("shard_map-vma-auto-1d-fsdp", m1, FSDP, True, "auto"),
      ("shard_map-vma-auto-1d-mixed", m1, MIXED, True, "auto"),
      ("shard_map-vma-auto-2d-fsdp_tp", m2, FSDP_TP, True, "auto"),
      ("shard_map-vma-specs-2d-mixed", m2, MIXED_2D, True, "specs"),
      ("shard_map-novma-specs-1d-mixed", m1, MIXED, False, "specs"),
  ]


def run_shard_map() -> None:
  g, params = tree(1.0), tree(1.0)
  for case in clippers.CASES:
    expected, want_stats = expected_for(case, g, params)
    for name, mesh, layout, check_vma, how in shard_map_setups():
      kw = {}
      if case.takes_axis_name:  # (not the given norm: the user reduces it)
        kw["axis_name"] = layout if how == "specs" or case.name == "agc" else how
      tx = case.build(**kw)
      extra_fn = case.extra
      if case.name == "given_norm":  # the global norm, computed as the user would
        norm_axes = "auto" if check_vma else layout
        extra_fn = lambda u, a=norm_axes: {"grad_norm": clipjax.global_norm(u, axis_name=a)}  # noqa: E731

      def local(g, p, tx=tx, extra_fn=extra_fn):
        extra = {} if extra_fn is None else extra_fn(g)
        out, state = tx.update(g, tx.init(p), p, **extra)
        return out, clipjax.clip_stats(state)

      stats_spec = jax.tree.map(lambda _: P(), want_stats)
      f = jax.jit(
          jax.shard_map(
              local,
              mesh=mesh,
              in_specs=(layout, layout),
              out_specs=(layout, stats_spec),
              check_vma=check_vma,
          )
      )
      out, stats = f(place(g, mesh, layout), place(params, mesh, layout))
      report(name, case.name, max(max_err(out, expected), stats_err(stats, want_stats)))
  run_sequences(in_shard_map=True)
  refusals()


def run_sequences(in_shard_map: bool) -> None:
  """The wrappers and recorders over several steps, a spike last, in the
  shard_map or the jit setups: each step's update and stats against the
  unsharded run's, the leaf norms and the spike's skip against float64."""
  params = tree(1.0)
  grads = [tree(1.0) for _ in range(3)] + [tree(clippers.SPIKE)]
  leaf_norms = [
      {k: float(np.linalg.norm(np.asarray(v, np.float64))) for k, v in g.items()} for g in grads
  ]

  def steps(tx):
    def run(gs, p):
      state, outs, stats = tx.init(p), [], []
      for g in gs:
        out, state = tx.update(g, state, p)
        outs.append(out)
        stats.append(clipjax.clip_stats(state))
      return outs, stats

    return run

  for seq in clippers.SEQUENCES:
    gs = grads
    want_out, want_stats = jax.jit(steps(seq.build()))(gs, params)
    if seq.name == "record_leaf_norms":
      for st, norms in zip(want_stats, leaf_norms):
        for k, v in norms.items():
          assert abs(float(st[f"leaf_norms/{k}"]) - v) <= TOL * max(1.0, v), (k, st, v)
    if seq.name.startswith("skip_spikes"):
      assert [bool(st["skipped"]) for st in want_stats] == [False] * (len(gs) - 1) + [True]
    if seq.name == "spam":  # the spike's entries clipped, on every shard (a count to sum)
      assert int(want_stats[-1]["entries_clipped"]) > 8, want_stats[-1]
    if not in_shard_map:
      step = jax.jit(steps(seq.build()))
      for name, mesh, layout in jit_setups():
        with jax.set_mesh(mesh):
          outs, stats = step([place(g, mesh, layout) for g in gs], place(params, mesh, layout))
        report(name, seq.name, steps_err(outs, stats, want_out, want_stats))
      continue
    for name, mesh, layout, check_vma, how in shard_map_setups():
      tx = seq.build(axis_name=layout if how == "specs" else how)
      f = jax.jit(
          jax.shard_map(
              steps(tx),
              mesh=mesh,
              in_specs=([layout] * len(gs), layout),
              out_specs=([layout] * len(gs), jax.tree.map(lambda _: P(), want_stats)),
              check_vma=check_vma,
          )
      )
      outs, stats = f([place(g, mesh, layout) for g in gs], place(params, mesh, layout))
      report(name, seq.name, steps_err(outs, stats, want_out, want_stats))


def refused(call, what: str, *fragments: str) -> None:
  """`call()` raises a one-line ValueError holding every fragment."""
  try:
    call()
  except ValueError as e:
    assert all(f in str(e) for f in fragments) and "\n" not in str(e), e
    return
  raise AssertionError(f"{what} was accepted")


def refusals() -> None:
  """The setups that used to go silently wrong now fail with one line naming the leaf."""
  m1 = mesh1(AxisType.Explicit)
  g = place({"w": jnp.asarray([3.0, 4.0])}, m1, {"w": P()})

  def norm_in_shard_map(axis_name, check_vma):
    tx = clipjax.clip_by_global_norm(1.0, axis_name=axis_name)
    return jax.jit(
        jax.shard_map(
            lambda g: tx.update(g, tx.init(g))[1].pre_clip_norm,
            mesh=m1,
            in_specs=(P(),),
            out_specs=P(),
            check_vma=check_vma,
        )
    )

  f = norm_in_shard_map("data", True)
  refused(lambda: f(g), "a psum of a replicated leaf", "leaf ['w']", "'data'")
  f = norm_in_shard_map("auto", False)
  refused(lambda: f(g), "axis_name='auto' under check_vma=False", "check_vma")
  print("REFUSALS OK", flush=True)


# ------------------------------------------------------------------ DP-SGD


def run_dp() -> None:
  batch, clip = 16, 1.0
  x = jnp.asarray(rng.standard_normal((batch, 8)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((batch, 4)), jnp.float32)
  params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.zeros(4)}

  def loss(p, x, y):
    return jnp.sum((x @ p["w"] + p["b"] - y) ** 2)

  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
  expected, norms = ref.per_example_clip_tree(per_example(params, x, y), clip)

  def check(name, out, state):
    err = max_err(out, expected)
    err = max(err, abs(float(state.mean_example_norm) - norms.mean()) / norms.mean())
    err = max(err, abs(float(state.max_example_norm) - norms.max()) / norms.max())
    assert int(state.batch_examples) == batch, (name, state.batch_examples)
    assert int(state.examples_clipped) == int(np.sum(norms > clip)), name
    report(name, "per_example_clip", err)

  tx = clipjax.per_example_clip(clip, reduction="sum")
  for kind in (AxisType.Auto, AxisType.Explicit):
    mesh = mesh1(kind)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    ps = jax.device_put(params, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
      out, state = jax.jit(lambda p, x, y: tx.update(per_example(p, x, y), tx.init(p), p))(
          ps, xs, ys
      )
    check(f"jit-{str(kind).split('.')[-1].lower()}-1d-batch", out, state)

  mesh = mesh1(AxisType.Explicit)
  xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  for check_vma, axis, cast in [
      (True, "data", True),
      (True, "auto", True),
      (False, "data", False),
  ]:
    tx = clipjax.per_example_clip(clip, reduction="sum", axis_name=axis)

    def local(p, x, y, tx=tx, cast=cast):
      if cast:  # the docstring's recipe: each device's examples, its own gradients
        p = jax.lax.pcast(p, "data", to="varying")
      return tx.update(per_example(p, x, y), tx.init(p))

    f = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P()),
            check_vma=check_vma,
        )
    )
    out, state = f(ps, xs, ys)
    check(f"shard_map-{'vma' if check_vma else 'novma'}-{axis}", out, state)

  # With noise: drawn once from the replicated key after the sum, so the same on
  # every device and the unsharded run's draw.
  noisy = clipjax.per_example_clip(clip, reduction="mean", noise_multiplier=1.0, seed=3)
  want, _ = jax.jit(lambda p, x, y: noisy.update(per_example(p, x, y), noisy.init(p)))(params, x, y)
  noisy = clipjax.per_example_clip(
      clip, reduction="mean", noise_multiplier=1.0, seed=3, axis_name="auto"
  )

  def local_noisy(p, x, y):
    p = jax.lax.pcast(p, "data", to="varying")
    return noisy.update(per_example(p, x, y), noisy.init(p))[0]

  got = jax.jit(
      jax.shard_map(local_noisy, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
  )(ps, xs, ys)
  report("shard_map-vma-auto-noise", "per_example_clip", max_err(got, want))

  # dp_noise on a leaf split over the devices: each shard its own draw (not 8
  # copies of one), of the stated deviation, in shard_map and on an Explicit mesh.
  big = {"w": jnp.zeros((8, 4096)), "b": jnp.zeros(4)}
  layout = {"w": P("data"), "b": P()}
  noise = clipjax.dp_noise(1.0, 2.0, batch_size=None, axis_name="auto")
  in_shard_map = jax.jit(
      jax.shard_map(
          lambda u: noise.update(u, noise.init(u))[0],
          mesh=mesh,
          in_specs=(layout,),
          out_specs=layout,
      )
  )(place(big, mesh, layout))
  with jax.set_mesh(mesh):
    explicit = jax.jit(lambda u: noise.update(u, noise.init(u))[0])(place(big, mesh, layout))
  for name, out in (("shard_map", in_shard_map), ("jit-explicit", explicit)):
    w = np.asarray(out["w"], np.float64)
    assert abs(np.std(w) / 2.0 - 1) < 0.02, (name, np.std(w))
    corr = np.asarray(np.corrcoef(w))[np.triu_indices(8, 1)]
    assert np.max(np.abs(corr)) < 0.1, (name, corr)  # the shards are independent
    report(f"{name}-dp_noise-split", "dp_noise", 0.0)

  # Replicated parameters without the cast: each "per-example" gradient would be
  # that example's sum over the 8 devices. Refused, naming the fix.
  tx = clipjax.per_example_clip(clip, reduction="sum", axis_name="data")
  f = jax.jit(
      jax.shard_map(
          lambda p, x, y: tx.update(per_example(p, x, y), tx.init(p))[0],
          mesh=mesh,
          in_specs=(P(), P("data"), P("data")),
          out_specs=P(),
      )
  )
  refused(lambda: f(ps, xs, ys), "per-example gradients summed over the devices", "pcast")
  print("REFUSALS OK", flush=True)


if __name__ == "__main__":
  # argv: the group, and optionally the forms to trace under ('gpu': the GPU's,
  # whose joins, reshapes and float64 sums must respect the leaves' shardings too).
  group, forms = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
  from clipjax import _forms

  with _forms.use(_forms.NAMED[forms]) if forms else contextlib.nullcontext():
    {"jit": run_jit, "shard_map": run_shard_map, "dp": run_dp}[group]()
  print(f"DISTRIBUTED OK {checked}", flush=True)
