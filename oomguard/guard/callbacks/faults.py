"""FaultInjectionCallback: real failures on demand (``OOMGUARD_INJECT``), each once per run.

The data-dependent ones (issue 19) fire on every training micro-batch that matches, in every attempt, and are
never remembered: ``cuda_oom@tokens=N`` when the micro-batch's ``input_ids`` hold more than N tokens (a split
step's smaller chunks pass), ``nan@row=R`` / ``inf@row=R`` when it holds row R of the train dataset (its rows
come from the ledger, :func:`oomguard.guard.culprit.current_rows`; a quarantined R never trains).

Fabricated memory (issue 18 item 5, tests only: ``OOMGUARD_FAKE_MEMORY=per_token=B[,base=B]``): where no CUDA
memory figures exist (CPU), each step end journals a ``memory`` event whose ``step_peak`` is ``base + per_token x``
the tokens of the step's largest training micro-batch (its real ``input_ids.numel()``, so a smaller batch really
reads lower), announced once per attempt by a ``fault_injected`` event (fault ``fake_memory``). It is a made-up
number for the supervisor's grow-back watch, never a measurement.

Faults are armed only under a live supervisor that asked for them (``env.faults_armed``).
Fired faults are remembered in ``<run_dir>/injected.json`` (rank k: ``injected.rank<k>.json``)
*before* they fire, so a resumed attempt — or a fault that kills the process — never repeats.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch
from transformers import TrainerCallback

from oomguard import protocol
from oomguard.guard.culprit import current_rows
from oomguard.guard.env import faults_armed
from oomguard.guard.writer import EventWriter
from oomguard.protocol import Fault

__all__ = ["armed_faults", "due_faults", "FaultInjectionCallback", "FaultLedger", "INJECTED_JSON", "injected_oom",
           "parse_fake_memory"]

INJECTED_JSON = "injected.json"


class FaultLedger:
    """Which fault keys already fired in this run; in memory only without a run dir."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fired: set[str] = set(self._read())

    def _read(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []  # a torn file: at worst a fault fires again
        return [str(k) for k in data] if isinstance(data, list) else []

    def fired(self, fault: Fault) -> bool:
        return fault.key in self._fired

    def mark(self, fault: Fault) -> None:
        self._fired.add(fault.key)
        if self.path is not None:
            protocol.atomic_write_json(self.path, sorted(self._fired))


def due_faults(faults: Iterable[Fault], ledger: FaultLedger, *, kind: str, rank: int, attempt: int,
               step: int | None = None) -> list[Fault]:
    """Faults of ``kind`` that should fire now; ``step`` None matches only faults without a step. Pure."""
    out = []
    for f in faults:
        if f.kind != kind or f.data_dependent or ledger.fired(f):
            continue
        if (f.rank is not None and f.rank != rank) or (f.attempt is not None and f.attempt != attempt):
            continue
        if f.step is not None and (step is None or step < f.step):
            continue
        out.append(f)
    return out


def armed_faults(faults: tuple[Fault, ...], environ: Mapping[str, str]) -> tuple[Fault, ...]:
    """``faults`` when a live supervisor asked for them (``faults_armed``), else none, said once on stderr."""
    why = faults_armed(environ) if faults else None
    if why is None:
        return faults
    print(f"oomguard guard: ignoring {protocol.ENV_INJECT}={environ.get(protocol.ENV_INJECT)!r}: {why}; "
          "faults fire only under `oomguard run --inject` (unset the variable to silence this)", file=sys.stderr)
    return ()


def parse_fake_memory(raw: str | None) -> tuple[int, int] | None:
    """``OOMGUARD_FAKE_MEMORY`` -> (per_token, base) bytes, None when unset; ValueError naming the fix."""
    if not (raw or "").strip():
        return None
    got = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, eq, val = part.partition("=")
        if not eq or key.strip() not in ("per_token", "base") or not val.strip().isdigit():
            raise ValueError(f"{protocol.ENV_FAKE_MEMORY}={raw!r}: bad part {part!r}; use per_token=BYTES[,base=BYTES] "
                             "(integers), or unset it to journal real memory only")
        got[key.strip()] = int(val)
    if "per_token" not in got:
        raise ValueError(f"{protocol.ENV_FAKE_MEMORY}={raw!r} has no per_token=BYTES; add it or unset the variable")
    return got["per_token"], got.get("base", 0)


def _armed_fake_memory(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """The fabricated memory model when asked for under a live supervisor, else None (said once on stderr)."""
    raw = environ.get(protocol.ENV_FAKE_MEMORY)
    model = parse_fake_memory(raw)
    why = faults_armed({**environ, protocol.ENV_INJECT: "fake_memory"}) if model else None
    if why is None:
        return model
    print(f"oomguard guard: ignoring {protocol.ENV_FAKE_MEMORY}={raw!r}: {why}", file=sys.stderr)
    return None


def injected_oom(where: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by oomguard: {where}). "
        "This is a test fault from OOMGUARD_INJECT; unset it to train normally.")


class FaultInjectionCallback(TrainerCallback):
    """Honours ``faults``: cuda_oom (forward of step N, or of every micro-batch over ``tokens``), nan/inf (loss
    of step N, or of every micro-batch holding ``row``), crash, hang, host_oom (SIGKILL), resume_oom (at train
    begin of a resumed run), eval_oom (next eval >= N)."""

    STEP_KINDS = ("crash", "hang", "host_oom")

    def __init__(self, faults: Iterable[Fault], run_dir: str | Path | None = None, *, rank: int = 0,
                 attempt: int = 1, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.faults = armed_faults(tuple(faults), environ)
        self.fake_memory = _armed_fake_memory(environ)  # (per_token, base) bytes: fabricated step peaks (tests)
        self._step_tokens = 0  # the largest training micro-batch of the current step, tokens
        self.journal = EventWriter(run_dir, rank)
        self.ledger = FaultLedger(self.journal.rank_file(INJECTED_JSON))
        self.rank, self.attempt = rank, attempt
        self._armed: Fault | None = None  # a forward fault waiting for the next forward
        self._hooked = False
        self._completed = 0  # global_step when the current step began

    def _due(self, kind: str, step: int | None) -> Fault | None:
        due = due_faults(self.faults, self.ledger, kind=kind, rank=self.rank, attempt=self.attempt, step=step)
        return due[0] if due else None

    def _fire(self, fault: Fault, step: int, **extra) -> None:
        self.ledger.mark(fault)  # before firing: host_oom and hang never come back
        self.journal.emit("fault_injected", step=step, fault=fault.kind, key=fault.key, **extra)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not self._hooked and (self.faults or self.fake_memory):
            target = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model
            # The embedding runs in every forward path, including TRL's fused-loss one.
            target.register_forward_pre_hook(self._pre_forward)
            target.register_forward_hook(self._post_forward)
            self._hooked = True
        fault = self._due("resume_oom", state.global_step) if state.global_step > 0 else None
        if fault is not None:
            self._fire(fault, state.global_step)
            raise injected_oom("resume_oom while loading the checkpoint")
        if self.fake_memory is not None:
            per_token, base = self.fake_memory
            self.journal.emit("fault_injected", step=state.global_step, fault="fake_memory", key="fake_memory",
                              per_token=per_token, base=base)

    def on_step_end(self, args, state, control, **kwargs):
        if self.fake_memory is not None:
            per_token, base = self.fake_memory
            self.journal.emit("memory", step=state.global_step, step_peak=base + per_token * self._step_tokens)

    def on_step_begin(self, args, state, control, **kwargs):
        self._completed = state.global_step
        self._step_tokens = 0
        step = state.global_step + 1  # the step now starting
        for kind in ("cuda_oom", "nan", "inf"):
            fault = self._due(kind, step)
            if fault is not None and self._armed is None:
                self._armed = fault
        for kind in self.STEP_KINDS:
            fault = self._due(kind, step)
            if fault is not None:
                self._fire(fault, state.global_step)
                self._step_fault(kind)

    def _step_fault(self, kind: str) -> None:
        if kind == "crash":
            raise RuntimeError("injected crash (OOMGUARD_INJECT); unset it to train normally")
        if kind == "host_oom":
            os.kill(os.getpid(), signal.SIGKILL)
        while kind == "hang":
            time.sleep(3600)  # no more heartbeats: the supervisor's hang timeout must fire

    def _data_fault(self, kinds: tuple[str, ...], module, args) -> Fault | None:
        """A data-dependent fault of ``kinds`` this training micro-batch matches (see the module doc)."""
        if not module.training:
            return None
        for f in self.faults:
            if f.kind not in kinds or not f.data_dependent or (f.rank is not None and f.rank != self.rank) \
                    or (f.attempt is not None and f.attempt != self.attempt):
                continue
            ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if f.tokens is not None and ids is not None and ids.numel() > f.tokens:
                return f
            if f.row is not None and f.row in current_rows():
                return f
        return None

    def _pre_forward(self, module, args):
        if module.training and args and isinstance(args[0], torch.Tensor):
            self._step_tokens = max(self._step_tokens, int(args[0].numel()))
        data = self._data_fault(("cuda_oom",), module, args)
        if data is not None:
            self.journal.emit("fault_injected", step=self._completed, fault=data.kind, key=data.key,
                              tokens=int(args[0].numel()))
            raise injected_oom(f"a micro-batch of {int(args[0].numel())} tokens > {data.tokens}")
        fault = self._armed
        if fault is not None and fault.kind == "cuda_oom" and module.training:
            self._armed = None
            self._fire(fault, self._completed)
            raise injected_oom(f"forward of step {fault.step}")

    def _post_forward(self, module, args, output):
        data = self._data_fault(("nan", "inf"), module, args)
        if data is not None:
            self.journal.emit("fault_injected", step=self._completed, fault=data.kind, key=data.key, row=data.row)
            return output * float(data.kind)
        fault = self._armed
        if fault is not None and fault.kind in ("nan", "inf") and module.training:
            self._armed = None
            self._fire(fault, self._completed)
            # Every activation downstream, the loss and hence every trainable gradient turn non-finite.
            return output * float(fault.kind)

    def on_prediction_step(self, args, state, control, **kwargs):
        fault = self._due("eval_oom", state.global_step)
        if fault is not None:
            self._fire(fault, state.global_step)
            raise injected_oom(f"evaluation after step {state.global_step}")
