"""A rank blocked in a collective after its peer failed is stopped promptly (issue 21): once one rank
of a real two-rank torchrun group (gloo) wrote its error record, the supervisor stops what is left of
the attempt ``limits.failed_rank_linger_s`` later, instead of waiting out the collective's timeout
(30 min here; NCCL's default is 10-30 min), and the record stays the root cause."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _env import user_env

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def test_ranks_stuck_after_a_recorded_failure_are_stopped_after_the_linger(tmp_path):
    policy = yaml.safe_load((HERE / "policies" / "fast.yaml").read_text())
    policy["limits"].update(failed_rank_linger_s=2, hang_timeout_s=300, max_attempts=1)
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    run_dir = tmp_path / "run"
    env = {**user_env(), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "oomguard", "run", "--policy", str(tmp_path / "policy.yaml"),
                           "--run-dir", str(run_dir), "--quiet", "--", sys.executable, "-m", "torch.distributed.run",
                           "--standalone", "--nproc-per-node", "2", str(HERE / "_stuck_peer_script.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    run = json.loads((run_dir / "run.json").read_text())
    first = run["attempts"][0]
    assert first["failure"]["kind"] == "cuda_oom" and first["failure"]["rank"] == 1, (first, proc.stderr[-3000:])
    assert "had not ended 2 s later" in first["failure"]["detail"], first["failure"]["detail"]
    assert "stopped what was left of it" in proc.stderr
    # the attempt ended within the linger + the 5 s SIGTERM grace of the record, not gloo's 30 min
    recorded = json.loads((run_dir / "attempts" / "001" / "error.rank1.json").read_text())["time"]
    assert 2 <= first["ended"] - recorded < 2 + 5 + 3, first["ended"] - recorded
    assert elapsed < 90, elapsed
