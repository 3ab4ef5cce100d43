"""Two "nodes" on one machine: two supervisors (`oomguard run --run-dir JOB`), each running its own
torchrun agent (`--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --max-restarts 0`), gloo, 4 ranks.

One job, shared by the tests below (CI time): attempt 1 gets an injected OOM on node 1's local rank 1
(global rank 3) → both nodes stop, the leader (node 0) decides from every node's records, both relaunch
with the same new knobs from the same checkpoint; during attempt 2 node 1's supervisor is SIGKILLed →
node 0 ends with ExitCode.NODE_LOST and a root cause naming node 1; both are started again → attempt 3
finishes. What trained is checked from the child's own files (trainer_state.json, training_args.bin,
the sample ledger), not from the journal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oomguard.errors import ExitCode
from oomguard.guard.resume.ledger import ledger_file, read_ledger
from oomguard.protocol import read_jsonl
from oomguard.supervisor.tree import run_processes

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
SCRIPT = HERE / "_node_trainer_script.py"  # batch 4, accumulation 1, save every 2 steps, 64 rows
POLICY = HERE / "policies" / "wrap.yaml"  # cuda_oom: batch 4 -> 2, accumulation 1 -> 2
STEPS = 8  # 16 rows a step over 4 ranks: two epochs of the 64 rows
NODE_TIMEOUT_S = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOMGUARD_", "SLURM_", "PET_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "NODE_STEP_S": "0.3"})
    return env


def _start(job: Path, out: Path, port: int, node: int, log: Path) -> subprocess.Popen:
    """Node ``node``'s supervisor. --local-addr makes the c10d rendezvous order the nodes (it sorts its
    participants by address): node 1 holds global ranks 2 and 3."""
    inject = ["--inject", "cuda_oom@step=3,rank=3"] if node == 1 else []
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(job),
           "--node-timeout", str(NODE_TIMEOUT_S), *inject, "--",
           str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
           "--max-restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "job", "--local-addr", f"127.0.0.{node + 1}", str(SCRIPT), str(out), str(STEPS)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == name]


def _wait_for_step(run_dir: Path, attempt: int, step: int, procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e.get("attempt") == attempt and e["step"] >= step for e in _events(run_dir, "step")):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a supervisor ended before step {step} of attempt {attempt}: "
                                 f"{[p.returncode for p in procs]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} of attempt {attempt} within {timeout_s} s")


def _finish(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The whole story, run once; what each phase left is kept for the tests."""
    base = tmp_path_factory.mktemp("nodes")
    job_dir, out, logs = base / "job", base / "out", base / "logs"
    logs.mkdir()
    port = _free_port()
    first = [_start(job_dir, out, port, k, logs / f"node{k}.first.log") for k in (0, 1)]
    try:
        _wait_for_step(job_dir / "node-1", 2, 4, first, 240)
        first[1].send_signal(signal.SIGKILL)  # node 1's supervisor dies mid-run (its child gets SIGTERM)
        codes = _finish(first, 120)
        after_kill = {k: json.loads((job_dir / f"node-{k}" / "run.json").read_text()) for k in (0, 1)}
        leftover = run_processes(job_dir / "node-0")
        again = [_start(job_dir, out, port, k, logs / f"node{k}.again.log") for k in (0, 1)]
        final_codes = _finish(again, 240)
    finally:
        for p in (*first, *locals().get("again", ())):
            if p.poll() is None:
                p.kill()
        for k in (0, 1):
            for proc in run_processes(job_dir / f"node-{k}"):
                proc.kill()
    logs_text = "".join(f"--- {p.name}\n{p.read_text()[-4000:]}\n" for p in sorted(logs.iterdir()))
    return {"job": job_dir, "out": out, "codes": codes, "after_kill": after_kill, "leftover": leftover,
            "final_codes": final_codes, "logs": logs_text,
            "run": {k: json.loads((job_dir / f"node-{k}" / "run.json").read_text()) for k in (0, 1)}}


