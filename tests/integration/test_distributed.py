"""Several processes as one child: ``oomguard run -- torchrun --nproc_per_node 2 …`` on CPU (gloo).

The child is a plain ``transformers.Trainer`` script (``_wrap_trainer_script.py``), guarded by
the bootstrap in every rank. A fault on rank 1 only must stop both ranks, resume both with the
new knobs and finish; the journal names rank 1 as the root cause. A hung rank must take the
whole tree down: torchrun starts each rank in a session of its own, out of reach of a kill
of torchrun's process group.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _env import user_env

from oomguard.protocol import read_jsonl
from oomguard.supervisor.tree import run_processes

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
SCRIPT = HERE / "_wrap_trainer_script.py"  # batch 4, accumulation 1, save every 2 steps
POLICY = HERE / "policies" / "wrap.yaml"  # cuda_oom: batch 4 -> 2, accumulation 1 -> 2


def oomguard_run(run_dir: Path, policy: Path, inject: str, *command: str) -> subprocess.CompletedProcess:
    env = user_env()
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir),
           "--inject", inject, "--", *command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)


def torchrun(out: Path, steps: int) -> list[str]:
    # a free port per test: two test files may run torchrun at once on the CI machine
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
            str(SCRIPT), str(out), str(steps)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def of(events: list[dict], name: str, attempt: int | None = None) -> list[dict]:
    return [e for e in events if e["event"] == name and (attempt is None or e.get("attempt") == attempt)]


def explain(proc: subprocess.CompletedProcess, run_dir: Path) -> str:
    logs = "".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("attempts/*/stderr.log")))
    return f"exit {proc.returncode}\n{proc.stderr[-3000:]}\n{logs}"


def test_oom_on_rank_1_stops_both_ranks_and_resumes_both_with_the_new_knobs(tmp_path):
    run_dir = tmp_path / "run"
    proc = oomguard_run(run_dir, POLICY, "cuda_oom@step=3,rank=1", *torchrun(tmp_path / "out", 6))
    assert proc.returncode == 0, explain(proc, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    events = list(read_jsonl(run_dir / "events.jsonl"))
    assert run["status"] == "succeeded" and run["world_size"] == 2
    first, second, *rest = run["attempts"]
    # seen once on a loaded 2-core box: rank 0 aborted in gloo's teardown ("terminate called without
    # an active exception") after the last step; the retry resumed at checkpoint-6 and finished
    assert all(a["failure"] is None for a in rest[1:]) and (
        not rest or (second["failure"]["kind"], second["failure"]["step"]) == ("crash", 6)), run["attempts"]
    # the root cause is rank 1's OOM, not rank 0's "connection closed by peer" that followed it
    assert (first["failure"]["kind"], first["failure"]["rank"], first["failure"]["step"]) == ("cuda_oom", 1, 2)
    ended = of(events, "attempt_ended", 1)[0]
    assert ended["root_cause"] == "rank 1: cuda_oom at step 2"
    assert [(r["rank"], r["symptom"]) for r in ended["ranks"]] == [(1, False), (0, True)]
    assert "root cause: rank 1: cuda_oom after step 2" in proc.stderr
    # both ranks stopped: each wrote its record; the launcher's whole tree is gone
    assert sorted(p.name for p in (run_dir / "attempts" / "001").glob("error*.json")) == [
        "error.json", "error.rank1.json"]
    assert run_processes(run_dir) == []
    # the global effective batch (batch x accumulation x 2 ranks) is journaled and kept
    # (attempt 1's is unknown to the supervisor until the child reports it: observed, then kept)
    assert [(e["world_size"], e["effective_batch"]) for e in of(events, "attempt_started")][:2] == [(2, None), (2, 8)]
    assert first["observed"]["effective_batch"] == 8 and run["requested"]["per_device_train_batch_size"] == 4
    assert (second["knobs"]["per_device_train_batch_size"], second["knobs"]["gradient_accumulation_steps"]) == (2, 2)
    assert (second["failure"] is None or rest) and second["resumed_from"].endswith("checkpoint-2")
    # every rank's own Trainer ran with the new knobs (one report per rank, attempt and stage)
    seen = {(e["attempt"], e["rank"]): e["knobs"] for e in of(events, "recipe_observed") if e["stage"] == "in_force"}
    assert {(1, 0), (1, 1), (2, 0), (2, 1)} <= set(seen)
    batch = ("per_device_train_batch_size", "gradient_accumulation_steps")
    for rank in (0, 1):
        assert tuple(seen[(1, rank)][k] for k in batch) == (4, 1)
        assert tuple(seen[(2, rank)][k] for k in batch) == (2, 2)
    checkpoint = Path(run["checkpoint_dir"]) / "checkpoint-6"
    args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 6
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    # per-rank files: heartbeats and the sample ledger
    assert {"heartbeat", "heartbeat.rank1"} <= {p.name for p in run_dir.iterdir()}
    assert {"rank0.jsonl", "rank1.jsonl"} <= {p.name for p in (run_dir / "ledger").iterdir()}
    # each rank's ledger holds the rows that rank trained: accelerate deals the sampler's batches to the
    # ranks in turn, so a step's rows on rank 0 and rank 1 are disjoint halves of its global batch, and
    # steps 1-6 trained the epoch order's first 48 rows once each (attempt 2 at batch 2 x 2 included)
    from oomguard.guard.resume.ledger import order_file, read_ledger, read_orders

    ledgers = [read_ledger(run_dir / "ledger" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [e.step for e in ledgers[0]] == [e.step for e in ledgers[1]] == list(range(1, 7))
    for a, b in zip(*ledgers):
        assert len(a.samples) == len(b.samples) == 4 and not set(a.samples) & set(b.samples), (a, b)
    order = read_orders(order_file(run_dir, 0))[0]
    assert sorted(i for rank in ledgers for e in rank for i in e.samples) == sorted(order[:48])


def test_a_hung_rank_takes_every_rank_down_with_it(tmp_path):
    """Rank 1 hangs in Python (ignores SIGTERM, as a rank stuck in a collective does); rank 0
    blocks in the next all-reduce. Both heartbeats stop; the supervisor must kill every rank,
    not only torchrun (whose ranks lead their own sessions), and leave no orphan behind."""
    data = yaml.safe_load(POLICY.read_text())
    data["limits"].update(hang_timeout_s=3, startup_timeout_s=120, max_attempts=1)  # torch imports take longer
    policy = tmp_path / "hang.yaml"
    policy.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    proc = oomguard_run(run_dir, policy, "hang@step=3,rank=1", *torchrun(tmp_path / "out", 6))
    leftovers = run_processes(run_dir)
    for p in leftovers:  # never leave them running, even when the test fails
        p.kill()
    assert leftovers == [], f"orphaned ranks after the hang kill: {[p.pid for p in leftovers]}"
    assert proc.returncode == 3, explain(proc, run_dir)  # max_attempts 1: gave up after the hang
    failure = json.loads((run_dir / "run.json").read_text())["attempts"][0]["failure"]
    assert failure["kind"] == "hang" and failure["step"] == 2
    assert "rank 0" in failure["detail"] and "rank 1" in failure["detail"]  # both heartbeats' ages
