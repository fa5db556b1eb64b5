import contextlib
import functools
import os
import re

import hypothesis
import jax
import jax.numpy as jnp

hypothesis.settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Scripts, not test modules: sharding_check.py runs in its own process from
# test_sharding.py (it needs 8 fake devices before jax starts; importing it here,
# e.g. for doctests, would run it); package_check.py is `make package`.
collect_ignore = [
    "sharding_check.py",
    "package_check.py",
    "distributed_check.py",
    "multiprocess_check.py",
]


def orbax_round_trip(tree, path):
  """`tree` saved with Orbax under `path` and restored (to its own shapes and dtypes)."""
  import pytest

  ocp = pytest.importorskip("orbax.checkpoint")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


def forms_named(name: str):
  """The forms a test parameter names: a platform's ('gpu', 'tpu', 'cpu', 'plain'), or
  this machine's with its norms computed as `name` ('cond', 'multiscale', 'wide')."""
  from clipjax import _forms

  if name in _forms.NAMED:
    return _forms.NAMED[name]
  return _forms.for_trace().with_norms(name)  # type: ignore[arg-type]


@functools.cache
def with_implementation(fn, impl: str):
  """`fn` (a public clipjax factory or norm function) traced under `forms_named(impl)`.

  Through `clipjax._forms` (the deprecated ``implementation=`` warns): a
  transform's updates are traced under those forms. One wrapper per (fn,
  impl), so that programs keyed by the factory are shared.
  """
  import optax

  from clipjax import _forms

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with _forms.use(forms_named(impl)):
      out = fn(*args, **kwargs)
    if isinstance(out, optax.GradientTransformation):
      return _forms.with_forms(out, lambda: forms_named(impl))
    return out

  return wrapped


def use_implementation(monkeypatch, impl: str) -> None:
  """Makes `clipjax.X(...)` in the calling test compute its norms as `impl`.

  So that every test of a module runs under each form of the norms ('cond',
  the default on CPU and TPU, 'multiscale', and the GPU's forms, 'gpu') on any
  machine, without each test saying so.
  """
  import inspect

  import clipjax

  for name in clipjax.__all__:  # every public function whose norms have forms
    fn = getattr(clipjax, name)
    if inspect.isfunction(fn) and "implementation" in inspect.signature(fn).parameters:
      monkeypatch.setattr(clipjax, name, with_implementation(fn, impl))


def _program_key(fn):
  # (a partial made per test is keyed by what it wraps)
  if isinstance(fn, functools.partial):
    return (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
  return (fn,)


_PROGRAMS: dict = {}


def shared(key, build):
  """``build()``, made once per `key` across the tests of a process.

  For compiled programs (and what they close over) that several tests use:
  each one built anew would be traced and compiled anew.
  """
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def shared_jit(fn, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)``, one per function across tests (see `traced_update`)."""
  key = (_program_key(fn), tuple(sorted(jit_kwargs.items())))
  return shared(key, lambda: jax.jit(fn, **jit_kwargs))


def traced_update(factory, grads, params=None, *, static=None, **hypers):
  """``factory(**hypers, **static)``'s first update, jitted with `hypers` traced.

  Tests that differ only in a threshold's value then share one compiled program
  (as a schedule through ``optax.inject_hyperparams`` does) instead of compiling
  one per value; `static` holds the arguments that shape the program (``ord``,
  sizes, the implementation). Returns (updates, state).
  """
  static = dict(static or {})
  key = ("update", _program_key(factory), tuple(sorted(static.items())), tuple(sorted(hypers)))

  def first_update(grads, params, hypers):
    tx = factory(**hypers, **static)
    return tx.update(grads, tx.init(grads), params)

  program = shared(key, lambda: jax.jit(first_update))
  return program(grads, params, {k: jnp.float32(v) for k, v in hypers.items()})


def override(config, **dotted):
  """Sets config fields by dotted path (``**{"clip.name": "zclip"}``); returns the config."""
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    setattr(node, leaf, value)
  return config


def cpu_hlo(fn, *args) -> str:
  """The optimized HLO text of jit(fn)(*args), compiled for the CPU whatever the default backend.

  (The arguments are placed there, and traced under it as the default device.)
  The counts the tests document are the CPU's: a GPU fuses sibling sums, and
  clipjax traces other forms for it (`clipjax._forms`).
  """
  cpu = jax.devices("cpu")[0]
  args = jax.device_put(args, cpu)
  with jax.default_device(cpu):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
  assert hlo is not None
  return hlo


def reads_per_leaf(fn, *args, leaves: int) -> dict[str, dict[str, int]]:
  """{parameter: {op: count}} for the first `leaves` parameters of `cpu_hlo(fn, *args)`."""
  hlo = cpu_hlo(fn, *args)
  entry = hlo[hlo.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  params = [(name, int(i)) for name, i in re.findall(r"(%[^\s=]+) = \S+ parameter\((\d+)\)", entry)]
  out = {}
  for name, index in params:
    if index >= leaves:
      continue
    ops: dict[str, int] = {}
    for line in entry.split("\n"):
      if " parameter(" in line or not re.search(re.escape(name) + r"[,)\s]", line):
        continue
      op = re.search(r"\s([a-z][a-z0-9-]*)\(", line.split("=", 1)[1])
      if op is not None:
        ops[op.group(1)] = ops.get(op.group(1), 0) + 1
    out[name] = ops
  return out


def gradient_reads(ops: dict[str, int]) -> int:
  """Reads in `reads_per_leaf`'s count of one leaf: the rescue branch's operand tuple is none."""
  return sum(n for op, n in ops.items() if op != "tuple")


def subprocess_limit(seconds: float) -> float:
  """`seconds` times $CLIPJAX_TEST_TIMEOUT_SCALE (default 1), for slow or loaded machines."""
  return seconds * float(os.environ.get("CLIPJAX_TEST_TIMEOUT_SCALE", "1"))


def _kill_group(proc) -> None:
  import signal

  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)


def run_processes(cmds: list[list[str]], *, limit: float, what: str, **popen_kwargs) -> list:
  """Runs `cmds` at once, each in a process group of its own, within `limit` seconds
  (scaled, see `subprocess_limit`); returns their CompletedProcess. Past the
  limit every group (children included) is killed and the test fails with one
  line naming `what` and the limit; the groups are killed in any case on the
  way out, so that no child outlives the test.
  """
  import subprocess
  import time

  import pytest

  limit = subprocess_limit(limit)
  procs = [
      subprocess.Popen(
          cmd,
          start_new_session=True,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          **popen_kwargs,
      )
      for cmd in cmds
  ]
  deadline = time.monotonic() + limit
  results = []
  try:
    for cmd, proc in zip(cmds, procs):
      try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        for p in procs:
          _kill_group(p)
        pytest.fail(
            f"{what} ran past its {limit:.0f} s limit and was killed "
            "(set CLIPJAX_TEST_TIMEOUT_SCALE on a slow machine)",
            pytrace=False,
        )
      results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        _kill_group(p)
        p.communicate()
  return results


def run_process(cmd: list[str], *, limit: float, what: str, **popen_kwargs):
  """`run_processes` for one command."""
  return run_processes([cmd], limit=limit, what=what, **popen_kwargs)[0]
