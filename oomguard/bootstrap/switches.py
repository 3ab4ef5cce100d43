"""Which parts of the bootstrap are on, read from the environment. Stdlib only.

``OOMGUARD_BOOTSTRAP=0`` turns the whole bootstrap off (the supervisor then does not even
put it on ``PYTHONPATH``); ``OOMGUARD_BOOTSTRAP_SKIP=knobs,resume`` leaves single parts alone.
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass
from typing import Mapping

from oomguard import protocol

__all__ = ["OFF_VALUES", "parse_skip", "Part", "Switches"]

OFF_VALUES = ("0", "off", "false", "no")


class Part(str, enum.Enum):
    """One thing the bootstrap changes in the child (README, "Wrapping your command")."""

    CALLBACKS = "callbacks"  # the guard's TrainerCallbacks, error record, emergency checkpoint
    KNOBS = "knobs"  # OOMGUARD_KNOBS onto the TrainingArguments; auto_find_batch_size off
    LORA = "lora"  # lora_r / lora_alpha onto every peft.LoraConfig the child builds
    RESUME = "resume"  # train(resume_from_checkpoint=...) -> the supervisor's checkpoint
    OUTPUT_DIR = "output_dir"  # checkpoints written where the supervisor looks (OOMGUARD_CHECKPOINT_DIR)
    VRAM = "vram"  # OOMGUARD_VRAM_LIMIT cap and allocator defaults, before the model loads


@dataclass(frozen=True)
class Switches:
    enabled: bool = True  # OOMGUARD_BOOTSTRAP not off
    active: bool = False  # under the supervisor: OOMGUARD_RUN_DIR set
    skip: frozenset[Part] = frozenset()

    @property
    def patching(self) -> bool:
        """True when this process should patch anything at all."""
        return self.enabled and self.active

    def on(self, part: Part) -> bool:
        return self.patching and part not in self.skip

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Switches":
        enabled = environ.get(protocol.ENV_BOOTSTRAP, "").strip().lower() not in OFF_VALUES
        active = bool(environ.get(protocol.ENV_RUN_DIR, "").strip())
        return cls(enabled=enabled, active=active, skip=parse_skip(environ.get(protocol.ENV_BOOTSTRAP_SKIP, "")))


def parse_skip(text: str) -> frozenset[Part]:
    """'knobs, resume' -> {KNOBS, RESUME}; an unknown name is reported on stderr and ignored
    (a typo must not stop training)."""
    parts, known = set(), {p.value: p for p in Part}
    for name in filter(None, (n.strip().lower() for n in text.split(","))):
        if name in known:
            parts.add(known[name])
        else:
            print(f"oomguard bootstrap: {protocol.ENV_BOOTSTRAP_SKIP} names unknown part {name!r}; "
                  f"known: {', '.join(known)}. Ignoring it.", file=sys.stderr)
    return frozenset(parts)
