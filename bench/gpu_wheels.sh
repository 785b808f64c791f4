#!/usr/bin/env bash
# Prepare, on this machine (PyPI reachable), what bench/gpu_check.sh needs on a GPU machine that has no
# network: the Python packages its image lacks, as wheels for CPython 3.12 on x86-64 Linux, and the
# built-in model's tokenizer. Everything goes to .whl/ (git-ignored: copy it along by hand).
#
#   bench/gpu_wheels.sh            # then, on the GPU machine with .whl/ copied along: bench/gpu_check.sh
#
# The image has torch, transformers, peft, accelerate, sacrebleu, rich, tensorboard, msgpack, ninja,
# psutil, py-cpuinfo, einops, regex, joblib, click, tqdm, cloudpickle, pyyaml. Missing: deepspeed (built
# here as its pure-Python wheel: no ops compiled, DeepSpeed builds what it needs at first use), submitit,
# pydantic (+ pydantic-core, annotated-types, typing-inspection), nltk, hjson. Versions: the ones this
# project tests with (constraints.txt / the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST"

version() {  # the installed version of a distribution in this venv
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
pins=()
for name in submitit pydantic pydantic_core annotated-types typing-inspection nltk hjson bitsandbytes; do
    pins+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${pins[@]}"
# Liger's Triton kernels (training.liger_kernel; pure Python, Triton comes with the image's torch). flash-attn is
# not carried: PyPI has only its source, which compiles against the image's CUDA torch for hours; the check runs
# flash_attention_2 where the image has it.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "liger-kernel==0.8.5"

# The built-in model's character tokenizer: the GPU run's ~1B model is built from a config there.
"$PY" - "$DEST/tokenizer" <<'EOF'
import shutil
import sys
from pathlib import Path

from launcher.builtins.tiny import ensure_tiny_model

src, dest = ensure_tiny_model(), Path(sys.argv[1])
dest.mkdir(parents=True)
for path in src.iterdir():
    if path.name.startswith(("tokenizer", "special_tokens")):
        shutil.copy(path, dest / path.name)
EOF
ls -la "$DEST" "$DEST/tokenizer"
du -sh "$DEST"
