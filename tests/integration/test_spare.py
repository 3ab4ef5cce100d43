"""Issue 17: a warm spare becomes the next attempt's child exactly as a fresh process would start.

Each case runs one command twice through ``process.run_child``: cold (a fresh process) and as
attempt 2 handed to a spare (``supervisor/spare.py``), and compares what the child saw of its own
start (``_spare_probe.py``: argv, env, cwd, ``__main__``, ``sys.path``, signals, stdio, session) and
how it ended (exit code / signal, stderr). Real processes; the probe preloads only numpy (cheap).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from oomguard.protocol import ENV_ATTEMPT, ENV_RUN_DIR, read_jsonl
from oomguard.supervisor.process import StopFlag, Watch, run_child
from oomguard.supervisor.spare import Spares

HERE = Path(__file__).parent
PROBE = HERE / "_spare_probe.py"


def _env(run_dir: Path, attempt: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
    root = str(HERE.parents[1])
    env.update({ENV_RUN_DIR: str(run_dir), ENV_ATTEMPT: str(attempt), "PYTHONUNBUFFERED": "1",
                "OOMGUARD_STRICT_EVENTS": "1", "PYTHONPATH": os.pathsep.join(
                    p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}, **extra)
    return env


def _run(tmp: Path, argv: list[str], warm: bool, env_change: dict | None = None):
    """(outcome, what the probe saw, its stderr.log, the child_start event or None)."""
    run_dir = tmp / ("warm" if warm else "cold")
    run_dir.mkdir(parents=True, exist_ok=True)
    keeper = Spares(run_dir, enabled=True) if warm else None
    if keeper is not None:
        keeper.prepare(argv, _env(run_dir, 1))  # during "attempt 1"
    env = _env(run_dir, 2, **(env_change or {}))
    watch = Watch(heartbeat_dir=run_dir, hang_timeout_s=None, echo=False, spares=keeper)
    try:
        outcome = run_child(argv, env, run_dir / "attempts" / "002", watch, StopFlag())
    finally:
        if keeper is not None:
            keeper.close()
    out = Path(argv[-2])
    seen = json.loads(out.read_text()) if out.exists() else None
    err = (run_dir / "attempts" / "002" / "stderr.log").read_text()
    events = [e for e in read_jsonl(run_dir / "events.jsonl")] if (run_dir / "events.jsonl").exists() else []
    started = [e for e in events if e["event"] == "child_start"]
    return outcome, seen, err, (started[0] if started else None)


def _same(cold: dict, warm: dict, tmp: Path) -> None:
    """Equal but for the run dir in the env, the object addresses in ``__spec__``'s repr and a pipe's number
    (accelerate >= 1.16 reads its worker's stderr through a pipe: a pipe either way, not the same one)."""
    for seen in (cold, warm):
        seen["env"] = {k: v for k, v in seen["env"].items() if k != ENV_RUN_DIR}
        seen["spec"] = re.sub(r" at 0x[0-9a-f]+", "", seen["spec"])
        for name in ("stdin_log", "stdout_log", "stderr_log"):
            if name in seen:
                seen[name] = re.sub(r"^pipe:\[\d+\]$", "pipe", seen[name])
    assert warm == cold


def _argv(tmp: Path, behaviour: str, name: str) -> list[str]:
    return [sys.executable, str(PROBE), str(tmp / f"{name}.json"), behaviour]


@pytest.mark.parametrize("behaviour,code,sig", [("0", 0, None), ("3", 3, None), ("msg", 1, None), ("exc", 1, None),
                                                ("term", None, signal.SIGTERM), ("handler", 7, None)])
def test_a_warm_child_starts_and_ends_as_a_fresh_one(tmp_path, behaviour, code, sig):
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "w").mkdir(exist_ok=True)
    cold, cold_seen, cold_err, _ = _run(tmp_path, _argv(tmp_path / "c", behaviour, "seen"), warm=False)
    warm, warm_seen, warm_err, started = _run(tmp_path, _argv(tmp_path / "w", behaviour, "seen"), warm=True)
    assert started is not None and started["start"] == "warm", started
    assert (cold.exit_code, cold.signal) == (warm.exit_code, warm.signal) == (code, sig)
    cold_seen["argv"][1] = warm_seen["argv"][1] = cold_seen["orig_argv"][2] = warm_seen["orig_argv"][2] = "OUT"
    _same(cold_seen, warm_seen, tmp_path)
    assert warm_seen["name"] == "__main__" and warm_seen["argv"][0] == str(PROBE) and warm_seen["file"] == str(PROBE)
    assert warm_seen["stdout_log"] == "stdout.log" and warm_seen["stderr_log"] == "stderr.log"
    assert cold_err.replace(str(tmp_path / "c"), "T") == warm_err.replace(str(tmp_path / "w"), "T")
    if behaviour == "exc":
        assert warm_err.startswith("Traceback (most recent call last):\n  File \"" + str(PROBE))
        assert "oomguard/spare" not in warm_err and warm_err.rstrip().endswith("ValueError: the probe fails")


