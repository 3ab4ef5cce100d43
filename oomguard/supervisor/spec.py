"""Parse and check everything once, before any child starts: the RunSpec."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from ..errors import RunDirError, UsageError
from ..policy import GpuInfo, Policy, load_all_shipped, load_policy_arg, select_policy
from ..protocol import ATTEMPTS_DIR, EVENTS_JSONL, HEARTBEAT, LOCK_FILE, POLICY_COPY, RUN_JSON, parse_inject, parse_size
from .command import knobs_in_command, output_dir_of, world_size_of
from .console import say as console_say
from .gpu import detect_gpu, emulated_gpu
from .launch import is_builtin_recipe
from .nodes import NodeRole
from .process import exec_problem
from .spare import default_on

__all__ = ["MIN_FREE_BYTES", "Recovery", "RecoveryHook", "RunSpec", "build_spec", "check_run_dir", "first_orders",
           "policy_flags", "policy_knobs", "resolve_policy", "say"]


@dataclasses.dataclass(frozen=True)
class Recovery:
    """A recovery the supervisor just decided and journaled (what ``RunSpec.on_recovery`` gets):
    attempt ``attempt`` failed with ``kind`` at ``step``; ``reason`` is the decision's sentence,
    root cause first; ``changes`` the knobs it changes (``knob: old → new``)."""

    run_dir: str
    attempt: int
    kind: str
    step: int | None
    reason: str
    changes: tuple[str, ...] = ()
    resume_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "changes": list(self.changes)}


RecoveryHook = Callable[[Recovery], None]


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
    echo: bool = True  # the child's output on our stdout/stderr (``--quiet``: off)
    verbose: bool = False  # the child's tracebacks whole (``--verbose``), else condensed
    redirect_checkpoints: bool = False  # --checkpoint-dir given: the bootstrap moves output_dir there
    start_from_policy: bool = False
    warm_spare: bool = False  # a pre-imported interpreter for the next attempt (spare.py; build_spec: default_on())
    # called after each recovery decision is journaled (a notifier); an exception from it is logged, never fatal
    on_recovery: RecoveryHook | None = None
    node: NodeRole | None = None  # this node's place in a job of several (supervisor/nodes.py); None: one node
    node_timeout_s: float = 300.0  # how long to wait for another node's supervisor before ExitCode.NODE_LOST


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
    problem = exec_problem(command)  # missing, no shebang, a missing interpreter: before anything starts
    if problem:
        raise UsageError(problem)
    return tuple(command)


def _check_options(vram_limit: str | None, inject: str | None) -> None:
    if vram_limit is not None:
        try:
            parse_size(vram_limit, require_unit=True)
        except ValueError as exc:
            raise UsageError(f"--vram-limit: {exc}") from None
    if inject is not None:
        try:
            parse_inject(inject)
        except ValueError as exc:
            raise UsageError(f"--inject: {exc}") from None


MIN_FREE_BYTES = 1 << 20  # a run dir's first run.json, journal lines and logs need well under this


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(path: Path, what: str, option: str) -> None:
    """``path`` (or, when missing, the nearest folder above it) is a writable directory with space."""
    base = path if os.path.lexists(path) else _existing_ancestor(path)
    if not base.is_dir():
        where = "is" if base == path.absolute() or base == path else f"cannot be created: {base} is"
        raise RunDirError(f"{what} {path} {where} a {_kind(base)}, not a directory; "
                          f"pass a {option} that is a directory (or will be created as one)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {path}: {base} is not writable (read-only filesystem or permissions); "
                          f"make it writable or pass a {option} on a writable filesystem")
    st = os.statvfs(base)
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        raise RunDirError(f"{what} {path}: the filesystem of {base} is full ({st.f_bavail * st.f_frsize} bytes "
                          f"free); free some space or pass a {option} on another filesystem")


def _kind(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "broken link"
    return ("directory" if stat.S_ISDIR(mode) else "regular file" if stat.S_ISREG(mode)
            else "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "special file")


def check_run_dir(run_dir: Path) -> None:
    """Refuse, before anything starts, a run dir the supervisor could not write (a file, below a
    file, read-only, full) or whose state files are not files: else an OSError mid-start leaves
    a traceback and a run.json saying ``running``."""
    _check_writable_dir(run_dir, "run dir", "--run-dir")
    for name in (RUN_JSON, EVENTS_JSONL, POLICY_COPY, LOCK_FILE, HEARTBEAT):
        path = run_dir / name
        if os.path.lexists(path) and not path.is_file():
            raise RunDirError(f"{path} is a {_kind(path)}, not a regular file; the supervisor writes its state "
                              f"there: move it aside (or restore the file) or pass a new --run-dir")
        if path.is_file() and not os.access(path, os.W_OK):
            raise RunDirError(f"{path} is not writable; make it writable (chmod u+w) or pass a new --run-dir")
    attempts = run_dir / ATTEMPTS_DIR
    if os.path.lexists(attempts) and not attempts.is_dir():
        raise RunDirError(f"{attempts} is a {_kind(attempts)}, not a directory; move it aside or pass a new --run-dir")


def _check_checkpoint_dir(checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is None:
        return
    base = checkpoint_dir if os.path.lexists(checkpoint_dir) else _existing_ancestor(checkpoint_dir)
    if not base.is_dir():
        raise UsageError(f"--checkpoint-dir {checkpoint_dir}: {base} is a {_kind(base)}, not a directory; "
                         "pass a directory (new or existing) for checkpoint-N folders")


def resolve_policy(policy_arg: str | None, vram_limit: str | None,
                   run_dir: Path | None = None) -> tuple[Policy, GpuInfo | None]:
    """``--policy`` if given; else the policy a continued run already used (its copy in the run
    dir: `oomguard run --run-dir D` after a crash must not switch ladders); else by GPU."""
    gpu = detect_gpu()
    if vram_limit:
        gpu = emulated_gpu(gpu, parse_size(vram_limit))
    if policy_arg is not None:
        if not policy_arg.strip():  # `--policy ""` (an unset shell variable) must not mean "the default"
            raise UsageError("--policy is empty; give a shipped name (`oomguard policy list`) or a policy "
                             "file, or leave --policy out to use the run's or the GPU's policy")
        return load_policy_arg(policy_arg), gpu
    if run_dir is not None and (run_dir / RUN_JSON).is_file():
        return _continued_policy(run_dir), gpu
    return select_policy(load_all_shipped(), gpu), gpu


def _continued_policy(run_dir: Path) -> Policy:
    """A continued run keeps its own policy; a missing copy is an error, not the GPU's default."""
    copy = run_dir / POLICY_COPY
    if not os.path.lexists(copy):
        raise RunDirError(f"{copy} is missing: this run dir holds a run whose policy copy was deleted; "
                          f"restore {POLICY_COPY} (the run's policy) or pass --policy NAME_OR_FILE to "
                          "continue under that policy")
    return load_policy_arg(str(copy))


