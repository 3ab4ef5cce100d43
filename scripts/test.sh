#!/usr/bin/env bash
# Set up (first time) and run the test suite: unit + integration on CPU; GPU tests are
# deselected (run them with scripts/gpu_check.sh on a GPU machine). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# one BLAS/OpenMP thread per training process: the tests run two workers (and multi-rank children) on
# two cores, and oversubscribed torch threads made the CPU trainings about 2x slower (measured)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
# the warm spare (on by default) is off for the suite unless asked: on two cores each supervised run's
# spare imports torch beside the run's own training (a clean-clone .ci/run took 18.5 min with it on,
# 17.5 min off, same box and day); the spare's own tests pass --warm-spare (tests/integration/_env.py
# keeps this variable for the runs the tests start)
export OOMGUARD_WARM_SPARE="${OOMGUARD_WARM_SPARE:-0}"
set +e
# two workers (CI has 2 cores); a file's tests stay on one worker; the 30 slowest are listed (for LONGEST_FIRST).
# --no-loadscope-reorder: the files are handed out in the order tests/integration/conftest.py sorts them (the
# longest first); by default xdist reorders them by their number of tests, which put a long file of few tests last
.venv/bin/python -m pytest -q -n "${OOMGUARD_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=30 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
