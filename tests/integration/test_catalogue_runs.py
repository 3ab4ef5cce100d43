"""One vocabulary, seen from a terminal: a real guarded training run (the built-in recipe on the embedded
tiny model, an injected CUDA OOM and NaN) and the fake child, both under `oomguard run` with
OOMGUARD_STRICT_EVENTS=1; every journal line checked against the catalogue; the report's "s to the
next step" checked against the step events; the console, captured through a pty, read as a person would.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from _env import user_env

from oomguard import protocol
from oomguard.protocol import CATALOGUE, Event, EventSource, check_event, read_jsonl
from oomguard.recipes import default
from oomguard.report.summary import summarize

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
FAKE = str(HERE / "fake_child.py")
MAX_STEPS = 8
INJECT = "cuda_oom@step=3;nan@step=6"
RECIPE = ["-m", "oomguard.recipes.sft", "--max_steps", str(MAX_STEPS), "--save_steps", "2", "--logging_steps", "1",
          "--max_seq_length", "128", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
          "--seed", "1"]


def strict_env(**extra: str) -> dict[str, str]:
    env = user_env()
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false", protocol.ENV_STRICT_EVENTS: "1", **extra}


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """``argv`` with stdout and stderr on one pseudo-terminal (as a person's terminal shows them)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    cache = base / "cache"
    default.ensure_default_model(cache)
    run_dir = base / "run"
    argv = [sys.executable, "-m", "oomguard", "run", "--policy", "demo", "--run-dir", str(run_dir),
            "--inject", INJECT, "--", sys.executable, *RECIPE, "--output_dir", str(run_dir / "checkpoints")]
    code, console = run_in_pty(argv, strict_env(**{default.ENV_CACHE: str(cache)}), timeout=300)
    assert code == 0, console[-6000:]
    return run_dir, console


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fake") / "run"
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(HERE / "policies" / "fast.yaml"),
           "--run-dir", str(run_dir), "--quiet", "--", sys.executable, FAKE, "--plan", "oom_record,nan",
           "--max_steps", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=strict_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return run_dir


def journal(run_dir: Path) -> list[dict]:
    return list(read_jsonl(run_dir / protocol.EVENTS_JSONL))


def problems(events: list[dict]) -> list[str]:
    return [f"line {n}: {p}" for n, e in enumerate(events, 1) for p in check_event(e)]


def child_names(events: list[dict]) -> set[str]:
    return {e["event"] for e in events if e.get("source") == EventSource.CHILD.value}


@pytest.mark.slow
def test_every_line_of_a_real_guarded_run_is_in_the_catalogue(real_run):
    run_dir, _ = real_run
    events = journal(run_dir)
    assert problems(events) == []
    run = json.loads((run_dir / protocol.RUN_JSON).read_text())
    assert len(run["attempts"]) == 3
    for a in run["attempts"]:  # every attempt reports its completed optimizer steps
        steps = [e["step"] for e in events if e["event"] == Event.STEP.value and e["attempt"] == a["n"]]
        assert steps and steps == sorted(set(steps)) and max(steps) == a["max_step"], (a["n"], steps)
    for needed in (Event.STEP, Event.TRAINER_LOG, Event.CHECKPOINT_SAVED, Event.ERROR_RECORDED, Event.DECISION):
        assert needed.value in {e["event"] for e in events}, needed


@pytest.mark.slow
def test_the_fake_child_speaks_the_real_guards_vocabulary(fake_run, real_run):
    fake = journal(fake_run)
    assert problems(fake) == []
    spoken = child_names(fake)
    assert spoken and all(CATALOGUE[Event(name)].source is EventSource.CHILD for name in spoken)
    # what a run with an OOM and a NaN makes the real guard say, the fake one says no differently
    assert spoken - child_names(journal(real_run[0])) == set()


@pytest.mark.slow
def test_time_to_the_next_step_is_measured_from_the_step_events(real_run):
    run_dir, _ = real_run
    run, events = json.loads((run_dir / protocol.RUN_JSON).read_text()), journal(run_dir)
    summary = summarize(run_dir)
    assert len(summary.recoveries) == 2
    for recovery, failed, nxt in zip(summary.recoveries, run["attempts"], run["attempts"][1:]):
        first_step = min(e["time"] for e in events if e["event"] == Event.STEP.value and e["attempt"] == nxt["n"])
        assert recovery.attempt == failed["n"]
        assert recovery.seconds_to_next_step == pytest.approx(first_step - failed["ended"], abs=1e-6)
    report = subprocess.run([sys.executable, "-m", "oomguard", "report", str(run_dir), "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=strict_env())
    costs = [r["cost"]["seconds_to_next_step"] for r in json.loads(report.stdout)["recoveries"]]
    assert costs == pytest.approx([r.seconds_to_next_step for r in summary.recoveries], abs=1e-6)


def _lines(console: str) -> list[str]:
    """What a terminal shows, line by line: within a line the text after the last carriage return."""
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in console.split("\n")]


@pytest.mark.slow
def test_the_console_shows_decisions_on_their_own_lines_and_no_full_traceback(real_run):
    run_dir, console = real_run
    for line in console.split("\n"):  # never glued after a child's progress bar
        if "[oomguard]" in line:
            assert line.lstrip("\r").startswith("[oomguard]"), repr(line)
    shown = _lines(console)
    run = json.loads((run_dir / protocol.RUN_JSON).read_text())
    for a in run["attempts"][:2]:  # each decision, as one line of its own
        assert f"[oomguard] {a['decision']['reason']}" in shown, a["decision"]["reason"]
    assert "Traceback (most recent call last)" not in console
    errors = [line for line in shown if line.startswith("[oomguard] child error: ")]
    assert len(errors) == 2 and "OutOfMemoryError" in errors[0] and "NonFiniteLoss" in errors[1]
    for n in ("001", "002"):
        log = Path("attempts") / n / "stderr.log"
        assert any(line.startswith("[oomguard]   full traceback (") and line.endswith(str(log)) for line in shown)
        assert "Traceback (most recent call last)" in (run_dir / log).read_text()  # the log keeps it whole
    assert len([line for line in shown if re.match(r'\s*File "', line)]) == 0  # frames only as "last frame"
    status = [line for line in shown if re.match(r"\[oomguard\] attempt \d+ · ", line)]
    # the status line is sampled on the supervisor's ticks: which step it first sees depends on speed
    assert any(re.search(rf"step \d+/{MAX_STEPS}", line) and "as requested" in line for line in status), status
    assert any(line.startswith("[oomguard] attempt 2 · after CUDA OOM: ") for line in status), status
