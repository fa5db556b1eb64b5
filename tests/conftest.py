import os

import hypothesis

hypothesis.settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A script run in its own process by test_sharding.py (it needs 8 fake devices
# before jax starts); importing it here, e.g. for doctests, would run it.
collect_ignore = ["sharding_check.py"]
