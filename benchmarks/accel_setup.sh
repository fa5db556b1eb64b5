#!/usr/bin/env bash
# The two venvs in which benchmarks/accel_programs.py compiles for accelerators this
# machine does not have (deviceless ahead-of-time compilation), outside the repository:
#   $CLIPJAX_ACCEL_VENVS/cuda  jax[cuda12]: the CUDA wheels, about 5.5 GB (no driver or GPU needed)
#   $CLIPJAX_ACCEL_VENVS/tpu   jax[tpu]: libtpu, about 1.3 GB (no TPU needed)
# Default CLIPJAX_ACCEL_VENVS: ~/.cache/clipjax-accel. Each gets the jax version of the
# project's .venv (so that the programs are those of the jax the project runs), optax,
# chex and numpy; the project itself comes from PYTHONPATH (see the Makefile's accel-test).
# Usage: accel_setup.sh [cuda] [tpu] (default both).
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
V="${CLIPJAX_ACCEL_VENVS:-$HOME/.cache/clipjax-accel}"
JAXV="$("$ROOT/.venv/bin/python" -c 'import jax; print(jax.__version__)' 2>/dev/null || python3 -c 'import jax; print(jax.__version__)')"
mkdir -p "$V"
for kind in ${@:-cuda tpu}; do
  case "$kind" in
    cuda) extra=cuda12 ;;
    tpu) extra=tpu ;;
    *) echo "accel_setup.sh: unknown venv '$kind' (cuda or tpu)" >&2; exit 2 ;;
  esac
  [ -x "$V/$kind/bin/python" ] || python3 -m venv "$V/$kind"
  "$V/$kind/bin/pip" install -q "jax[$extra]==$JAXV"
  "$V/$kind/bin/pip" install -q optax chex numpy
  echo "$kind: $V/$kind/bin/python (jax $("$V/$kind/bin/python" -c 'import jax; print(jax.__version__)'))"
done
