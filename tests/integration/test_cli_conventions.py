"""CLI conventions: report to stdout and --json (validated), --version, -h/--help, pass-through of the
command's own options, plain enum values in policy errors, a standard policy JSON Schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import oomguard
from oomguard.policy import policy_json_schema, shipped_policy_paths
from oomguard.report.schema import REPORT_JSON_SCHEMA

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_child.py")
POLICY = HERE / "policies" / "fast.yaml"
ROOT = HERE.parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def og(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oomguard", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=ENV)


@pytest.fixture(scope="module")
def oom_run(tmp_path_factory) -> Path:
    rd = tmp_path_factory.mktemp("cli") / "run"
    r = og("run", "--policy", str(POLICY), "--run-dir", str(rd), "--quiet", "--", sys.executable, FAKE,
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--oom_over", "1024",
           "--max_steps", "6", "--fail_at", "3")
    assert r.returncode == 0, r.stderr
    assert "oomguard: run finished after 3 attempts, 2 recoveries" in r.stderr  # run's own summary: stderr
    return rd


def test_report_writes_the_summary_to_stdout(oom_run):
    r = og("report", str(oom_run))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("oomguard: run finished after 3 attempts, 2 recoveries") and r.stderr == ""
    assert "root cause: cuda_oom after step 2" in r.stdout and "at step None" not in r.stdout


def test_report_json_validates_and_says_what_happened(oom_run):
    r = og("report", str(oom_run), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, REPORT_JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert doc["schema"] == "oomguard.report/1" and doc["status"] == "succeeded" and doc["exit_code"] == 0
    assert [a["failure"]["kind"] if a["failure"] else None for a in doc["attempts"]] == ["cuda_oom", "cuda_oom", None]
    assert len(doc["recoveries"]) == 2 and doc["recoveries"][0]["cost"]["steps_redone"] == 0
    batch = next(k for k in doc["knobs"] if k["knob"] == "per_device_train_batch_size")
    assert (batch["requested"], batch["final"], batch["verification"]) == (8, 2, "verified")
    assert doc["effective_batch"]["kept"] is True and doc["requested_source"] == "observed"
    bad = {**doc, "attempts": [{**doc["attempts"][0], "n": "one"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, REPORT_JSON_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_report_json_schema_and_usage():
    r = og("report", "--json-schema")
    assert r.returncode == 0 and json.loads(r.stdout) == REPORT_JSON_SCHEMA
    assert og("report").returncode == 2


def test_version_and_help_options(tmp_path):
    r = og("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"oomguard {oomguard.__version__}"
    for flag in ("-h", "--help"):
        r = og("run", flag)
        assert r.returncode == 0, r.stderr
        assert "oomguard run [OPTIONS] -- COMMAND..." in r.stdout and "command not found" not in r.stderr
    assert og("-h").returncode == 0 and og("policy", "-h").returncode == 0


@pytest.mark.parametrize("tail", [["--", "python", "train.py", "--policy", "zzz", "-h"],
                                  ["python", "train.py", "--policy", "zzz", "--help"]])
def test_options_after_the_command_are_the_commands(tmp_path, tail):
    r = og("run", "--dry-run", "--policy", str(POLICY), "--run-dir", str(tmp_path / "run"), *tail)
    assert r.returncode == 0, r.stderr
    assert "command: python train.py --policy zzz " + tail[-1] in r.stdout


def _bad(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(shipped_policy_paths()["demo"].read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_policy_schema_is_standard_and_agrees_with_validate(tmp_path):
    r = og("policy", "schema")
    schema = json.loads(r.stdout)
    assert schema == policy_json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    text = json.dumps(schema)
    for key in ('"ge"', '"gt"', '"le"', '"lt"', '"discriminator"'):
        assert key not in text
    for path in shipped_policy_paths().values():
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    edits = [lambda d: d["limits"]["backoff"].update(initial_s=-7),
             lambda d: d["limits"].update(hang_timeout_s=0),
             lambda d: d["limits"].update(max_attempts=0),
             lambda d: d["ladders"]["cuda_oom"]["rungs"][0].update(op="bogus"),
             lambda d: d["limits"].update(nonsense=1)]
    for n, edit in enumerate(edits):
        bad = _bad(tmp_path, edit)
        assert list(validator.iter_errors(yaml.safe_load(bad.read_text()))), n
        assert og("policy", "validate", str(bad)).returncode == 2, n
    r = og("policy", "validate", str(_bad(tmp_path, edits[3])))
    assert "expected one of 'scale', 'set', 'step_down', 'halve_batch' or 'quantile_step'" in r.stderr
    assert "RungOp" not in r.stderr
