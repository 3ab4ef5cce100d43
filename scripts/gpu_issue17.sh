#!/usr/bin/env bash
# Issue 17 on one GPU, one call per PHASE (shared/gpu/README.md: carry .whl, begin with `. .whl/env.sh &&`):
#   . .whl/env.sh && OUT=$OUT PHASE=1 bash scripts/gpu_issue17.sh
# PHASE=1: wrapped `trl sft` cold vs warm on the Llama-3-8B shape (does the worker fork from the warm
#          launcher?), then the guard's per-step cost on the 8B (bench_guard, the ledger in).
# PHASE=2: wrapped `trl sft` cold vs warm again (the worker pre-forked before the launcher's code), then the
#          guard's per-step cost on the tiny model (many steps).
# PHASE=3: the guard's per-step cost on the tiny model and on the 8B after the hand-over and clearer mends
#          (session 10: the four-launch hand-over, files kept open, the heartbeat every 0.5 s).
# PHASE=4: wrapped `trl sft` cold vs warm on the 8B shape again, on accelerate 1.16 (its launcher tees the worker's
#          stderr through a pipe; carry its wheel: EXTRA="accelerate==1.16.0" ../shared/gpu/prepare-wheels.sh).
# GPU clocks and power are sampled every 200 ms during the guard runs (smi-*.csv), and the host's load.
set -u
OUT=${OUT:?set OUT}; PHASE=${PHASE:-1}
MODEL=${BENCH_MODEL:-/tmp/llama3-8b-random}; TINY=${BENCH_TINY:-/tmp/bench-tiny}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
{ nproc; uptime; df -T /tmp; python3 -c "import accelerate, trl; print('accelerate', accelerate.__version__, 'trl', trl.__version__)"; ps -eo pcpu,rss,comm --sort=-pcpu | head -8; } > "$OUT/host.txt" 2>&1

smi() { nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
          --format=csv,noheader -lms 200 > "$OUT/smi-$1.csv" 2>&1 & echo $!; }
guard() {  # name, timeout, bench_guard args...
    local name=$1 limit=$2; shift 2
    local pid; pid=$(smi "$name")
    timeout "$limit" python3 scripts/bench_guard.py --out "/tmp/guard-$name" --exit-runs 0 "$@" \
        > "$OUT/guard-$name.log" 2>&1; echo "rc=$?" >> "$OUT/guard-$name.log"
    kill "$pid" 2>/dev/null
    cp "/tmp/guard-$name/cost.json" "$OUT/guard-$name-cost.json" 2>/dev/null
    sed -n '/^bench_guard (/,$p' "$OUT/guard-$name.log"
}

restart() {  # trl sft cold and warm on the 8B shape, one sample each
    timeout 330 python3 scripts/bench_restart.py --device cuda --model llama3-8b --samples 1 --batch 2 --seq 1024 \
        --commands trl --long-fail-at 30 --long-save 10 --hf-model-dir "$MODEL" --model-dir "$MODEL" \
        --out /tmp/br > "$OUT/restart.log" 2>&1; echo "rc=$?" >> "$OUT/restart.log"
    cp /tmp/br/results.json "$OUT/restart-results.json" 2>/dev/null
    tar czf "$OUT/restart-runs.tgz" -C /tmp --exclude="checkpoint-*" --exclude="*.safetensors" --exclude="*.pt" \
        --exclude="*.bin" --exclude="data" br 2>/dev/null
    tail -8 "$OUT/restart.log"
}

if [ "$PHASE" = 1 ]; then
    restart
    guard 8b 230 --model "$MODEL" --arch 8b --steps 70
elif [ "$PHASE" = 2 ]; then
    restart
    python3 scripts/bench_common.py --arch tiny --out "$TINY" > "$OUT/build.log" 2>&1
    guard tiny 200 --model "$TINY" --arch tiny --steps 800
elif [ "$PHASE" = 3 ]; then
    python3 scripts/bench_common.py --arch tiny --out "$TINY" > "$OUT/build.log" 2>&1
    guard tiny 200 --model "$TINY" --arch tiny --steps 800
    python3 scripts/bench_common.py --out "$MODEL" >> "$OUT/build.log" 2>&1
    guard 8b 240 --model "$MODEL" --arch 8b --steps 70
elif [ "$PHASE" = 4 ]; then
    restart
fi
# what comes back is a few files: the side files go in one archive
(cd "$OUT" && tar czf aux.tgz --remove-files smi-*.csv build.log host.txt gpu.csv 2>/dev/null)
