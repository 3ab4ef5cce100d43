"""The run dir and the inputs, against the real supervisor (`python -m oomguard run`) and the
stdlib fake child: a different command, a deleted lock, a deleted policy copy, an unwritable
run dir, damaged files, secrets in the command, bad options. Each refusal is exit 2, before
any child starts, with the path or value and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_child.py")
POLICY = HERE / "policies" / "fast.yaml"
ROOT = HERE.parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def oomguard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "oomguard", *args]


def run(*args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(oomguard_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=ENV, **kw)


def start(run_dir: Path, *child: str, policy: Path | str = POLICY, extra: tuple[str, ...] = ()):
    """`oomguard run` of the fake child (policy given unless ``policy`` is None)."""
    pol = ("--policy", str(policy)) if policy is not None else ()
    return run("run", *pol, "--run-dir", str(run_dir), "--quiet", *extra, "--", sys.executable, FAKE, *child)


def finished_run(tmp_path: Path) -> Path:
    rd = tmp_path / "run"
    r = start(rd, "--max_steps", "2", "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    return rd


def no_child_started(run_dir: Path) -> bool:
    return not (run_dir / "attempts").exists()


# --- 5: a new command for an existing run dir --------------------------------------------
def test_a_different_command_for_an_existing_run_dir_is_refused(tmp_path):
    rd = finished_run(tmp_path)
    before = (rd / "run.json").read_text()
    r = start(rd, "--max_steps", "3", "--output_dir", str(tmp_path / "other"))
    assert r.returncode == 2, r.stderr
    assert "holds a run of" in r.stderr and "--max_steps 2" in r.stderr
    assert f"oomguard run --run-dir {rd}" in r.stderr and "new --run-dir" in r.stderr
    assert (rd / "run.json").read_text() == before and not (tmp_path / "other").exists()
    again = start(rd, "--max_steps", "2", "--output_dir", str(tmp_path / "out"))  # the same command continues
    assert again.returncode == 0, again.stderr


# --- 6: a deleted .lock --------------------------------------------------------------------
def test_deleted_lock_does_not_let_a_second_supervisor_take_a_live_run(tmp_path):
    rd = tmp_path / "run"
    cmd = oomguard_cmd("run", "--policy", str(POLICY), "--run-dir", str(rd), "--quiet", "--", sys.executable,
                       FAKE, "--max_steps", "30", "--step_s", "0.05", "--output_dir", str(tmp_path / "out"))
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the first supervisor's child runs
            try:
                attempts = json.loads((rd / "run.json").read_text()).get("attempts", [])
                if attempts and attempts[0].get("pid"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        record = json.loads((rd / "run.json").read_text())
        assert record["supervisor"]["pid"] == first.pid and record["supervisor"]["started"]
        assert (rd / ".lock").read_text().split()[0] == str(first.pid)
        (rd / ".lock").unlink()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT, env=ENV)  # the same run
        assert second.returncode == 2, second.stderr
        assert f"supervisor pid {first.pid}" in second.stderr and "alive" in second.stderr
        assert first.poll() is None, "the first run is still going"
        _, err = first.communicate(timeout=20)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    record = json.loads((rd / "run.json").read_text())
    assert record["status"] == "succeeded" and len(record["attempts"]) == 1 and record["attempts"][0]["max_step"] == 30
    lines = [json.loads(x) for x in (rd / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines].count("attempt_started") == 1


# --- 7: a deleted policy.yaml ----------------------------------------------------------------
def test_continuing_with_a_deleted_policy_copy_is_refused(tmp_path):
    rd = finished_run(tmp_path)
    (rd / "policy.yaml").unlink()
    r = start(rd, "--max_steps", "2", "--output_dir", str(tmp_path / "out"), policy=None)
    assert r.returncode == 2, r.stderr
    assert "policy.yaml is missing" in r.stderr and "--policy" in r.stderr and "restore" in r.stderr
    assert len(json.loads((rd / "run.json").read_text())["attempts"]) == 1
    ok = start(rd, "--max_steps", "2", "--output_dir", str(tmp_path / "out"))  # with --policy it continues
    assert ok.returncode == 0, ok.stderr


# --- 12: a run dir the supervisor cannot write -----------------------------------------------
def _file_as_run_dir(tmp_path: Path) -> Path:
    (tmp_path / "f").write_text("x")
    return tmp_path / "f"


def _below_a_file(tmp_path: Path) -> Path:
    (tmp_path / "f").write_text("x")
    return tmp_path / "f" / "run"


def _events_is_a_dir(tmp_path: Path) -> Path:
    rd = tmp_path / "run"
    (rd / "events.jsonl").mkdir(parents=True)
    return rd


@pytest.mark.parametrize("make,expected", [
    (_file_as_run_dir, "is a regular file, not a directory"),
    (_below_a_file, "cannot be created"),
    (_events_is_a_dir, "events.jsonl is a directory, not a regular file"),
])
def test_unusable_run_dir_is_refused_before_start(tmp_path, make, expected):
    rd = make(tmp_path)
    r = start(rd)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and expected in r.stderr and "--run-dir" in r.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def mounted_tmpfs(mnt: Path, options: str, why_needed: str):
    """Mount a tmpfs with ``options`` at ``mnt`` for one test (CI runs as root); skip with the reason
    where mounting is not allowed."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here ({r.stderr.strip() or r.returncode}); {why_needed}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def readonly_dir(tmp_path):
    """A really read-only dir (root ignores chmod): a tmpfs mounted ``ro``."""
    yield from mounted_tmpfs(tmp_path / "ro", "ro,size=1m", "chmod alone does not stop root's writes")