def test_a_module_and_a_console_script_start_warm_as_fresh(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(PROBE.read_text())
    script = tmp_path / "probe-cli"
    script.write_text(f"#!{sys.executable}\n" + PROBE.read_text())
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    for name, argv in (("module", [sys.executable, "-m", "pkg.probe"]), ("entry", [str(script)])):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "w").mkdir(exist_ok=True)
        cold, cold_seen, _, _ = _run(tmp_path / name, [*argv, str(tmp_path / "c" / f"{name}.json"), "3"], warm=False)
        warm, warm_seen, _, started = _run(tmp_path / name, [*argv, str(tmp_path / "w" / f"{name}.json"), "3"],
                                           warm=True)
        assert started["start"] == "warm", started
        assert cold.exit_code == warm.exit_code == 3
        for seen in (cold_seen, warm_seen):
            seen["argv"][-2] = "OUT"
            seen["orig_argv"][-2] = "OUT"
        _same(cold_seen, warm_seen, tmp_path)
        assert warm_seen["name"] == "__main__"


def test_the_spare_imports_torch_without_initialising_cuda(tmp_path):
    probe = tmp_path / "torch_probe.py"
    probe.write_text("import torch\n" + PROBE.read_text())
    (tmp_path / "w").mkdir()
    warm, seen, err, started = _run(tmp_path, [sys.executable, str(probe), str(tmp_path / "w" / "t.json"), "0"],
                                    warm=True)
    assert started["start"] == "warm" and "torch" in started["preloaded"], started
    assert seen["cuda_initialized"] is False and warm.exit_code == 0, err
    assert started["spare_rss"] > 0


def test_a_changed_import_time_environment_is_a_cold_start(tmp_path):
    (tmp_path / "w").mkdir()
    outcome, seen, _, started = _run(tmp_path, _argv(tmp_path / "w", "0", "seen"), warm=True,
                                     env_change={"CUDA_VISIBLE_DEVICES": "1"})
    assert started["start"] == "cold" and "CUDA_VISIBLE_DEVICES" in started["reason"], started
    assert outcome.exit_code == 0 and seen["env"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_dead_spare_is_a_cold_start(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "w").mkdir()
    argv = _argv(tmp_path / "w", "0", "seen")
    keeper = Spares(run_dir, enabled=True)
    keeper.prepare(argv, _env(run_dir, 1))
    os.killpg(keeper.current.pid, signal.SIGKILL)
    keeper.current.popen.wait()
    watch = Watch(heartbeat_dir=run_dir, hang_timeout_s=None, echo=False, spares=keeper)
    outcome = run_child(argv, _env(run_dir, 2), run_dir / "attempts" / "002", watch, StopFlag())
    started = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "child_start"]
    assert outcome.exit_code == 0 and started[0]["start"] == "cold" and "spare ended" in started[0]["reason"]


def test_a_warm_attempt_that_fails_before_its_first_step_makes_the_rest_of_the_run_cold(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "w").mkdir()
    argv = _argv(tmp_path / "w", "exc", "seen")
    keeper = Spares(run_dir, enabled=True)
    keeper.prepare(argv, _env(run_dir, 1))
    watch = Watch(heartbeat_dir=run_dir, hang_timeout_s=None, echo=False, spares=keeper)
    first = run_child(argv, _env(run_dir, 2), run_dir / "attempts" / "002", watch, StopFlag())
    keeper.prepare(argv, _env(run_dir, 2))  # refused from now on
    second = run_child(argv, _env(run_dir, 3), run_dir / "attempts" / "003", watch, StopFlag())
    starts = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "child_start"]
    assert first.exit_code == second.exit_code == 1 and keeper.current is None
    assert [s["start"] for s in starts] == ["warm", "cold"]
    assert "started warm failed before its first step" in starts[1]["reason"]


def test_the_spare_is_killed_when_an_attempt_succeeds(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "w").mkdir()
    argv = _argv(tmp_path / "w", "0", "seen")
    keeper = Spares(run_dir, enabled=True)
    keeper.prepare(argv, _env(run_dir, 1))  # a spare for attempt 2 ...
    pid = keeper.current.pid
    watch = Watch(heartbeat_dir=run_dir, hang_timeout_s=None, echo=False, spares=keeper)
    outcome = run_child(argv, _env(run_dir, 1), run_dir / "attempts" / "001", watch, StopFlag())  # ... attempt 1 wins
    assert outcome.exit_code == 0 and keeper.current is None and not Path(f"/proc/{pid}").exists()
    assert not (run_dir / "events.jsonl").exists()  # attempt 1 journals no child_start: it is the command as written
