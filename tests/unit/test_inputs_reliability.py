"""Inputs that used to be misread or crash a reader: sizes without a unit, duplicate fault keys,
secrets in argv, non-regular or non-UTF-8 policy files, wrong-typed journal lines and run.json."""

from __future__ import annotations

import json
import os

import pytest

from oomguard import protocol as p
from oomguard.errors import PolicyError, RunDirError, UsageError
from oomguard.policy import load_policy, load_policy_arg
from oomguard.supervisor.journal import RunLock, event_problem, load_record, record_problems
from oomguard.supervisor.spec import check_run_dir, resolve_policy


def test_a_size_without_a_unit_is_refused_where_a_unit_is_required():
    with pytest.raises(ValueError, match="has no unit.*24GiB"):
        p.parse_size("24", require_unit=True)
    assert p.parse_size("24GiB", require_unit=True) == 24 * 2**30


def test_duplicate_fault_arguments_are_refused():
    with pytest.raises(ValueError, match="duplicate fault argument 'step'"):
        p.parse_inject("cuda_oom@step=3,step=4")
    assert p.parse_inject("cuda_oom@step=3;cuda_oom@step=4") == [p.Fault("cuda_oom", 3), p.Fault("cuda_oom", 4)]


@pytest.mark.parametrize("argv,expected", [
    (["--hub_token", "abc"], ["--hub_token", "***"]),
    (["--hub-token=abc"], ["--hub-token=***"]),
    (["--api_key", "k", "--lr", "1"], ["--api_key", "***", "--lr", "1"]),
    (["HF_TOKEN=hf_x", "python"], ["HF_TOKEN=***", "python"]),
    (["--db_password", "pw", "--client_secret=s"], ["--db_password", "***", "--client_secret=***"]),
    (["--use_auth_token", "--output_dir", "out"], ["--use_auth_token", "--output_dir", "out"]),  # a bare switch
    (["--tokenizer_name", "gpt2", "--max_tokens", "9"], ["--tokenizer_name", "gpt2", "--max_tokens", "9"]),
])
def test_redact_argv(argv, expected):
    assert p.redact_argv(argv) == expected


def test_redact_scrubs_secret_values_out_of_any_text():
    argv = ["python", "t.py", "--hub_token", "hf_verysecret"]
    obj = {"command": argv, "detail": "401 for token hf_verysecret", "n": 3}
    out = p.redact(obj, p.secret_values(argv))
    assert out == {"command": ["python", "t.py", "--hub_token", "***"], "detail": "401 for token ***", "n": 3}
    assert argv[-1] == "hf_verysecret", "the argv itself is untouched"


def test_policy_file_that_is_not_utf8_is_a_policy_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(PolicyError, match=r"not UTF-8 text \(byte 0xe9 at offset 9\); save the file as UTF-8"):
        load_policy(f)


def test_non_regular_policy_files_are_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(PolicyError, match="is a FIFO, not a regular file"):
        load_policy(tmp_path / "fifo.yaml")  # would block forever if it opened the FIFO
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy_arg("/dev/zero")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)


def test_an_empty_policy_argument_is_refused():
    with pytest.raises(UsageError, match="--policy is empty"):
        resolve_policy("", None)
    with pytest.raises(PolicyError, match="empty policy name"):
        load_policy_arg("  ")


@pytest.mark.parametrize("line,problem", [
    ({"time": "yesterday", "event": "step", "step": 1}, "time 'yesterday' is not a number"),
    ({"time": 1.0, "event": "step", "step": "x"}, "step 'x' is not an integer"),
    ({"time": 1.0, "event": "step", "step": True}, "step True is not an integer"),
    ({"time": 1.0, "event": 7}, "event 7 is not a name"),
    ({"time": 1.0, "event": "step", "step": 3}, None),
])
def test_event_problem(line, problem):
    assert (event_problem(line) or "").startswith(problem or "") and (event_problem(line) is None) == (problem is None)


def test_run_json_of_the_wrong_shape_is_a_run_dir_error(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="is a JSON list, expected an object"):
        load_record(tmp_path)
    (tmp_path / "run.json").write_bytes(b"\xff\xfe")
    with pytest.raises(RunDirError, match="run.json is unreadable"):
        load_record(tmp_path)


def test_record_problems_name_the_field():
    d = {"status": "running", "command": "python t.py", "attempts": [
        {"n": 1, "started": "now", "decision": {"action": "retry", "rung": {"ladder": "meteor", "index": 0}}}]}
    found = {where: (what, fatal) for where, what, fatal in record_problems(d)}
    assert found["command"] == ("'python t.py' is not a list of arguments", True)
    assert found["attempts[0].started"][1] is True
    assert found["attempts[0].decision.rung.ladder"][0].startswith("unknown ladder 'meteor'")
    assert found["attempts[0].decision.rung.ladder"][1] is False  # a report can still be made


def test_run_dir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a regular file, not a directory"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(RunDirError, match="cannot be created: .*file is a regular file"):
        check_run_dir(tmp_path / "file" / "run")
    (tmp_path / "rd" / "run.json").mkdir(parents=True)
    with pytest.raises(RunDirError, match="run.json is a directory, not a regular file"):
        check_run_dir(tmp_path / "rd")
    check_run_dir(tmp_path / "new" / "run")  # a dir still to be created under a writable one is fine


def test_lock_names_its_holder_and_refuses_a_live_one_named_in_run_json(tmp_path):
    with RunLock(tmp_path):
        pid, started = (tmp_path / ".lock").read_text().split()
        assert int(pid) == os.getpid() and float(started) > 0
        assert oct((tmp_path / ".lock").stat().st_mode & 0o777) == oct(0o600)
    parent = os.getppid()  # alive (pytest's parent), and not this process
    import psutil
    (tmp_path / "run.json").write_text(json.dumps(
        {"status": "running", "supervisor": {"pid": parent, "started": psutil.Process(parent).create_time()}}))
    with pytest.raises(RunDirError, match=f"in use by supervisor pid {parent} \\(alive"):
        with RunLock(tmp_path):
            pass
    (tmp_path / "run.json").write_text(json.dumps(  # the same pid, another start time: a reused pid
        {"status": "running", "supervisor": {"pid": parent, "started": 1.0}}))
    with RunLock(tmp_path):
        pass
