"""One wrapped run of the compatibility matrix and what it must leave behind on every stack.

The run: ``oomguard run --inject 'cuda_oom@step=3;nan@step=5' -- COMMAND`` (6 optimizer steps of 4 rows,
a checkpoint every 2) under ``tests/integration/policies/wrap_nan.yaml``:
attempt 1 dies of a (real, injected) CUDA OOM in step 3 -> attempt 2 halves the per-device batch and
doubles accumulation, resumes from checkpoint-2 -> a NaN loss in step 5 -> attempt 3 rolls back to
checkpoint-4 at half the learning rate and finishes.

Everything is read from the child's own files: checkpoint-N/trainer_state.json (steps, losses, the
learning rate in force), training_args.bin (the batch and accumulation in force), and the sample
ledger the guard writes from the child's sampler (which rows each optimizer step trained; the epoch's
sampler order as each attempt's sampler produced it). The journal is checked too, never alone.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
from functools import cached_property
from pathlib import Path

import pytest
from _wrap_run import oomguard_run

from oomguard.guard.resume.ledger import StepSamples, expand, ledger_file, order_file, read_ledger, samples_seen
from oomguard.protocol import read_jsonl

HERE = Path(__file__).resolve().parent
INTEGRATION = HERE.parent / "integration"
PINS_FILE = HERE / "requirements-old.txt"
STACK = os.environ.get("OOMGUARD_COMPAT_STACK", "current")  # "old": scripts/compat.sh's run in .venv-old
POLICY = INTEGRATION / "policies" / "wrap_nan.yaml"  # cuda_oom: batch /2, accumulation x2; nan: lr x0.5
STEPS, SAVE, BATCH, LR = 6, 2, 4, 1e-3  # every command: 6 steps of 4 rows, checkpoint every 2, lr 1e-3 linear
INJECT = "cuda_oom@step=3;nan@step=5"  # each fires once per run


def pins() -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of requirements-old.txt."""
    out = {}
    for line in PINS_FILE.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass
class Wrapped:
    """One ``oomguard run`` of a command: its run dir and the command's own output dir."""

    run_dir: Path
    out: Path

    @cached_property
    def run(self) -> dict:
        return json.loads((self.run_dir / "run.json").read_text())

    @cached_property
    def events(self) -> list[dict]:
        return list(read_jsonl(self.run_dir / "events.jsonl"))

    @cached_property
    def ledger(self) -> list[StepSamples]:
        return read_ledger(ledger_file(self.run_dir))

    @cached_property
    def orders(self) -> dict[int, tuple[int, ...]]:
        """attempt -> the epoch-0 order its sampler produced (the guard records it at train begin)."""
        return {int(r["attempt"]): tuple(expand(r["order"])) for r in read_jsonl(order_file(self.run_dir))
                if int(r["epoch"]) == 0}

    def state(self, step: int = STEPS) -> dict:
        return json.loads((self.out / f"checkpoint-{step}" / "trainer_state.json").read_text())

    def logged(self, key: str, step: int = STEPS) -> dict[int, float]:
        """``{step: value}`` of the training logs in checkpoint-N's trainer_state.json (each step once)."""
        rows = [h for h in self.state(step)["log_history"] if "loss" in h]
        assert len({h["step"] for h in rows}) == len(rows), f"a step logged twice: {rows}"
        return {h["step"]: h[key] for h in rows}


def torch_load(path: Path):
    import torch

    return torch.load(path, weights_only=False)


def wrapped(base: Path, command: list[str], out: Path) -> Wrapped:
    oomguard_run(base / "run", POLICY, *command, inject=INJECT)
    return Wrapped(base / "run", out)


