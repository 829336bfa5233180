#!/usr/bin/env bash
# Calibrate one GPU and replay a trace slice under the validation policies (a few minutes of GPU
# time). Needs python3 + torch + numpy only. Then, anywhere: expertsim validate --measured DIR.
#   benchmarks/gpu_validate.sh [--device cuda|cpu] [--bundle slice.npz] [--out DIR] [--policies a,b:2]
# PYTHON picks the interpreter (default python3); GPU_VALIDATE_TIMEOUT_S the hard limit (480 s).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_VALIDATE_TIMEOUT_S:-480}" "${PYTHON:-python3}" "$repo/benchmarks/gpu_validate.py" "$@"
