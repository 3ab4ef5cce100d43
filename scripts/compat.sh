#!/usr/bin/env bash
# The compatibility matrix's older stack (issue 16 item 3): tests/compat/ again, in a venv of the pinned
# old HF stack (tests/compat/requirements-old.txt). In .venv (the current stack) the main suite runs the
# install test, and its two trainings only with OOMGUARD_COMPAT_CURRENT=1 (tests/compat/conftest.py).
#
#   bash scripts/compat.sh setup   # create/reuse the old venv, then `pip install <project>` into it as a
#                                  # user would, recording pip freeze before/after and pip check
#   bash scripts/compat.sh test    # tests/compat/ in it (OOMGUARD_COMPAT_STACK=old); extra args -> pytest
#   bash scripts/compat.sh         # both
#
# The venv is cached under the checkout (.venv-old, gitignored; OOMGUARD_COMPAT_VENV moves it) and reused
# while the pins and this script are unchanged. .ci/run runs `setup` in the background while the main
# suite runs (pip is mostly I/O), then `test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${OOMGUARD_COMPAT_VENV:-.venv-old}
PINS=tests/compat/requirements-old.txt
REC="$VENV/compat"   # the install record the tests read: freeze-before/after.txt, pip-check.txt, pip-check.rc
what=${1:-all}
[ $# -gt 0 ] && shift

quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

setup() {
    local t0=$SECONDS want
    want="$(cat "$PINS" "$0" | sha256sum | cut -d' ' -f1) torch==${OOMGUARD_TORCH:-2.13.0}"
    if [ "$(cat "$VENV/.compat-stack" 2>/dev/null)" != "$want" ]; then
        rm -rf "$VENV"
        echo "[compat] creating $VENV with $($PY --version) and the pinned old stack ($PINS)"
        "$PY" -m venv "$VENV"
        quiet "$VENV/bin/pip" install -q --upgrade pip
        # torch first, pinned (the local CPU build, not a multi-GB CUDA one), then the pins. Byte-compiled
        # at install (pip's default): with PYTHONDONTWRITEBYTECODE set, as on the dev machines, a venv
        # installed with --no-compile recompiles torch/transformers in every child (measured: the old-stack
        # tests took twice the CPU time)
        quiet "$VENV/bin/pip" install -q "torch==${OOMGUARD_TORCH:-2.13.0}"
        # the pins with uv where it can be had (several times faster; the same pinned versions), else pip
        if ! { quiet "$VENV/bin/pip" install -q uv && "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" \
                --compile-bytecode -r "$PINS"; }; then
            echo "[compat] uv unavailable or failed: installing the pins with pip" >&2
            quiet "$VENV/bin/pip" install -q -r "$PINS"
        fi
        echo "$want" > "$VENV/.compat-stack"
        echo "[compat] old stack installed in $((SECONDS - t0)) s"
    fi
    # `pip install <project>` into the venv that already holds the old stack, as a user would: a
    # non-editable install of a copy of the source (with its dependencies, from the index)
    rm -rf "$REC"
    mkdir -p "$REC/src"
    "$VENV/bin/pip" uninstall -q -y oomguard >/dev/null 2>&1 || true
    cp -r oomguard pyproject.toml README.md "$REC/src/"
    find "$REC/src" -name __pycache__ -prune -exec rm -rf {} +
    "$VENV/bin/pip" freeze --all > "$REC/freeze-before.txt"
    quiet "$VENV/bin/pip" install -q "$REC/src" > "$REC/install.log"
    "$VENV/bin/pip" freeze --all > "$REC/freeze-after.txt"
    set +e
    "$VENV/bin/pip" check > "$REC/pip-check.txt" 2>&1
    echo $? > "$REC/pip-check.rc"
    set -e
    echo "[compat] setup done in $((SECONDS - t0)) s (pip check rc $(cat "$REC/pip-check.rc"))"
}

run_tests() {
    if [ ! -s "$REC/freeze-after.txt" ]; then
        echo "[compat] $VENV is not set up (run: bash scripts/compat.sh setup)" >&2
        return 1
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
    export OOMGUARD_COMPAT_STACK=old OOMGUARD_COMPAT_RECORD="$PWD/$REC"
    local t0=$SECONDS rc
    set +e
    "$VENV/bin/python" -m pytest -q -n "${OOMGUARD_TEST_WORKERS:-2}" --dist loadfile -p no:cacheprovider \
        --junitxml "$REC/junit.xml" tests/compat "$@"
    rc=$?
    set -e
    echo "[compat] old-stack tests: rc $rc in $((SECONDS - t0)) s"
    if [ "$rc" -eq 5 ]; then
        echo "[compat] pytest collected no tests in the old stack: failing on purpose" >&2
        return 1
    fi
    if [ "$rc" -eq 0 ]; then
        # a green run must have run every compat test: none skipped, none deselected away
        "$VENV/bin/python" - "$REC/junit.xml" <<'PY' || return 1
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
if tests < 3 or skipped:
    sys.exit(f"[compat] the old-stack run ran {tests} tests with {skipped} skipped: expected every compat test")
PY
    fi
    return "$rc"
}

case "$what" in
    setup) setup ;;
    test) run_tests "$@" ;;
    all) setup && run_tests "$@" ;;
    *) echo "usage: bash scripts/compat.sh [setup|test|all] [pytest args]" >&2; exit 2 ;;
esac