def build_spec(command: Sequence[str], *, policy_arg: str | None, run_dir: Path,
               checkpoint_dir: Path | None = None, vram_limit: str | None = None,
               inject: str | None = None, echo: bool = True, start_from_policy: bool = False,
               on_recovery: RecoveryHook | None = None, verbose: bool = False,
               warm_spare: bool | None = None, node: NodeRole | None = None, node_timeout_s: float = 300.0) -> RunSpec:
    _check_options(vram_limit, inject)
    if node is not None and not node_timeout_s > 0:
        raise UsageError(f"--node-timeout {node_timeout_s:g}: give the seconds to wait for another node (> 0)")
    cmd = _check_command(command)
    check_run_dir(run_dir)
    _check_checkpoint_dir(checkpoint_dir)
    policy, gpu = resolve_policy(policy_arg, vram_limit, run_dir)
    extra = policy_flags(policy)
    names = list(policy_knobs(policy))
    start = start_from_policy or is_builtin_recipe(cmd)
    out = checkpoint_dir or (Path(output_dir_of(cmd)) if output_dir_of(cmd) else None)
    return RunSpec(command=cmd, policy=policy, run_dir=run_dir, checkpoint_dir=Path(out).absolute() if out else None,
                   requested=knobs_in_command(cmd, knobs=names, extra_flags=extra),
                   orders=first_orders(policy, cmd, extra, start), extra_flags=extra,
                   world_size=world_size_of(cmd, node.count if node else None), gpu=gpu, vram_limit=vram_limit,
                   inject=inject, echo=echo,
                   verbose=verbose, redirect_checkpoints=checkpoint_dir is not None, start_from_policy=start,
                   on_recovery=on_recovery, warm_spare=default_on() if warm_spare is None else warm_spare, node=node,
                   node_timeout_s=node_timeout_s)


def say(spec: RunSpec, text: str) -> None:
    """One line of oomguard's own on stderr, on a line of its own; under every verbosity (``--quiet``
    hides only the child's output)."""
    console_say(text)
