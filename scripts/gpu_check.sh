#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py says what it runs and writes):
#   bash scripts/gpu_check.sh --out=$OUT              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run --out=DIR     # anywhere, tiny sizes (tested in CI)
# On the GPU machine the Python packages its image lacks come as wheels in .whl/ (made here by
# scripts/gpu_prepare.sh), installed with --no-deps --target beside the image's own jax, torch,
# flax, optax and orbax (for a Python 3.12 interpreter only); PYTHON overrides the interpreter
# (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The wheels are built for Python 3.12 (the GPU image's); another interpreter uses its own packages.
if compgen -G ".whl/*.whl" >/dev/null && [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" = True ]; then
  site=/tmp/ltd_jax_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" .whl/*.whl || { echo "error: installing .whl/*.whl failed" >&2; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" scripts/gpu_check.py "$@"
