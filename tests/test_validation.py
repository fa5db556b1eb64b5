"""Every kind of bad input gets a clear error (or a documented result)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import clipjax

BAD_THRESHOLDS = [
    (-1.0, ValueError, "0, got -1.0"),
    (float("nan"), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
    (np.ones(2), ValueError, "scalar"),
    (True, TypeError, "bool"),
    ("1.0", TypeError, "real number"),
    (None, TypeError, "real number"),
]

FACTORIES = {
    "clip_by_value": (clipjax.clip_by_value, "max_delta"),
    "clip_by_norm": (clipjax.clip_by_norm, "max_norm"),
    "clip_by_global_norm": (clipjax.clip_by_global_norm, "max_norm"),
    "clip_by_block_rms": (clipjax.clip_by_block_rms, "threshold"),
    "adaptive_grad_clip": (clipjax.adaptive_grad_clip, "clipping"),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("value,exc,msg", BAD_THRESHOLDS, ids=lambda v: repr(v)[:12])
def test_bad_threshold_is_rejected_at_construction(name, value, exc, msg):
  factory, arg = FACTORIES[name]
  with pytest.raises(exc, match=arg) as info:
    factory(value)
  assert msg in str(info.value)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_numpy_and_jax_scalars_are_accepted(name):
  factory, _ = FACTORIES[name]
  factory(np.float32(0.5))
  factory(jnp.asarray(0.5))
  factory(1)


def test_agc_zero_clipping_and_eps_are_meaningless():
  with pytest.raises(ValueError, match="clipping must be > 0"):
    clipjax.adaptive_grad_clip(0.0)
  with pytest.raises(ValueError, match="eps must be > 0"):
    clipjax.adaptive_grad_clip(0.1, eps=0.0)
  with pytest.raises(TypeError, match="axis"):
    clipjax.adaptive_grad_clip(0.1, axis="rows")


@pytest.mark.parametrize("ord_", [0, 0.5, -1, "fro", float("nan"), "two"])
@pytest.mark.parametrize("factory", [clipjax.clip_by_norm, clipjax.clip_by_global_norm])
def test_unsupported_ord(factory, ord_):
  with pytest.raises(ValueError, match="ord must be a number >= 1 or inf"):
    factory(1.0, ord=ord_)


@pytest.mark.parametrize(
    "factory",
    [
        clipjax.clip_by_norm,
        clipjax.clip_by_global_norm,
        clipjax.clip_by_block_rms,
        clipjax.clip_by_value,
        clipjax.adaptive_grad_clip,
    ],
)
def test_unknown_nonfinite_policy(factory):
  with pytest.raises(ValueError, match="nonfinite must be one of"):
    factory(1.0, nonfinite="ignore")


@pytest.mark.parametrize(
    "dtype,exc",
    [
        ("float16", ValueError),
        ("int32", ValueError),
        ("float64", ValueError),
        ("not-a-dtype", TypeError),
    ],
)
def test_bad_norm_dtype(dtype, exc):
  # float64 needs jax_enable_x64, which the suite leaves off.
  with pytest.raises(exc, match="norm_dtype"):
    clipjax.clip_by_global_norm(1.0, norm_dtype=dtype)


def test_integer_leaf_is_a_type_error_at_first_call():
  tx = clipjax.clip_by_global_norm(1.0)
  grads = {"w": jnp.ones(3), "step": jnp.array(3, jnp.int32)}
  with pytest.raises(TypeError, match=r"\['step'\].*int32"):
    tx.update(grads, tx.init(grads))


def test_complex_leaf_is_a_type_error():
  tx = clipjax.clip_by_norm(1.0)
  grads = {"z": jnp.ones(2, jnp.complex64)}
  with pytest.raises(TypeError, match="complex"):
    tx.update(grads, tx.init(grads))


def test_empty_pytree_is_identity_with_zero_norm():
  for tx in [
      clipjax.clip_by_global_norm(1.0),
      clipjax.clip_by_norm(1.0),
      clipjax.clip_by_value(1.0),
      clipjax.clip_by_block_rms(1.0),
  ]:
    out, state = tx.update({}, tx.init({}))
    assert out == {} and float(state.pre_clip_norm) == 0.0 and not bool(state.clipped)


def test_none_leaves_are_skipped():
  grads = {"w": jnp.array([3.0, 4.0]), "frozen": None}
  tx = clipjax.clip_by_global_norm(1.0)
  out, state = tx.update(grads, tx.init(grads))
  assert out["frozen"] is None
  np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8], rtol=1e-6)


def test_agc_needs_params():
  tx = clipjax.adaptive_grad_clip(0.1)
  g = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(g, tx.init(g))


def test_agc_rank_5_needs_axis():
  tx = clipjax.adaptive_grad_clip(0.1)
  g = {"w": jnp.ones((2, 2, 2, 2, 2))}
  with pytest.raises(ValueError, match="rank 5.*axis="):
    tx.update(g, tx.init(g), g)
  tx = clipjax.adaptive_grad_clip(0.1, axis=(0, 1, 2, 3))
  out, _ = tx.update(g, tx.init(g), g)
  assert out["w"].shape == g["w"].shape


def test_agc_axis_out_of_range_and_shape_mismatch():
  g = {"w": jnp.ones((2, 3))}
  tx = clipjax.adaptive_grad_clip(0.1, axis=2)
  with pytest.raises(ValueError, match="out of range"):
    tx.update(g, tx.init(g), g)
  tx = clipjax.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="differ"):
    tx.update(g, tx.init(g), {"w": jnp.ones((3, 2))})


def test_traced_ord_explains_static_args():
  import optax

  tx = optax.inject_hyperparams(clipjax.clip_by_global_norm)(max_norm=1.0, ord=1)
  g = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="static_args"):
    import jax

    jax.jit(tx.update)(g, tx.init(g))


AXIS_FACTORIES = [
    lambda **kw: clipjax.clip_by_global_norm(1.0, **kw),
    lambda **kw: clipjax.clip_by_norm(1.0, **kw),
    lambda **kw: clipjax.clip_by_block_rms(1.0, **kw),
    lambda **kw: clipjax.adaptive_grad_clip(0.1, **kw),
    lambda **kw: clipjax.autoclip(10.0, **kw),
    lambda **kw: clipjax.zclip(**kw),
    lambda **kw: clipjax.skip_spikes(clipjax.clip_by_global_norm(1.0), **kw),
    lambda **kw: clipjax.adagc(**kw),
    lambda **kw: clipjax.clip_by_group_norm(1.0, lambda u: jax.tree.map(lambda _: 0, u), **kw),
    lambda **kw: clipjax.record_leaf_norms(**kw),
]


@pytest.mark.parametrize("factory", AXIS_FACTORIES)
@pytest.mark.parametrize("bad", [3, ("x", 1), (), ["x"], "", ("x", "")], ids=repr)
def test_bad_axis_name_is_rejected_at_construction(factory, bad):
  with pytest.raises(ValueError, match="axis_name must be 'auto', None, an axis name"):
    factory(axis_name=bad)


@pytest.mark.parametrize("factory", AXIS_FACTORIES)
@pytest.mark.parametrize("good", ["auto", P("x"), {"w": P(), "b": P("x")}], ids=repr)
def test_auto_and_partition_specs_are_accepted_at_construction(factory, good):
  factory(axis_name=good)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ({"w": "x"}, "prefix of the updates' structure"),
        ({"w": "x", "b": 1}, "gave 1 for a leaf"),
    ],
)
def test_per_leaf_axis_name_must_match_the_updates(spec, msg):
  g = {"w": jnp.ones(3), "b": jnp.ones(2)}
  tx = clipjax.clip_by_global_norm(1.0, axis_name=lambda u: spec)
  with pytest.raises(ValueError, match=msg):
    tx.update(g, tx.init(g))


def test_per_leaf_axis_name_of_all_none_is_the_unsharded_norm():
  g = {"w": jnp.array([3.0]), "b": jnp.array([4.0])}
  tx = clipjax.clip_by_global_norm(1.0, axis_name=lambda u: {"w": None, "b": None})
  assert float(tx.update(g, tx.init(g))[1].pre_clip_norm) == 5.0


@pytest.mark.parametrize(
    "make, one_example",
    [
        (lambda impl: clipjax.clip_by_global_norm(1.0, implementation=impl), False),
        (lambda impl: clipjax.adaptive_grad_clip(0.1, implementation=impl), False),
        (lambda impl: clipjax.per_example_clip(1.0, reduction="sum", implementation=impl), True),
    ],
)
def test_implementation_is_deprecated_and_still_works_this_release(make, one_example):
  grads = {"w": jnp.asarray([[3.0, 4.0], [1e-39, 2.0]])}
  params = jax.tree.map(lambda g: jnp.ones_like(g[0] if one_example else g), grads)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # not given: no warning
    default = make(None)
  want, _ = default.update(grads, default.init(params), params)
  with pytest.warns(DeprecationWarning, match="implementation= is deprecated"):
    tx = make("multiscale")
  got, _ = tx.update(grads, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
