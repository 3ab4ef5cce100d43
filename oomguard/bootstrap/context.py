"""The bootstrap's per-process state: what the supervisor asked for, and one journal (rank 0).

Built on first use — the first Trainer, LoraConfig or model the child constructs — never
while a module is still importing: ``oomguard.guard`` imports transformers, and doing that
from inside peft's or transformers' own import is a circular import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from typing import Any, Mapping

from oomguard import protocol
from oomguard.bootstrap import knobs as knob_map
from oomguard.bootstrap.switches import Part, Switches

__all__ = ["ArgsRecord", "Context"]


@dataclasses.dataclass(frozen=True)
class ArgsRecord:
    """What the bootstrap did to one arguments object (journaled when its Trainer is built)."""

    changes: tuple[knob_map.FieldEdit, ...]
    skipped: tuple[knob_map.KnobSkipped, ...]
    auto_find_forced_off: bool
    output_dir: dict[str, str] | None  # {"old", "new"} when redirected


class Context:
    def __init__(self, environ: Mapping[str, str] = os.environ):
        from oomguard.guard.env import GuardEnv

        self.switches = Switches.from_env(environ)
        self.env = GuardEnv.from_env(environ)
        self.delivered = _delivered(environ.get(protocol.ENV_DELIVERED, ""))
        self.lora: list[dict[str, Any]] = []  # one entry per LoraConfig the child built
        self._args: dict[int, tuple[weakref.ref, ArgsRecord]] = {}
        self._seen: dict[int, weakref.ref] = {}

    @property
    def journal(self):
        """Rank 0 owns the journal lines; other ranks write nothing (per-rank files stay theirs)."""
        from oomguard.guard.writer import EventWriter

        return EventWriter(self.env.run_dir if self.env.rank == 0 else None, self.env.rank)

    @property
    def rank_journal(self):
        """Every rank writes here, tagged with its rank: the per-rank banner (``bootstrap_trainer``)
        shows that all ranks of a torchrun/accelerate group run with the same knobs."""
        from oomguard.guard.writer import EventWriter

        return EventWriter(self.env.run_dir, self.env.rank)

    def first_sight(self, obj: Any) -> bool:
        """True the first time ``obj`` (a LoRA config) is seen in this process."""
        held = self._seen.get(id(obj))
        if held is not None and held() is obj:
            return False
        try:
            self._seen[id(obj)] = weakref.ref(obj)
        except TypeError:
            pass
        return True

    def on(self, part: Part) -> bool:
        return self.switches.on(part)

    def prepare_args(self, args: Any) -> ArgsRecord:
        """Apply knobs, auto_find_batch_size off and the checkpoint dir to ``args``, once per object."""
        held = self._args.get(id(args))
        if held is not None and held[0]() is args:
            return held[1]
        changes, skipped, forced, output_dir = [], [], False, None
        if self.on(Part.KNOBS):
            changes, skipped = knob_map.plan(args, self.env.knobs, self.delivered, cuda=_cuda())  # orders only
            knob_map.apply(args, changes)
            forced = knob_map.force_off_auto_find_batch_size(args)
        if self.on(Part.OUTPUT_DIR):
            output_dir = _redirect_output_dir(args, self.env.checkpoint_dir)
        record = ArgsRecord(tuple(changes), tuple(skipped), forced, output_dir)
        try:
            self._args[id(args)] = (weakref.ref(args), record)
        except TypeError:
            pass  # not weak-referenceable: at worst applied twice, which changes nothing the second time
        return record


def _redirect_output_dir(args: Any, checkpoint_dir: str | None) -> dict[str, str] | None:
    old = getattr(args, "output_dir", None)
    if not checkpoint_dir or old is None:
        return None
    if os.path.abspath(str(old)) == os.path.abspath(checkpoint_dir):
        return None
    args.output_dir = checkpoint_dir  # the supervisor finds and resumes checkpoints only there
    return {"old": str(old), "new": checkpoint_dir}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _delivered(raw: str) -> dict[str, str]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
