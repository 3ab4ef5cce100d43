#!/usr/bin/env bash
# Set up (first time) and run `oomguard demo`: the embedded tiny model through an OOM, a NaN
# and their recoveries, with the summary at the end. Extra args go to `oomguard demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/oomguard demo "$@"