def scheduled_lrs() -> dict[int, float]:
    """The learning rate each step of an uninterrupted run trains at: this stack's own linear schedule
    (no warmup; what HF logs at step s is the LR step s used)."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS)
    out = {}
    for s in range(1, STEPS + 1):
        out[s] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    return out


def check_recovered(child: Wrapped) -> None:
    """OOM -> batch rung applied in the child; NaN -> rollback at half the LR; every row trained once, in
    the uninterrupted order, and the effective batch kept."""
    run = child.run
    assert run["status"] == "succeeded", run["status"]
    attempts = run["attempts"]
    # a fault in step s: the last completed step is s - 1
    assert [(a["failure"] or {}).get("kind") for a in attempts] == ["cuda_oom", "nan_loss", None], \
        [a["failure"] for a in attempts]
    assert [a["failure"]["step"] for a in attempts[:2]] == [2, 4]
    assert [Path(a["resumed_from"]).name for a in attempts[1:]] == ["checkpoint-2", "checkpoint-4"]

    # the steps: each trained and logged once, to max_steps
    assert child.state()["global_step"] == STEPS
    assert sorted(child.logged("loss")) == list(range(1, STEPS + 1))

    # the rows: attempt 1 trained steps 1-2, attempt 2 steps 3-4, attempt 3 steps 5-6; 4 rows each
    # (2 x 2 after the batch rung; transformers < 5.2 without oomguard's fix trains the old per-device
    # batch 4 under the new accumulation 2: 8 rows a step); each row once, in the order the sampler gives
    # an uninterrupted run (attempt 1's, before any fault; the same again in every attempt)
    got = child.ledger
    assert [e.step for e in got] == list(range(1, STEPS + 1))
    assert [e.attempt for e in got] == [1, 1, 2, 2, 3, 3]
    assert [len(e.samples) for e in got] == [BATCH] * STEPS, "rows per optimizer step (effective batch)"
    order = child.orders[1]
    assert child.orders[2] == child.orders[3] == order, "the sampler's order differs between attempts"
    rows = [i for e in got for i in e.samples]
    assert rows == list(order[:STEPS * BATCH]), "not the uninterrupted run's rows, in its order"
    assert max(samples_seen(got).values()) == 1
    assert rows != sorted(rows)  # a shuffled order, so "the same order" is not met trivially

    # the batch rung, in the child's own saved arguments (checkpoint-4: attempt 2; checkpoint-6 and a
    # final save: attempt 3); trainer_state.json's train_batch_size is no evidence (transformers keeps
    # the checkpoint's value there after a resume, on both stacks)
    saved = [child.out / f"checkpoint-{s}" / "training_args.bin" for s in (4, 6)]
    if (child.out / "training_args.bin").exists():  # a script that calls save_model (trl sft does)
        saved.append(child.out / "training_args.bin")
    assert torch_load(child.out / "checkpoint-2" / "training_args.bin").per_device_train_batch_size == BATCH
    for path in saved:
        args = torch_load(path)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (BATCH // 2, 2), path
        assert args.auto_find_batch_size is False
    # ... and in the journal (after the child's files: those are the evidence)
    for a in attempts[1:]:
        assert (a["knobs"]["per_device_train_batch_size"], a["knobs"]["gradient_accumulation_steps"]) == (2, 2)
    verified = [(e["attempt"], e["knob"], e["observed"]) for e in child.events if e["event"] == "change_verified"]
    assert (2, "per_device_train_batch_size", BATCH // 2) in verified, verified
    assert not [e for e in child.events if e["event"] == "change_not_applied"]

    # the learning-rate rung: steps 1-4 at the schedule, 5-6 at half of it (HF restores the checkpoint's
    # scheduler over a new LR unless told otherwise)
    want, lrs = scheduled_lrs(), child.logged("learning_rate")
    assert [lrs[s] for s in range(1, 5)] == pytest.approx([want[s] for s in range(1, 5)], rel=1e-6), (want, lrs)
    assert [lrs[s] for s in (5, 6)] == pytest.approx([want[s] / 2 for s in (5, 6)], rel=1e-6), (want, lrs)