def test_oom_on_node_1_stops_both_nodes_and_both_resume_with_the_leaders_knobs(job):
    assert job["final_codes"] == [0, 0], job["logs"]
    runs = job["run"]
    for k in (0, 1):
        first = runs[k]["attempts"][0]
        # the root cause is rank 3's OOM on node 1, on both nodes' records (node 0's ranks only saw a peer go)
        assert (first["failure"]["kind"], first["failure"]["rank"], first["failure"]["step"]) == ("cuda_oom", 3, 2)
        assert first["decision"]["action"] == "retry"
    ended = [e for e in _events(job["job"] / "node-0", "attempt_ended") if e["attempt"] == 1][0]
    assert ended["root_cause"] == "rank 3: cuda_oom at step 2"
    assert ended["ranks"][0]["rank"] == 3 and {r["rank"] for r in ended["ranks"]} >= {0, 3}
    # the leader's decision, taken by both: the same knobs, the same checkpoint, for attempts 2 and 3
    batch = ("per_device_train_batch_size", "gradient_accumulation_steps")
    for n in (1, 2):
        a0, a1 = runs[0]["attempts"][n], runs[1]["attempts"][n]
        assert a0["knobs"] == a1["knobs"] and tuple(a0["knobs"][k] for k in batch) == (2, 2)
        assert a0["resumed_from"] == a1["resumed_from"]
    assert runs[0]["attempts"][1]["resumed_from"].endswith("checkpoint-2")
    # each rank's own Trainer ran with them (the child's report per rank), and the final checkpoint says so
    seen = {(e["attempt"], e["rank"]): e["knobs"] for k in (0, 1)
            for e in _events(job["job"] / f"node-{k}", "recipe_observed") if e["stage"] == "in_force"}
    for rank in range(4):
        assert tuple(seen[(1, rank)][k] for k in batch) == (4, 1)
        assert tuple(seen[(3, rank)][k] for k in batch) == (2, 2)
    final = job["out"] / f"checkpoint-{STEPS}"
    args = torch.load(final / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size) == (2, 2, 4)


def test_every_step_trained_exactly_once_over_the_three_attempts(job):
    assert job["final_codes"] == [0, 0], job["logs"]
    state = json.loads((job["out"] / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged == list(range(1, STEPS + 1)) and state["global_step"] == STEPS
    for rank in range(4):  # oomguard's ledger: each step once per rank, none lost, none twice
        entries = read_ledger(ledger_file(job["job"] / f"node-{rank // 2}", rank))
        assert [e.step for e in entries] == list(range(1, STEPS + 1)), rank
        assert [e.attempt for e in entries][:2] == [1, 1] and entries[-1].attempt == 3
    # The script's own record of the rows each rank trained: a step re-trained by a later attempt counts
    # as that attempt's (its weights are the ones kept). Every step: 16 rows, 4 per rank, no row twice;
    # each epoch (4 steps of 16 rows) sees every one of the 64 rows exactly once.
    trained: dict[tuple[int, int], list[int]] = {}
    for rank in range(4):
        for line in read_jsonl(job["out"] / f"rows.rank{rank}.jsonl"):
            trained[(rank, line["step"])] = line["rows"]  # later lines (attempts) win
    assert sorted({step for _, step in trained}) == list(range(1, STEPS + 1))
    for epoch in (0, 1):
        steps = range(1 + 4 * epoch, 5 + 4 * epoch)
        rows = [r for (rank, step), got in trained.items() if step in steps for r in got]
        assert all(len(trained[(rank, s)]) == 4 for rank in range(4) for s in steps)
        assert sorted(rows) == list(range(64)), (epoch, sorted(rows))


def test_a_lost_node_ends_the_leader_with_its_exit_code_and_a_root_cause(job):
    assert job["codes"][0] == ExitCode.NODE_LOST, job["logs"]
    assert job["codes"][1] == -signal.SIGKILL
    lead = job["after_kill"][0]
    assert (lead["status"], lead["exit_code"]) == ("failed", 7)
    assert "node 1's supervisor" in lead["root_cause"] and f"--run-dir {job['job']}" in lead["root_cause"]
    [lost] = [e for e in _events(job["job"] / "node-0", "node_lost")]
    assert lost["lost"] == 1 and lost["job_attempt"] == 2
    assert job["leftover"] == []  # node 0's ranks were stopped with its attempt
    # the restart of both continued the run: attempt 3 on both nodes, from the same checkpoint, and finished
    runs = job["run"]
    assert [len(runs[k]["attempts"]) for k in (0, 1)] == [3, 3]
    assert runs[0]["status"] == runs[1]["status"] == "succeeded"
    assert int(Path(runs[0]["attempts"][2]["resumed_from"]).name.split("-")[1]) >= 2
