"""The bootstrap's footprint: none outside oomguard; an existing ``sitecustomize`` still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _env import user_env

from oomguard.bootstrap import SITE_DIR
from oomguard.protocol import read_jsonl

HERE = Path(__file__).parent
ROOT = HERE.parents[1]

PROBE = """
import json, sys
import transformers.trainer as t
print(json.dumps({"oomguard": sorted(m for m in sys.modules if m.startswith("oomguard")),
                  "patched": bool(t.Trainer.__dict__.get("_oomguard_patched")),
                  "new_is_object": t.Trainer.__new__ is object.__new__}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = user_env()
    env.update(extra)
    return env


def _probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two imports of transformers.trainer (~5 s each on 2 cores)
def test_no_trace_outside_oomguard_even_with_the_site_dir_inherited(tmp_path):
    outside = _probe(_env(PYTHONPATH=str(SITE_DIR)))
    assert outside == {"oomguard": [], "patched": False, "new_is_object": True}
    assert list(tmp_path.iterdir()) == []
    inside = _probe(_env(PYTHONPATH=str(SITE_DIR), OOMGUARD_RUN_DIR=str(tmp_path)))  # the contrast
    assert inside["patched"] and not inside["new_is_object"] and "oomguard.bootstrap.trainer" in inside["oomguard"]


def _user_site(tmp_path: Path, body: str) -> Path:
    site = tmp_path / "user_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(body)
    return site


def test_existing_sitecustomize_runs_under_oomguard(tmp_path):
    site = _user_site(tmp_path, "import os\nos.environ['USER_SITE_RAN'] = '1'\n")
    child = ("import os, sys; print('user-site', os.environ.get('USER_SITE_RAN'), "
             "sys.modules['sitecustomize'].__file__, type(sys.meta_path[0]).__name__)")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(HERE / "policies" / "fast.yaml"),
           "--run-dir", str(run_dir), "--quiet", "--", sys.executable, "-c", child]
    proc = subprocess.run(cmd, env=_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(site)])), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = (run_dir / "attempts" / "001" / "stdout.log").read_text().split()
    assert line[:3] == ["user-site", "1", str(site / "sitecustomize.py")] and line[3] == "PostImportFinder"
    ended = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "attempt_ended"]
    assert ended[0]["bootstrap"] == "fallback"  # a Python child that never built a Trainer


def test_a_failing_sitecustomize_is_reported_and_the_child_still_runs(tmp_path):
    site = _user_site(tmp_path, "raise RuntimeError('broken user site')\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(SITE_DIR), str(site)]), OOMGUARD_RUN_DIR=str(tmp_path / "r"))
    out = subprocess.run([sys.executable, "-c", "print('alive')"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "alive"
    assert "Error in sitecustomize" in out.stderr and "broken user site" in out.stderr


# one child (one import of peft, ~6 s on 2 cores): first a checkpoint's config of rank 6 loaded (argv[2], written
# by the test: the first LoraConfig of the process is a loaded one), then a config it builds, saved and loaded back
LORA_PROBE = """
import json, sys
from peft import LoraConfig, PeftConfig
checkpoint = LoraConfig.from_pretrained(sys.argv[2]).r
built = LoraConfig(r=8, lora_alpha=16)
built.save_pretrained(sys.argv[1])
print(json.dumps({"built": [built.r, built.lora_alpha], "loaded": PeftConfig.from_pretrained(sys.argv[1]).r,
                  "checkpoint": checkpoint}))
"""


def test_lora_knobs_reach_built_configs_but_not_loaded_ones(tmp_path):
    saved, checkpoint = tmp_path / "adapter", tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 6, "lora_alpha": 12}))
    env = _env(PYTHONPATH=str(SITE_DIR), OOMGUARD_RUN_DIR=str(tmp_path), OOMGUARD_KNOBS='{"lora_r": 4, "lora_alpha": 8}')
    out = subprocess.run([sys.executable, "-c", LORA_PROBE, str(saved), str(checkpoint)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: result[k] for k in ("built", "loaded")} == {"built": [4, 8], "loaded": 4}
    assert result["checkpoint"] == 6  # a checkpoint's config describes its weights: kept
    event = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "bootstrap_lora"]
    assert [(e["r"], e["via"]) for e in event] == [({"old": 8, "new": 4}, "in_process")]