def test_read_only_run_dir_is_refused_before_start(readonly_dir):
    r = start(readonly_dir / "run")
    assert r.returncode == 2, r.stderr
    assert "not writable" in r.stderr and "Traceback" not in r.stderr and "--run-dir" in r.stderr


# --- 14: damaged files -------------------------------------------------------------------------
def test_wrong_typed_journal_lines_are_skipped_and_named(tmp_path):
    rd = finished_run(tmp_path)
    with open(rd / "events.jsonl", "a") as f:
        f.write('{"time": "yesterday", "event": "step", "step": 1, "source": "child"}\n')
        f.write(f'{{"time": {time.time()}, "event": "step", "step": "x", "source": "child"}}\n')
    r = run("report", str(rd))
    assert r.returncode == 0, r.stderr
    assert "time 'yesterday' is not a number" in r.stdout and "step 'x' is not an integer" in r.stdout
    assert "events.jsonl" in r.stdout and "Traceback" not in r.stderr
    again = start(rd, "--max_steps", "2", "--output_dir", str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr


def test_run_json_that_is_a_list_is_reported_not_a_traceback(tmp_path):
    rd = finished_run(tmp_path)
    (rd / "run.json").write_text("[1, 2]\n")
    for r in (run("report", str(rd)), run("run", "--run-dir", str(rd))):
        assert r.returncode == 2, r.stderr
        assert "run.json" in r.stderr and "is a JSON list, expected an object" in r.stderr
        assert "Traceback" not in r.stderr


def test_unknown_ladder_in_a_saved_decision(tmp_path):
    rd = finished_run(tmp_path)
    record = json.loads((rd / "run.json").read_text())
    record["status"] = "running"
    record["attempts"][0].update(failure={"kind": "cuda_oom", "step": 1, "phase": "unknown", "detail": "x"},
                                 decision={"action": "retry", "knobs": {}, "rung": {"ladder": "meteor", "index": 0}})
    (rd / "run.json").write_text(json.dumps(record))
    r = run("run", "--run-dir", str(rd), "--quiet")
    assert r.returncode == 2, r.stderr
    assert "attempts[0].decision.rung.ladder: unknown ladder 'meteor'" in r.stderr and "Traceback" not in r.stderr
    rep = run("report", str(rd))
    assert rep.returncode == 0 and "unknown ladder 'meteor'" in rep.stdout, rep.stderr


# --- 19: secrets ---------------------------------------------------------------------------------
def test_secrets_are_redacted_in_the_run_dir_and_files_are_owner_only(tmp_path):
    rd, argv_out = tmp_path / "run", tmp_path / "argv.json"
    child = ["env", "HF_TOKEN=hf_envsecret123", sys.executable, FAKE, "--max_steps", "2",
             "--hub_token", "hf_flagsecret456", "--api_key=k_eqsecret789", "--argv_out", str(argv_out),
             "--output_dir", str(tmp_path / "out")]
    r = subprocess.run(oomguard_cmd("run", "--policy", str(POLICY), "--run-dir", str(rd), "--quiet", "--", *child),
                       capture_output=True, text=True, timeout=30, cwd=ROOT, env=ENV,
                       preexec_fn=lambda: os.umask(0))  # the widest umask: modes must not depend on it
    assert r.returncode == 0, r.stderr
    ran = json.loads(argv_out.read_text())
    assert "hf_flagsecret456" in ran and "--api_key=k_eqsecret789" in ran, "the child got the real values"
    for name in ("run.json", "events.jsonl"):
        text = (rd / name).read_text()
        for secret in ("hf_envsecret123", "hf_flagsecret456", "k_eqsecret789"):
            assert secret not in text, f"{secret} in {name}"
    record = json.loads((rd / "run.json").read_text())
    assert "HF_TOKEN=***" in record["command"] and "--api_key=***" in record["command"]
    assert record["command"][record["command"].index("--hub_token") + 1] == "***"
    assert "--hub_token" in record["attempts"][0]["command"] and "hf_flagsecret456" not in record["attempts"][0]["command"]
    modes = {p.relative_to(rd).as_posix(): oct(p.stat().st_mode & 0o777) for p in [rd, *rd.rglob("*")]}
    bad = {p: m for p, m in modes.items() if m != (oct(0o700) if (rd / p).is_dir() else oct(0o600))}
    assert bad == {}, bad
    # a continuation needs the command again: its secrets were never saved
    again = run("run", "--run-dir", str(rd), "--quiet")
    assert again.returncode == 2 and "secret values" in again.stderr, again.stderr
    cont = subprocess.run(oomguard_cmd("run", "--run-dir", str(rd), "--quiet", "--", *child), capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env=ENV)
    assert cont.returncode == 0, cont.stderr
    assert "hf_flagsecret456" in json.loads(argv_out.read_text()), "the continued child got the real value"
    assert "hf_flagsecret456" not in (rd / "run.json").read_text() + (rd / "events.jsonl").read_text()


# --- 20: bad inputs ---------------------------------------------------------------------------------
def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "p.yaml")
    return str(tmp_path / "p.yaml")


