#!/usr/bin/env bash
# On a GPU machine, from the project root: the GPU tests, then `oomguard demo` on CUDA.
# Everything lands in ${OUT:-gpu-out}/: pytest.log, demo.log and results.tgz (per-test JSON,
# versions, the demo's run.json and events).   Usage: bash scripts/gpu_check.sh [pytest args]
set -uo pipefail
OUT=${OUT:-gpu-out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export OOMGUARD_GPU_OUT="$WORK/tests" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/gpu.csv" 2>&1
python3 -c "import torch, transformers, peft, trl, bitsandbytes as b; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, trl.__version__, b.__version__)" > "$WORK/versions.txt" 2>&1
date -u +%FT%TZ > "$WORK/date.txt"
python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -q -s "$@" 2>&1 | tee "$OUT/pytest.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest.log"
if [ -z "${SKIP_DEMO:-}" ]; then
    python3 -m oomguard demo --run-dir "$WORK/demo-run" > "$OUT/demo.log" 2>&1
    echo "demo exit: $?" | tee -a "$OUT/demo.log"
    tail -25 "$OUT/demo.log"
fi
tar -czf "$OUT/results.tgz" -C "$WORK" --exclude='checkpoints' --exclude='*.safetensors' --exclude='*.pt' .
