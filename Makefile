# Two entry points (see README): `make demo` runs the flagship experiment on the
# CPU, `make test` runs lint, the docs build and the whole test suite. Both
# create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format docs package venv clean accel accel-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[experiments,test,docs]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.report --profile=demo --outdir=results

# ruff: lint rules; pyink: the formatting (run `make format` to apply it); mypy: types.
lint: $(STAMP)
	$(PY) -m ruff check clipjax experiments benchmarks tests conftest.py
	$(PY) -m pyink --check --quiet clipjax experiments benchmarks tests conftest.py docs/conf.py docs/conftest.py
	$(PY) -m mypy clipjax experiments benchmarks tests

format: $(STAMP)
	$(PY) -m pyink --quiet clipjax experiments benchmarks tests conftest.py docs/conf.py docs/conftest.py
	$(PY) -m ruff check --fix clipjax experiments benchmarks tests conftest.py
	$(PY) -m tests.test_layout --write

# The docs site (Sphinx + MyST): warnings are errors. Doctests in docs/*.md run under pytest.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# The sdist and wheel as a user gets them; the wheel installed with no extras in a
# new venv, where the README's quick start runs (tests/package_check.py).
package: $(STAMP)
	$(PY) tests/package_check.py

# Two pytest runs: every test but those marked xla_default_cpu_codegen with XLA's
# faster CPU code generation (half the cold compile time, see conftest.py), then
# those under XLA's default. pytest exits 5 when it collected no test: treat that as
# a failure too. worksteal: an idle worker takes tests queued on the other, so the
# slow tests do not pile up at the end of one worker's queue.
PYTEST := $(PY) -m pytest -q -n 2 --dist worksteal -p no:cacheprovider
NO_TESTS := if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
test: lint docs package
	CLIPJAX_TEST_FAST_CPU_CODEGEN=1 $(PYTEST) -m "not xla_default_cpu_codegen"; rc=$$?; \
	  $(NO_TESTS); [ $$rc -eq 0 ] || exit $$rc
	$(PYTEST) -m xla_default_cpu_codegen; rc=$$?; $(NO_TESTS); exit $$rc

# The GPU (H100) and TPU (v5e) programs, compiled on this machine without either
# (benchmarks/accel_programs.py): `make accel` makes the two venvs they need outside
# the repository (about 6.8 GB: jax[cuda12] 5.5 GB, jax[tpu] 1.3 GB, in
# $(ACCEL_VENVS)); `make accel-test` runs the tests that guard the programs (about
# 10 minutes on 2 cores). `make test` skips those tests with a one-line reason.
ACCEL_VENVS ?= $(HOME)/.cache/clipjax-accel
accel:
	CLIPJAX_ACCEL_VENVS=$(ACCEL_VENVS) benchmarks/accel_setup.sh

accel-test: $(STAMP)
	CLIPJAX_ACCEL_TEST=1 CLIPJAX_ACCEL_VENVS=$(ACCEL_VENVS) $(PY) -m pytest -q -n 2 \
	  --dist loadgroup -p no:cacheprovider tests/test_accel_programs.py

clean:
	rm -rf $(VENV) results .pytest_cache docs/_build build *.egg-info