def _latin1(tmp_path: Path) -> str:
    (tmp_path / "p.yaml").write_bytes(POLICY.read_bytes() + b"# caf\xe9\n")
    return str(tmp_path / "p.yaml")


@pytest.mark.parametrize("make,expected", [
    (_latin1, "not UTF-8 text (byte 0xe9"),
    (lambda _t: "", "--policy is empty"),
    (lambda _t: "/dev/zero", "/dev/zero: (file): is a device or special file, not a regular file"),
    (_fifo, "is a FIFO, not a regular file"),
])
def test_bad_policy_inputs_exit_2(tmp_path, make, expected):
    r = start(tmp_path / "run", policy=make(tmp_path))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert no_child_started(tmp_path / "run")


def _ckpt_file(tmp_path: Path) -> tuple[str, ...]:
    (tmp_path / "ck").write_text("x")
    return ("--checkpoint-dir", str(tmp_path / "ck"))


@pytest.mark.parametrize("make,expected", [
    (lambda _t: ("--vram-limit", "24"), "--vram-limit: size '24' has no unit"),
    (lambda _t: ("--inject", "cuda_oom@step=3,step=4"), "--inject: duplicate fault argument 'step'"),
    (_ckpt_file, "is a regular file, not a directory"),
])
def test_bad_options_exit_2(tmp_path, make, expected):
    r = start(tmp_path / "run", extra=make(tmp_path))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert no_child_started(tmp_path / "run")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs: a run dir that fills up mid-run."""
    yield from mounted_tmpfs(tmp_path / "tiny", "size=4m", "the full-disk test needs one")


def test_a_run_dir_that_fills_mid_run_ends_failed_with_the_cause_not_a_traceback(tiny_disk):
    """The child's own output fills the run dir's disk: the supervisor's next journal write fails.
    It stops the child, records `failed` where it still can, and exits 6 with the fix."""
    run_dir = tiny_disk / "run"
    r = subprocess.run([sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir),
                        "--quiet", "--", sys.executable, FAKE, "--spew_bytes", str(8 * 2**20), "--max_steps", "3"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 6, r.stderr[-3000:]
    assert "stopped taking writes" in r.stderr and "--run-dir" in r.stderr
