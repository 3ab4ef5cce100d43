"""The recipe's settings: command-line flags, then the supervisor's overrides.

Precedence (highest first): ``OOMGUARD_KNOBS`` (JSON; DESIGN §3 knob names, or any
other option name below), ``OOMGUARD_CHECKPOINT_DIR`` (for ``--output_dir``),
``OOMGUARD_RESUME_FROM`` (for ``--resume_from_checkpoint``; empty on attempt 1 leaves the flag
alone), then the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping

from oomguard import protocol
from oomguard.errors import UsageError

__all__ = ["apply_environment", "build_parser", "coerce", "DEFAULT_OUTPUT_DIR", "DEFAULT_TARGET_MODULES",
           "RecipeOptions", "resolve_options", "SCHEDULERS"]

DEFAULT_OUTPUT_DIR = "oomguard-sft"
SCHEDULERS = ("constant", "cosine", "linear", "constant_with_warmup")
DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj"


@dataclasses.dataclass(frozen=True)
class RecipeOptions:
    model: str | None = None  # local directory; None = the embedded tiny default
    dataset: str | None = None  # local file/folder; None = the embedded default
    output_dir: str | None = None  # None: <run dir>/checkpoints under oomguard, else ./oomguard-sft
    resume_from_checkpoint: str | None = None
    # knobs (DESIGN §3)
    max_seq_length: int = 512  # tokens
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    lora_r: int = 16
    lora_alpha: int = 32
    precision: str | None = None  # bf16 | fp16 | fp32; None = best the device supports
    learning_rate: float = 2e-4
    max_grad_norm: float = 0.3
    dataloader_num_workers: int = 0
    # schedule and adapter
    max_steps: int = -1
    num_train_epochs: float = 1.0
    save_steps: int = 50
    save_total_limit: int | None = None  # unset: the supervisor needs older checkpoints for NaN rollback
    logging_steps: int = 10
    seed: int = 42
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.03
    lora_dropout: float = 0.05
    target_modules: str = DEFAULT_TARGET_MODULES  # comma list, or "all-linear"
    packing: bool = False
    load_in_4bit: bool = True
    upcast_embeddings: bool = False
    optim: str | None = None  # None = paged_adamw_32bit (runs unpaged on CPU)
    activation_checkpointing: bool = True
    dataloader_pin_memory: bool = True
    no_guard: bool = False

    def knobs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in protocol.CORE_KNOBS}


_FIELDS = {f.name: f for f in dataclasses.fields(RecipeOptions)}
_BOOL_FLAGS = {"packing", "upcast_embeddings", "no_guard"}  # store_true
_NEGATED = {"load_in_4bit": "--no_4bit", "activation_checkpointing": "--no_activation_checkpointing",
            "dataloader_pin_memory": "--no_pin_memory"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oomguard.recipes.sft",
        description="QLoRA SFT (4-bit NF4 + LoRA, TRL SFTTrainer), supervised by oomguard.",
    )
    for name, field in _FIELDS.items():
        default = field.default
        if name in _BOOL_FLAGS:
            parser.add_argument(f"--{name}", action="store_true", default=default)
        elif name in _NEGATED:
            parser.add_argument(f"--{name}", dest=name, action="store_true", default=default)
            parser.add_argument(_NEGATED[name], dest=name, action="store_false")
        else:
            parser.add_argument(f"--{name}", type=_caster(name), default=default,
                                choices=_choices(name), metavar=name.upper())
    return parser


def _choices(name: str):
    return {"precision": protocol.PRECISIONS, "lr_scheduler_type": SCHEDULERS}.get(name)


def _caster(name: str):
    kind = str(_FIELDS[name].type)
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def coerce(name: str, value: Any) -> Any:
    """``value`` converted to option ``name``'s type; raises UsageError naming both."""
    if value is None:
        return None
    kind = str(_FIELDS[name].type)
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        return _caster(name)(value)
    except (TypeError, ValueError):
        raise UsageError(f"knob {name}={value!r} is not a valid {kind}; fix the policy or OOMGUARD_KNOBS") from None


def resolve_options(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> RecipeOptions:
    """Flags from ``argv``, then the supervisor's env overrides from ``environ``."""
    environ = os.environ if environ is None else environ
    parsed = vars(build_parser().parse_args(argv))
    options = RecipeOptions(**parsed)
    return apply_environment(options, environ)


def apply_environment(options: RecipeOptions, environ: Mapping[str, str]) -> RecipeOptions:
    changes: dict[str, Any] = {}
    for name, value in _knobs_from(environ).items():
        if name not in _FIELDS:
            if environ.get(protocol.ENV_ATTEMPT, "").strip() in ("", "1"):  # once a run, not once an attempt
                print(f"oomguard: ignoring knob {name!r}={value!r}: the SFT recipe has no such option",
                      file=sys.stderr)
            continue
        changes[name] = coerce(name, value)
    if environ.get(protocol.ENV_CHECKPOINT_DIR):  # the user's `oomguard run --checkpoint-dir`
        changes["output_dir"] = environ[protocol.ENV_CHECKPOINT_DIR]
    elif options.output_dir is None:
        run_dir = environ.get(protocol.ENV_RUN_DIR, "").strip()
        changes["output_dir"] = os.path.join(run_dir, "checkpoints") if run_dir else DEFAULT_OUTPUT_DIR
    if _supervisor_chose_resume(environ):
        changes["resume_from_checkpoint"] = environ[protocol.ENV_RESUME_FROM] or None
    if changes.get("precision") not in (None, *protocol.PRECISIONS):
        raise UsageError(f"precision {changes['precision']!r} is not one of {protocol.PRECISIONS}; fix the knob")
    return dataclasses.replace(options, **changes)


def _supervisor_chose_resume(environ: Mapping[str, str]) -> bool:
    """Whether ``OOMGUARD_RESUME_FROM`` is a choice that overrides ``--resume_from_checkpoint``.

    A path always is. ``""`` means "start fresh" only on a later attempt: on attempt 1 the
    supervisor has chosen nothing yet and the user's own flag stands (defect 4: an empty value
    there trained from scratch over the user's checkpoints). Without ``OOMGUARD_ATTEMPT`` (set by
    hand, not by the supervisor) ``""`` keeps its old meaning, a fresh start.
    """
    if protocol.ENV_RESUME_FROM not in environ:
        return False
    return bool(environ[protocol.ENV_RESUME_FROM]) or environ.get(protocol.ENV_ATTEMPT, "").strip() != "1"


def _knobs_from(environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        return protocol.parse_orders(environ.get(protocol.ENV_KNOBS, ""))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
