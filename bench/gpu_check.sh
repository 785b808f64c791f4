#!/usr/bin/env bash
# The GPU run in one command, for a GPU machine without network (bench/gpu_check.py says what it runs).
# Prepare where PyPI is reachable: bench/gpu_wheels.sh (fills .whl/ with the wheels the image lacks and the
# tokenizer); copy the checkout with .whl/ to the GPU machine and run bench/gpu_check.sh there.
# Results go to $OUT if set, else ./gpu-check-out: gpu_check.json, gpu_check.md and one log per run.
#   bench/gpu_check.sh --smoke     # CPU, tiny model, 2 steps, with this checkout's own Python (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [[ " $* " != *" --smoke "* ]]; then
    if [[ ! -d .whl ]]; then
        echo "no .whl/ here: run bench/gpu_wheels.sh where PyPI is reachable and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export LAUNCHER_CACHE_DIR=${LAUNCHER_CACHE_DIR:-/tmp/launcher-cache}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py --out "${OUT:-gpu-check-out}" "$@"
