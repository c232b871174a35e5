#!/usr/bin/env bash
# The GPU checks in one command: install what is missing from wheels in .whl/ (the GPU machine has no
# network), then run, each under its own time limit so a slow part cannot starve the next:
#   0. the tests that need CUDA (CI has none);                                   TESTS_S, default 60
#   1. `python -m benchmarks.gpu` (issue 10): a table, then one JSON object;       GPU_S, default 330
#   2. `benchmarks.memory` (issue 10): 200 varied workflows, RSS and VRAM;         MEMORY_S, default 150
#   3. `benchmarks.models` (issue 3) in fp16;                                      MODELS_S, default 0
#   4. scripts/train_demo.py on CUDA (issue 8), the demo-model command unchanged:  TRAIN_S, default 0
#      a one-minute run, or with TRAIN_MINUTES=M a full one that brings the checkpoint back (below).
# Each variable is that part's time limit in seconds; 0 skips the part. The defaults fit one device
# call (600 s at most). Arguments go to benchmarks.gpu (e.g. --only sdxl --fp8-variants).
#
#   scripts/gpu_check.sh --fetch-wheels   # on a machine WITH network: fill .whl/ (git-ignored, ~10 MB)
#   scripts/gpu_check.sh                  # on the GPU machine (carry .whl along)
#
# Python: $PYTHON, else .venv/bin/python when its torch sees CUDA, else python3. The wheels are
# fetched for $GPU_PYTHON_VERSION (default 3.12) on manylinux x86_64 and installed with --no-deps
# into /tmp/site; torch itself is not fetched (the GPU machine must have a CUDA build). Each part's
# output goes to $OUT/<part>.txt as it is printed when $OUT is set (so a run cut short keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

# What benchmarks.gpu imports that the GPU image (python3 3.12 with torch, transformers, numpy,
# safetensors, huggingface_hub, Pillow, regex, requests) lacks: module names, then their wheels.
# pydantic is the engine's (benchmarks.memory and the demo-model checker run workflows through it);
# torchsde makes the SDE samplers' Brownian noise.
MODULES=(diffusers ftfy importlib_metadata wcwidth pydantic torchsde)
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0 ftfy wcwidth pydantic==2.14.4 pydantic_core==2.50.5
        annotated_types typing_inspection typing_extensions torchsde==0.2.6 trampoline==0.1.2)

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

out="${OUT:-$(mktemp -d)}"
status=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, output to the terminal and $out/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds} s)"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.txt" || status=$?
}
# The CUDA-only tests first (`-m cuda`, seconds): CUDA-graph replays against plain launches, in ldm and the
# engine, channels-last against NCHW, a ControlNet run, and the preview copy; the other tests of those files
# run on the CPU in CI.
if [ "${TESTS_S:-60}" -gt 0 ]; then
    part tests "${TESTS_S:-60}" "$py" -m pytest -q -rs -m cuda tests/ldm/test_cuda_graphs.py \
        tests/nodes/test_device_options.py tests/nodes/test_controlnet_nodes.py tests/web/test_previews.py
fi
if [ "${GPU_S:-330}" -gt 0 ]; then
    part gpu "${GPU_S:-330}" "$py" -m benchmarks.gpu "$@"
fi
# The engine over 200 varied workflows on the tiny presets (samplers with Brownian noise, LoRA copies,
# several sizes: CUDA graphs per module and shape), with RSS and CUDA memory after every 20.
if [ "${MEMORY_S:-150}" -gt 0 ]; then
    part memory "${MEMORY_S:-150}" "$py" -m benchmarks.memory
fi
# Issue 3's model benchmark in fp16 on the same card (about a minute): load time and RSS, UNet and VAE
# against diffusers.
if [ "${MODELS_S:-0}" -gt 0 ]; then
    part models "${MODELS_S:-0}" "$py" -m benchmarks.models --reps 2
fi
# Issue 8: the demo model's one command, unchanged, on CUDA. With TRAIN_S alone, a one-minute run
# (throughput per stage) whose figures.json alone comes back. With TRAIN_MINUTES=M it trains for M
# minutes into $out/train-demo, whose six files (checkpoint included) come back: run that alone, as
# $OUT returns at most eight files, with TRAIN_S above M * 60 plus about a minute for data and checks
# (one device call runs at most 600 s: TESTS_S=0 GPU_S=0 MEMORY_S=0 TRAIN_MINUTES=7 TRAIN_S=578: the bundled model, 430 s).
if [ -n "${TRAIN_MINUTES:-}" ]; then
    part train "${TRAIN_S:-600}" "$py" scripts/train_demo.py "$out/train-demo" --work /tmp/train-demo \
        --minutes "$TRAIN_MINUTES"
elif [ "${TRAIN_S:-0}" -gt 0 ]; then
    part train "${TRAIN_S:-0}" "$py" scripts/train_demo.py /tmp/train-demo --minutes 1 --eval-n 16 --cfg 3
    cp /tmp/train-demo/figures.json "$out/train-figures.json" 2>/dev/null || true
fi
exit "$status"
