#!/usr/bin/env bash
# The GPU check (docs/gpu.md): put the carried wheels on the path, then run scripts/gpu/check.py.
#
#   bash scripts/gpu/check.sh                  # on the GPU machine; summary in $OUT (or gpu_check_out/)
#   PYTHON=.venv/bin/python bash scripts/gpu/check.sh --cpu-dry-run --out /tmp/gpu_check
#
# Where Megatron-Core or pydantic is missing (the H200 image), the wheels in .cache/gpu-wheels/
# (scripts/gpu/wheels.sh fetches them) are installed into a private folder put first on PYTHONPATH,
# never into the machine's Python; where both are present (the project's .venv) nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=.cache/gpu-wheels
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("megatron.core") and u.find_spec("pydantic")))' 2>/dev/null \
    && compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=${TMPDIR:-/tmp}/gpu_check_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu/check.py "$@"
