#!/usr/bin/env bash
# The GPU check of issue 10 in one command: install what is missing from wheels in .whl/ (the GPU
# machine has no network), then run `python -m benchmarks.gpu`, which prints a table and, as its
# last line, one JSON object; then `benchmarks.models` (issue 3) in fp16. Arguments go to benchmarks.gpu (e.g. --only sd15).
#
#   scripts/gpu_check.sh --fetch-wheels   # on a machine WITH network: fill .whl/ (git-ignored, ~7 MB)
#   scripts/gpu_check.sh                  # on the GPU machine (carry .whl along)
#
# Python: $PYTHON, else .venv/bin/python when its torch sees CUDA, else python3. The wheels are
# fetched for $GPU_PYTHON_VERSION (default 3.12) on manylinux x86_64 and installed with --no-deps
# into /tmp/site; torch itself is not fetched (the GPU machine must have a CUDA build). Output is
# copied to $OUT/gpu_check.txt when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

# What benchmarks.gpu imports that the GPU image (python3 3.12 with torch, transformers, numpy,
# safetensors, huggingface_hub, Pillow, regex, requests) lacks: module names, then their wheels.
MODULES=(diffusers ftfy importlib_metadata wcwidth)
WHEELS=(diffusers==0.42.1 importlib_metadata ftfy wcwidth)

if [ "${1:-}" = "--fetch-wheels" ]; then
    "${PYTHON:-.venv/bin/python}" -m pip download --no-deps --only-binary=:all: \
        --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    py=.venv/bin/python
else
    py=python3
fi

"$py" -c '
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check: this Python has no torch; install a CUDA build of torch first")
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "none (the benchmark runs its small CPU sizes)"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, device: {name}")
'

missing=$("$py" -c '
import importlib.util, sys
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
' "${MODULES[@]}")
if [ -n "$missing" ]; then
    if [ ! -d .whl ]; then
        echo "gpu_check: missing $missing and no .whl/ folder (run scripts/gpu_check.sh --fetch-wheels where there is network)" >&2
        exit 1
    fi
    echo "installing from .whl/ into /tmp/site (missing: $missing)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

log=$(mktemp)
status=0
"$py" -m benchmarks.gpu "$@" 2>&1 | tee "$log" || status=$?
# Issue 3's model benchmark in fp16 on the same card (about a minute): load time and RSS, UNet and VAE
# against diffusers. Skipped with LOOM_SKIP_MODELS=1 when the GPU time is short.
if [ "${LOOM_SKIP_MODELS:-0}" != 1 ]; then
    "$py" -m benchmarks.models --reps 2 2>&1 | tee -a "$log" || status=$?
fi
if [ -n "${OUT:-}" ]; then
    cp "$log" "$OUT/gpu_check.txt"
fi
exit "$status"
