"""Issue 18 item 6: the rungs that free memory without retraining differently, through a real wrapped run.

A plain Trainer script (tiny Llama, CPU) under ``oomguard run`` with two injected CUDA OOMs: the policy's first
cuda_oom rung turns gradient checkpointing on, the second moves the optimizer to bitsandbytes' 8-bit paged
AdamW. One run serves every assertion: the child's own files show each change, the journal says each was
verified in the child, and the resume across the optimizer change reset the foreign moments (else bitsandbytes
raises ``KeyError: 'state1'`` on the first step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _wrap_run import oomguard_run

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
POLICY = HERE / "policies" / "free_rungs.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    tmp = tmp_path_factory.mktemp("free")
    run_dir, out = tmp / "run", tmp / "out"
    oomguard_run(run_dir, POLICY, sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out), "6",
                 inject="cuda_oom@step=3;cuda_oom@step=5")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run_dir / "run.json").read_text()), events, out


def _args(checkpoint: Path):
    return torch.load(checkpoint / "training_args.bin", weights_only=False)


def test_attempt_one_runs_as_written_and_the_rungs_come_in_order(run):
    record, _, out = run
    assert record["status"] == "succeeded" and len(record["attempts"]) == 3
    first = _args(out / "checkpoint-2")  # written by attempt 1: the user's own recipe (transformers' default optim)
    assert first.gradient_checkpointing is False and str(first.optim.value).startswith("adamw_torch")
    assert record["requested"]["gradient_checkpointing"] is False
    assert record["requested"]["optim"] == str(first.optim.value)
    assert [a["rung"] and a["rung"]["index"] for a in record["attempts"]] == [None, 0, 1]


def test_the_child_files_show_each_change(run):
    _, _, out = run
    second, last = _args(out / "checkpoint-4"), _args(out / "checkpoint-6")
    assert second.gradient_checkpointing is True and str(second.optim.value).startswith("adamw_torch")
    assert last.gradient_checkpointing is True and str(last.optim.value) == "paged_adamw_8bit"
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    saved = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=False)
    assert "__bnb_optimizer_quant_state__" in next(iter(saved["state"].values()))  # bitsandbytes' own state


def test_the_journal_says_verified_in_the_child(run):
    record, events, _ = run
    assert record["attempts"][1]["verified"] == {"gradient_checkpointing": "verified"}
    assert record["attempts"][2]["verified"] == {"gradient_checkpointing": "verified", "optim": "verified"}
    seen = [e for e in events if e["event"] == "recipe_observed" and e["stage"] == "in_force"]
    by_attempt = {e["attempt"]: e for e in seen}
    assert by_attempt[2]["fields"]["gradient_checkpointing"] == "model:gradient_checkpointing"
    assert by_attempt[3]["fields"]["optim"] == "optimizer:class"


def test_the_foreign_optimizer_state_was_reset_and_said(run):
    _, events, _ = run
    [third] = [e for e in events if e["event"] == "recipe_observed" and e["stage"] == "in_force"
               and e["attempt"] == 3]
    assert "exp_avg" in third["optimizer_state_reset"] and "learning-rate schedule continues" in \
        third["optimizer_state_reset"]
