"""Parse and check everything once, before any child starts: the RunSpec."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

from ..errors import UsageError
from ..policy import GpuInfo, Policy, load_all_shipped, load_policy_arg, select_policy
from ..protocol import POLICY_COPY, RUN_JSON, parse_inject, parse_size
from .command import knobs_in_command, output_dir_of, world_size_of
from .gpu import detect_gpu, emulated_gpu
from .launch import is_builtin_recipe


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What ``oomguard run`` was asked to do, parsed and checked once.

    ``requested``: the knob values the command states as flags (all that is known before the
    child reports its recipe); ``orders``: what attempt 1 asks the child to set in-process —
    empty for a wrapped command (Trust rule 1), the policy's knobs the command does not set as
    flags with ``--start-from-policy`` or for the built-in recipe (its defaults).
    ``checkpoint_dir``: ``--checkpoint-dir`` (the child is redirected there), else the command's
    ``--output_dir``, else None until the child reports where its Trainer saves.
    """

    command: tuple[str, ...]
    policy: Policy
    run_dir: Path
    checkpoint_dir: Path | None
    requested: dict[str, Any]
    orders: dict[str, Any]
    extra_flags: dict[str, tuple[str, ...]]
    world_size: int
    gpu: GpuInfo | None
    vram_limit: str | None = None
    inject: str | None = None
    echo: bool = True
    redirect_checkpoints: bool = False  # --checkpoint-dir given: the bootstrap moves output_dir there
    start_from_policy: bool = False


def policy_knobs(policy: Policy) -> dict[str, Any]:
    knobs = policy.knobs
    return dict(knobs.model_dump(exclude_none=True) if isinstance(knobs, BaseModel) else knobs)


def policy_flags(policy: Policy) -> dict[str, tuple[str, ...]]:
    """knob -> the policy's extra CLI spellings (``flags.<knob>.names``)."""
    flags = getattr(policy, "flags", None) or {}
    return {k: tuple(v.names if isinstance(v, BaseModel) else v.get("names", ())) for k, v in dict(flags).items()}


def first_orders(policy: Policy, command: Sequence[str], extra: dict[str, tuple[str, ...]],
                 start_from_policy: bool) -> dict[str, Any]:
    """What attempt 1 asks the child to set: nothing, or (opted in / the built-in recipe) the
    policy's knobs that the command does not state as flags (a flag the user wrote wins)."""
    if not start_from_policy:
        return {}
    knobs = policy_knobs(policy)
    written = knobs_in_command(command, knobs=list(knobs), extra_flags=extra)
    return {k: v for k, v in knobs.items() if k not in written}


def _check_command(command: Sequence[str]) -> tuple[str, ...]:
    if not command:
        raise UsageError("no command to run; write it after `--`, e.g. "
                         "`oomguard run -- python train.py --per_device_train_batch_size 8`")
    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]!r} (not on PATH and not an executable "
                         "file); check the spelling or give a full path")
    return tuple(command)


def _check_options(vram_limit: str | None, inject: str | None) -> None:
    try:
        if vram_limit:
            parse_size(vram_limit)
        if inject:
            parse_inject(inject)
    except ValueError as exc:
        option = "--vram-limit" if vram_limit and "size" in str(exc) else "--inject"
        raise UsageError(f"{option}: {exc}") from None


def resolve_policy(policy_arg: str | None, vram_limit: str | None,
                   run_dir: Path | None = None) -> tuple[Policy, GpuInfo | None]:
    """``--policy`` if given; else the policy a continued run already used (its copy in the run
    dir: `oomguard run --run-dir D` after a crash must not switch ladders); else by GPU."""
    gpu = detect_gpu()
    if vram_limit:
        gpu = emulated_gpu(gpu, parse_size(vram_limit))
    if policy_arg:
        return load_policy_arg(policy_arg), gpu
    if run_dir is not None and (run_dir / RUN_JSON).is_file() and (run_dir / POLICY_COPY).is_file():
        return load_policy_arg(str(run_dir / POLICY_COPY)), gpu
    return select_policy(load_all_shipped(), gpu), gpu


def build_spec(command: Sequence[str], *, policy_arg: str | None, run_dir: Path,
               checkpoint_dir: Path | None = None, vram_limit: str | None = None,
               inject: str | None = None, echo: bool = True, start_from_policy: bool = False) -> RunSpec:
    _check_options(vram_limit, inject)
    cmd = _check_command(command)
    policy, gpu = resolve_policy(policy_arg, vram_limit, run_dir)
    extra = policy_flags(policy)
    names = list(policy_knobs(policy))
    start = start_from_policy or is_builtin_recipe(cmd)
    out = checkpoint_dir or (Path(output_dir_of(cmd)) if output_dir_of(cmd) else None)
    return RunSpec(command=cmd, policy=policy, run_dir=run_dir, checkpoint_dir=Path(out).absolute() if out else None,
                   requested=knobs_in_command(cmd, knobs=names, extra_flags=extra),
                   orders=first_orders(policy, cmd, extra, start), extra_flags=extra,
                   world_size=world_size_of(cmd), gpu=gpu, vram_limit=vram_limit, inject=inject, echo=echo,
                   redirect_checkpoints=checkpoint_dir is not None, start_from_policy=start)
