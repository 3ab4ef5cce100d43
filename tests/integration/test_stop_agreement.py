"""Several ranks stop at one step end (issue 21): ``kill -TERM`` of rank 1 only, mid-run, in a real
two-rank torchrun group (gloo, a plain Trainer script under ``oomguard run``). Both ranks save the same
``checkpoint-N`` (each its own ``rng_state_<rank>.pth``, as a sharded save needs every rank at one
step) and end "requeue me" with that checkpoint complete for the next attempt. (Without the agreement
rank 1 saved alone and rank 0 died in its next all-reduce: one rank's shutdown_saved.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _env import user_env

from oomguard.protocol import read_jsonl

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "_wrap_trainer_script.py"  # batch 4, accumulation 1, save every 2 steps
POLICY = HERE / "policies" / "wrap.yaml"
STEPS = 200  # not reached: the stop comes a few steps in


def _env() -> dict[str, str]:
    env = user_env()
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1"})
    return env


def _command(run_dir: Path, out: Path) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), "--quiet",
            "--", str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
            str(SCRIPT), str(out), str(STEPS)]


def _rank_process(supervisor: psutil.Process, rank: int) -> psutil.Process | None:
    for p in supervisor.children(recursive=True):
        try:
            if p.environ().get("LOCAL_RANK") == str(rank) and str(SCRIPT) in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def _wait_for_steps(run_dir: Path, n: int, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "events.jsonl"
        if path.exists() and sum(1 for e in read_jsonl(path) if e.get("event") == "step") >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} step events in {timeout} s")


def test_sigterm_to_one_rank_stops_both_at_the_same_step_end_with_one_checkpoint(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    command = _command(run_dir, out)
    sup = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run_dir, 3)
        rank1 = _rank_process(psutil.Process(sup.pid), 1)
        assert rank1 is not None, "rank 1 not found"
        rank1.send_signal(signal.SIGTERM)  # as a user's kill, or a node's scheduler, would: one rank only
        _, err = sup.communicate(timeout=120)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 75, err[-3000:]
    events = list(read_jsonl(run_dir / "events.jsonl"))
    saved = {e["rank"]: e for e in events if e["event"] == "shutdown_saved"}
    assert sorted(saved) == [0, 1], [e for e in events if e["event"].startswith("shutdown")]
    stop = saved[1]["step"]
    assert saved[0]["step"] == stop and saved[1]["reason"] == "received SIGTERM"
    assert f"agreed to stop at step {stop}" in saved[0]["reason"]
    ckpt = out / f"checkpoint-{stop}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stop
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert 0 < stop < STEPS

    from oomguard.supervisor.checkpoints import scan_checkpoints

    newest = scan_checkpoints(out)[0]
    assert newest.step == stop and newest.complete, newest.problems  # what the next attempt resumes from
