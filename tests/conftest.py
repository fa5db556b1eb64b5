import os

import hypothesis

hypothesis.settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A script run in its own process by test_sharding.py (it needs 8 fake devices
# before jax starts); importing it here, e.g. for doctests, would run it.
collect_ignore = ["sharding_check.py"]


def use_implementation(monkeypatch, impl: str) -> None:
  """Makes `clipjax.X(...)` in the calling test mean `clipjax.X(..., implementation=impl)`.

  So that every test of a module runs with both norm implementations (the CPU's
  and the GPU/TPU one) on any machine, without each test passing the argument.
  """
  import functools
  import inspect

  import clipjax

  for name in clipjax.__all__:  # every public function that takes the argument
    fn = getattr(clipjax, name)
    if inspect.isfunction(fn) and "implementation" in inspect.signature(fn).parameters:
      monkeypatch.setattr(clipjax, name, functools.partial(fn, implementation=impl))
