#!/usr/bin/env bash
# Train the bundled demo model into OUT_DIR (resumable: rerun the same command). See docs/training.md.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [--work DIR] [--minutes M] [--max-steps N] [--device cpu|cuda] [--eval-n N]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/train_demo.py "$@"
