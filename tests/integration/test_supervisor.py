"""The real supervisor (`python -m oomguard run`) against real child processes.

The child here is the stdlib fake (tests/integration/fake_child.py): supervisor logic
only. The fault matrix (kills, signals, hangs, host OOM, full disk, corrupt checkpoints,
no progress, bad inputs, soak, torn journal) and real training under the supervisor are
in test_reliability.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oomguard.protocol import read_jsonl

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_child.py")
POLICY = HERE / "policies" / "fast.yaml"
ROOT = HERE.parents[1]


def oomguard(run_dir: Path, *child: str, policy: Path = POLICY, extra: tuple[str, ...] = (),
             timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir),
           "--quiet", *extra, "--", sys.executable, FAKE, *child]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    parsed = list(read_jsonl(run_dir / "events.jsonl"))
    assert len(parsed) == len(lines), "every journal line parses"
    return parsed


def policy_variant(tmp_path: Path, **limits) -> Path:
    data = yaml.safe_load(POLICY.read_text())
    data["limits"].update(limits)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_clean_exit_succeeds(tmp_path):
    r = oomguard(tmp_path / "run", "--max_steps", "4")
    assert r.returncode == 0, r.stderr
    run = run_json(tmp_path / "run")
    assert run["status"] == "succeeded" and len(run["attempts"]) == 1
    assert run["attempts"][0]["max_step"] == 4
    assert "run finished" in r.stderr
    names = [e["event"] for e in events(tmp_path / "run")]
    assert names[0] == "run_started" and names[-1] == "run_ended"


@pytest.mark.parametrize("style", ["stderr", "record", "bnb"])
def test_oom_carried_to_success_with_effective_batch_kept(tmp_path, style):
    # OOM while batch*seq > 1024: 8*512 and 4*512 fail, 2*512 fits.
    r = oomguard(tmp_path / "run", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
                 "--oom_over", "1024", "--oom_style", style, "--max_steps", "6", "--fail_at", "3")
    assert r.returncode == 0, r.stderr
    run = run_json(tmp_path / "run")
    assert run["status"] == "succeeded"
    assert [a["failure"]["kind"] if a["failure"] else None for a in run["attempts"]] == ["cuda_oom", "cuda_oom", None]
    final = run["config"]
    assert (final["per_device_train_batch_size"], final["gradient_accumulation_steps"]) == (2, 8)
    assert final["per_device_train_batch_size"] * final["gradient_accumulation_steps"] == 16
    # the knob reached the child through its own flag, and it resumed from checkpoint-2
    last = run["attempts"][-1]
    assert last["delivered"]["per_device_train_batch_size"] == "flag"
    assert "--per_device_train_batch_size" in last["command"]
    assert last["command"][last["command"].index("--per_device_train_batch_size") + 1] == "2"
    assert last["resumed_from"].endswith("checkpoint-2")
    log = (tmp_path / "run" / "attempts" / "003" / "stdout.log").read_text()
    assert "batch=2 accum=8" in log and "start=2" in log


def test_nan_record_rolls_back_and_applies_nan_ladder(tmp_path):
    r = oomguard(tmp_path / "run", "--mode", "nan", "--fail_at", "4", "--max_steps", "6")
    assert r.returncode == 0, r.stderr
    run = run_json(tmp_path / "run")
    first = run["attempts"][0]
    assert first["failure"]["kind"] == "nan_loss" and first["failure"]["step"] == 3
    assert run["attempts"][1]["resumed_from"].endswith("checkpoint-2")  # at or before the NaN
    # the ladder's precision -> fp16 rung needs CUDA: on this machine it is passed over, said why,
    # and the child keeps the precision it ran (Trust rule 2)
    assert run["config"]["precision"] == "bf16"
    assert "fp16 mixed precision needs a CUDA GPU" in first["decision"]["reason"]


def test_sigkill_with_host_memory_low_is_crash(tmp_path):
    r = oomguard(tmp_path / "run", "--mode", "sigkill", "--fail_at", "3", "--max_steps", "5",
                 policy=policy_variant(tmp_path, host_oom_percent=100))
    assert r.returncode == 0, r.stderr
    failure = run_json(tmp_path / "run")["attempts"][0]["failure"]
    assert failure["kind"] == "crash" and "SIGKILL" in failure["detail"]


def test_same_crash_twice_gives_up_with_root_cause(tmp_path):
    r = oomguard(tmp_path / "run", "--mode", "crash", "--fail_at", "3")
    assert r.returncode == 5, r.stderr  # ExitCode.CHILD_FAILED
    run = run_json(tmp_path / "run")
    assert run["status"] == "failed" and run["give_up"] == "unrecoverable"
    assert "a bug in the script" in run["root_cause"]
    summary = r.stderr[r.stderr.index("oomguard: run"):]
    assert summary.splitlines()[1].startswith("root cause:") and "a bug in the script" in summary


def test_transient_crash_is_retried(tmp_path):
    r = oomguard(tmp_path / "run", "--mode", "crash_once", "--fail_at", "3", "--max_steps", "4")
    assert r.returncode == 0, r.stderr
    run = run_json(tmp_path / "run")
    assert [bool(a["failure"]) for a in run["attempts"]] == [True, False]
    assert run["config"] == run["requested"]


def test_ladder_exhausted_gives_up(tmp_path):
    # never fits: batch floor 1 and seq floor 128 -> 128 > 10
    r = oomguard(tmp_path / "run", "--oom_over", "10", "--fail_at", "1", "--max_steps", "3")
    assert r.returncode in (3, 4), r.stderr
    run = run_json(tmp_path / "run")
    assert run["status"] == "gave_up" and run["give_up"] in ("ladder_exhausted", "no_progress")
    assert run["config"]["per_device_train_batch_size"] == 1


def test_dry_run_prints_command_and_starts_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir",
                        str(tmp_path / "run"), "--dry-run", "--", sys.executable, FAKE,
                        "--per_device_train_batch_size", "3"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "policy: test-fast" in r.stdout and "--per_device_train_batch_size 3" in r.stdout
    assert not (tmp_path / "run").exists()


def test_start_from_policy_orders_the_policys_knobs_where_the_command_has_no_flag(tmp_path):
    """Opt-in only: attempt 1 gets the policy's knobs in-process except what the command states; the
    journal names them as the policy's (run_started.policy_orders), and requested is what the child ran."""
    data = yaml.safe_load(POLICY.read_text())
    data["knobs"].update(gradient_accumulation_steps=4, max_seq_length=256)  # the fake child's: 1 and 512
    pol = tmp_path / "start.yaml"
    pol.write_text(yaml.safe_dump(data))
    r = oomguard(tmp_path / "run", "--per_device_train_batch_size", "3", "--max_steps", "2", policy=pol,
                 extra=("--start-from-policy",))
    assert r.returncode == 0, r.stderr
    run = run_json(tmp_path / "run")
    first = run["attempts"][0]
    assert first["command"] == run["command"]  # no flag is appended or rewritten
    assert "per_device_train_batch_size" not in first["orders"] and first["orders"]["max_seq_length"] == 256
    assert (run["requested"]["per_device_train_batch_size"], run["requested"]["gradient_accumulation_steps"],
            run["requested"]["max_seq_length"]) == (3, 4, 256)
    started = next(e for e in events(tmp_path / "run") if e["event"] == "run_started")
    assert started["policy_orders"] == first["orders"]
    plain = oomguard(tmp_path / "plain", "--per_device_train_batch_size", "3", "--max_steps", "2", policy=pol)
    assert plain.returncode == 0 and run_json(tmp_path / "plain")["attempts"][0]["orders"] == {}
    assert run_json(tmp_path / "plain")["requested"]["gradient_accumulation_steps"] == 1  # the command's own
