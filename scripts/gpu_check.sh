#!/usr/bin/env bash
# One prepared command for a lent GPU: everything the project measures on CUDA, in <= 8 minutes, no network.
#
#   scripts/gpu_check.sh OUT          # on a machine with one CUDA GPU
#   scripts/gpu_check.sh --cpu OUT    # the same steps on CPU in tiny sizes (< 2 minutes): the rehearsal CI runs
#
# Writes OUT/gpu_check.json (every figure), OUT/gpu_check.log (this output) and each step's files under OUT.
# Needs python3 with torch, torchvision, timm, safetensors, pyyaml, protobuf, tqdm, matplotlib, scikit-learn and
# pytest; the package runs from this checkout (PYTHONPATH), nothing is installed or downloaded.
# PYTHON=/path/to/python picks the interpreter (default python3); XCIT_GPU_CHECK_BUDGET=SECONDS the time budget
# (450 s on a GPU, 105 s with --cpu; each step's limit scales with it).
set -euo pipefail
cpu=""
out=""
for a in "$@"; do
  case "$a" in
    --cpu) cpu="--cpu" ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a (usage: scripts/gpu_check.sh [--cpu] OUT)" >&2; exit 2 ;;
    *) out="$a" ;;
  esac
done
if [ -z "$out" ]; then
  echo "usage: scripts/gpu_check.sh [--cpu] OUT" >&2
  exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"${PYTHON:-python3}" scripts/gpu_check.py $cpu "$out" 2>&1 | tee "$out/gpu_check.log"
