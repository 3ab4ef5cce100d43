#!/usr/bin/env bash
# GPU benchmarks (issues 6 and 8) on a 2-GPU machine, in lanes (one per GPU) so one call does
# twice the work. On the device machine, with the wheels carried (shared/gpu/README.md):
#   . .whl/env.sh && OUT=$OUT PHASE=1 bash scripts/gpu_bench.sh
# PHASE=1: 2-GPU DDP test + scenarios a,c (GPU 0) and b,nan (GPU 1).
# PHASE=2: scenario leak + the 15 GiB sweep (GPU 0); the 24 GiB sweep + memory benchmark (GPU 1).
#          The sweeps also measure the final configurations in benchmarks/results/bench-run-*.json.
# PHASE=3: the DDP test again, then the 24 GiB sweep (GPU 0); scenario a2 and the oomguard way of
#          c and leak again (GPU 1).
# PHASE=4: overhead benchmark (GPU 0); the 15 GiB sweep again, plain HF with expandable segments on a (GPU 1).
# PHASE=5: overhead again (GPU 0) and the oomguard way of a2 and c (GPU 1), after the cache clearer fix.
# Everything lands in $OUT (JSON results + logs.tgz); BUDGET_S bounds the whole call.
set -u
OUT=${OUT:?set OUT}; PHASE=${PHASE:-1}; BUDGET_S=${BUDGET_S:-540}
MODEL=${BENCH_MODEL:-/tmp/llama3-8b-random}; TINY=${BENCH_TINY:-/tmp/bench-tiny}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOGS=$OUT/logs; mkdir -p "$LOGS"
START=$(date +%s); DEADLINE=$((START + BUDGET_S - 150))   # no new run starts in the last 150 s
# final configurations of earlier phases' runs: the sweeps measure them too
FINALS=$(ls benchmarks/results/*-recovery/p*-run-*.json 2>/dev/null)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$LOGS/gpus.csv" 2>&1
lane() { local gpu=$1 name=$2; shift 2; CUDA_VISIBLE_DEVICES=$gpu timeout $((BUDGET_S - 20)) "$@" > "$LOGS/$name.log" 2>&1; echo "rc=$?" >> "$LOGS/$name.log"; }

if [ "$PHASE" = 1 ]; then
  (OOMGUARD_GPU_OUT=$OUT timeout 300 python3 -m pytest -m gpu tests/gpu/test_gpu_ddp.py -s -p no:cacheprovider \
      > "$LOGS/ddp.log" 2>&1; echo "rc=$?" >> "$LOGS/ddp.log") &
fi
python3 scripts/bench_common.py --out "$MODEL" > "$LOGS/build.log" 2>&1 || { echo "model build failed"; tail "$LOGS/build.log"; }
python3 scripts/bench_common.py --arch tiny --out "$TINY" >> "$LOGS/build.log" 2>&1

if [ "$PHASE" = 1 ]; then
  lane 0 g0 python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-g0.json" --work /tmp/w0 \
      --scenarios a,c --deadline $DEADLINE &
  lane 1 g1 python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-g1.json" --work /tmp/w1 \
      --scenarios b,nan --deadline $DEADLINE &
elif [ "$PHASE" = 2 ]; then
  (lane 0 g0 python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-leak.json" --work /tmp/w0 \
      --scenarios leak --deadline $DEADLINE;
   lane 0 sweep15 python3 scripts/bench_recovery.py sweep --model "$MODEL" --out "$OUT/sweep-15.json" --work /tmp/w0 \
      --caps 15GiB --finals $FINALS --timeout_s 200) &
  (lane 1 sweep24 python3 scripts/bench_recovery.py sweep --model "$MODEL" --out "$OUT/sweep-24.json" --work /tmp/w1 \
      --caps 24GiB --finals $FINALS --timeout_s 300;
   lane 1 memory python3 scripts/bench_memory.py --model "$MODEL" --out "$OUT/memory.json" --steps 4 \
      --shapes 2x512,2x2048 --full_length) &
elif [ "$PHASE" = 3 ]; then
  (OOMGUARD_GPU_OUT=$OUT timeout 300 python3 -m pytest -m gpu tests/gpu/test_gpu_ddp.py -s -p no:cacheprovider \
      > "$LOGS/ddp.log" 2>&1; echo "rc=$?" >> "$LOGS/ddp.log";
   lane 0 sweep24 python3 scripts/bench_recovery.py sweep --model "$MODEL" --out "$OUT/sweep-24.json" --work /tmp/w0 \
      --caps 24GiB --finals $FINALS --timeout_s 330) &
  (lane 1 g1 python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-3a.json" --work /tmp/w1 \
      --scenarios a2 --deadline $DEADLINE;
   lane 1 g1b python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-3b.json" --work /tmp/w1 \
      --scenarios leak,c --ways oomguard --deadline $DEADLINE;
   lane 1 g1c python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-3c.json" --work /tmp/w1 \
      --scenarios a --ways plain_es --deadline $DEADLINE) &
elif [ "$PHASE" = 5 ]; then  # after the cache clearer fix: overhead and the oomguard way of a2 and c again
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lane 0 overhead python3 scripts/bench_overhead.py \
      --model8b "$MODEL" --tiny "$TINY" --out "$OUT/overhead.json" &
  lane 1 g1 python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-5.json" --work /tmp/w1 \
      --scenarios a2,c --ways oomguard --deadline $DEADLINE &
else
  lane 0 overhead python3 scripts/bench_overhead.py --model8b "$MODEL" --tiny "$TINY" --out "$OUT/overhead.json" &
  (lane 1 sweep15 python3 scripts/bench_recovery.py sweep --model "$MODEL" --out "$OUT/sweep-15.json" --work /tmp/w1 \
      --caps 15GiB --finals $FINALS --timeout_s 200;
   lane 1 g1c python3 scripts/bench_recovery.py run --model "$MODEL" --out "$OUT/run-4c.json" --work /tmp/w1 \
      --scenarios a --ways plain_es) &
fi
wait
tar czf "$OUT/logs.tgz" --exclude='*/out/*' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
    --exclude='*/data/*' --exclude='*/checkpoints/*' -C / tmp/w0 tmp/w1 2>/dev/null
for f in "$LOGS"/*.log; do echo "== $f"; grep -E "^bench:|passed|failed|rc=|Error" "$f" | tail -12; done
echo "elapsed $(( $(date +%s) - START )) s"
