"""Issue 17: a launcher (``accelerate launch``) runs warm, and its single-process worker forks from it
(``spare/fork_worker.py``) and starts exactly as the cold worker the launcher would have started.

Cold vs warm as in ``test_spare.py``: the same probe (``_spare_probe.py``, with torch imported) run as
``accelerate launch --num_processes 1 … PROBE OUT BEHAVIOUR``; what the worker saw of its start, how
it and the launcher ended, the launcher's stderr, and the ``worker_start`` event.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import psutil
import pytest
from test_spare import PROBE, _run, _same

from oomguard.protocol import read_jsonl

ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")


def _argv(tmp: Path, probe: Path, out: str, behaviour: str) -> list[str]:
    return [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", str(probe), str(tmp / out), behaviour]


def _worker_starts(run_dir: Path) -> list[dict]:
    events = run_dir / "events.jsonl"
    return [e for e in read_jsonl(events) if e["event"] == "worker_start"] if events.exists() else []


@pytest.mark.parametrize("behaviour,code", [("3", 1), ("exc", 1), ("0", 0), ("term", 1)])
def test_a_launchers_worker_forks_warm_and_starts_as_the_cold_one(tmp_path, behaviour, code):
    probe = tmp_path / "torch_probe.py"
    probe.write_text("import torch  # noqa: F401\n" + PROBE.read_text())
    for side in ("c", "w"):
        (tmp_path / side).mkdir()
    cold, cold_seen, cold_err, _ = _run(tmp_path, _argv(tmp_path / "c", probe, "seen.json", behaviour), warm=False)
    warm, warm_seen, warm_err, started = _run(tmp_path, _argv(tmp_path / "w", probe, "seen.json", behaviour),
                                              warm=True)
    assert started["start"] == "warm" and "launcher" in started["reason"], started
    assert "torch" in started["preloaded"], started
    forks = _worker_starts(tmp_path / "warm")
    assert [f["start"] for f in forks] == ["fork"], forks
    assert (cold.exit_code, cold.signal) == (warm.exit_code, warm.signal) == (code, None), (cold_err, warm_err)
    for seen in (cold_seen, warm_seen):
        seen["argv"][1] = "OUT"
        seen["orig_argv"][2] = "OUT"
        seen["env"].pop("PYTHONPATH", None)  # the same; only the run dir inside differs
    _same(cold_seen, warm_seen, tmp_path)
    assert warm_seen["name"] == "__main__" and warm_seen["orig_argv"][0] == sys.executable
    assert warm_seen["env"]["ACCELERATE_MIXED_PRECISION"] == "no" and warm_seen["threads"] == cold_seen["threads"]
    norm = lambda err, side: err.replace(str(tmp_path / side), "T")  # noqa: E731
    assert norm(cold_err, "c") == norm(warm_err, "w")
    assert warm_seen["launcher_ran"] is cold_seen["launcher_ran"] is False
    assert not _spares_alive(tmp_path)
    if behaviour == "term":
        assert "died with <Signals.SIGTERM: 15>" in warm_err or "-15" in warm_err, warm_err[-2000:]


def test_a_worker_started_another_way_is_not_forked(tmp_path):
    """A changed import-time variable between the launcher and its worker: the launcher's own Popen."""
    probe = tmp_path / "torch_probe.py"
    probe.write_text("import torch  # noqa: F401\n" + PROBE.read_text())
    (tmp_path / "w").mkdir()
    argv = _argv(tmp_path / "w", probe, "seen.json", "0")
    argv[2:2] = ["--gpu_ids", "0"]  # accelerate sets CUDA_VISIBLE_DEVICES for the worker
    warm, seen, err, started = _run(tmp_path, argv, warm=True)
    assert started["start"] == "warm", started
    forks = _worker_starts(tmp_path / "warm")
    assert warm.exit_code == 0, err
    if seen["env"].get("CUDA_VISIBLE_DEVICES") == "0":  # accelerate <= 1.15 sets it for --gpu_ids even on CPU
        assert [f["start"] for f in forks] == ["exec"] and "CUDA_VISIBLE_DEVICES" in forks[0]["reason"], forks
        assert not _spares_alive(tmp_path), "the unused pre-forked worker outlived its launcher"
    else:  # >= 1.16 sets no variable for a CPU-only torch: nothing read at import changed, so it forks
        assert "CUDA_VISIBLE_DEVICES" not in seen["env"] and [f["start"] for f in forks] == ["fork"], forks


def _spares_alive(tmp: Path) -> list[str]:
    """Live processes started as this test's spares (the pre-forked worker keeps the spare's command line)."""
    alive = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "oomguard.spare" in cmdline and str(tmp) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            alive.append(f"{proc.pid}: {cmdline}")
    return alive


def test_torchrun_starts_cold_and_says_why(tmp_path):
    (tmp_path / "w").mkdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(PROBE),
            str(tmp_path / "w" / "seen.json"), "0"]
    outcome, seen, err, started = _run(tmp_path, argv, warm=True)
    assert started["start"] == "cold" and "agent" in started["reason"], started
    assert outcome.exit_code == 0, err
