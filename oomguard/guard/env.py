"""What the supervisor told this child, read once from the environment (DESIGN §3)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from oomguard import protocol
from oomguard.protocol import Fault, ResumeMode

__all__ = ["GuardEnv", "faults_armed", "process_alive", "resume_mode"]


@dataclass(frozen=True)
class GuardEnv:
    """The child's view of its attempt. Every field has a harmless default outside oomguard."""

    run_dir: Path | None = None
    attempt: int = 1
    error_file: Path | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # oomguard's orders: set these in-process
    resume_from: str | None = None
    vram_limit: int | None = None  # bytes
    faults: tuple[Fault, ...] = ()
    checkpoint_dir: str | None = None
    rank: int = 0
    world_size: int = 1
    observe: tuple[str, ...] = ()  # knob names to report beyond the registry's (policy-declared)
    # how to load the checkpoint (the supervisor's decision); None: the supervisor did not say (older one)
    resume_mode: ResumeMode | None = None
    nan_skip_steps: int = 0  # non-finite updates skipped before the NaN guard stops (policy limits.nan_skip_steps)
    rewarm_steps: int = 0  # re-enter warm-up over this many optimizer steps (after a NaN rollback)

    @property
    def active(self) -> bool:
        """True when run under the supervisor (OOMGUARD_RUN_DIR set)."""
        return self.run_dir is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "GuardEnv":
        run_dir = _text(environ, protocol.ENV_RUN_DIR)
        error_file = _text(environ, protocol.ENV_ERROR_FILE)
        vram = _text(environ, protocol.ENV_VRAM_LIMIT)
        try:
            faults = tuple(protocol.parse_inject(environ.get(protocol.ENV_INJECT, "")))
        except ValueError as exc:
            raise ValueError(f"{protocol.ENV_INJECT}: {exc}") from None
        try:
            vram_limit = protocol.parse_size(vram) if vram else None
        except ValueError as exc:
            raise ValueError(f"{protocol.ENV_VRAM_LIMIT}: {exc}") from None
        return cls(
            run_dir=Path(run_dir) if run_dir else None,
            attempt=_int(environ, protocol.ENV_ATTEMPT, default=1, minimum=1),
            error_file=Path(error_file) if error_file else None,
            knobs=_knobs(environ.get(protocol.ENV_KNOBS, "")),
            resume_from=_text(environ, protocol.ENV_RESUME_FROM),
            vram_limit=vram_limit,
            faults=faults,
            checkpoint_dir=_text(environ, protocol.ENV_CHECKPOINT_DIR),
            rank=_rank(environ),
            world_size=_int(environ, "WORLD_SIZE", default=1, minimum=1),
            observe=tuple(n.strip() for n in environ.get(protocol.ENV_OBSERVE, "").split(",") if n.strip()),
            resume_mode=resume_mode(environ),
            nan_skip_steps=_int(environ, protocol.ENV_NAN_SKIP_STEPS, default=0, minimum=0),
            rewarm_steps=_int(environ, protocol.ENV_REWARM_STEPS, default=0, minimum=0),
        )


def resume_mode(environ: Mapping[str, str]) -> ResumeMode | None:
    """``OOMGUARD_RESUME_MODE`` as a ResumeMode: "" is normal; None when the variable is absent."""
    if protocol.ENV_RESUME_MODE not in environ:
        return None
    raw = environ[protocol.ENV_RESUME_MODE].strip().lower()
    try:
        return ResumeMode(raw) if raw else ResumeMode.NORMAL
    except ValueError:
        raise ValueError(f"{protocol.ENV_RESUME_MODE}={raw!r} is not one of "
                         f"{', '.join(m.value for m in ResumeMode)}; unset it or use one of those") from None


def faults_armed(environ: Mapping[str, str], alive: Callable[[int], bool] | None = None) -> str | None:
    """None when ``OOMGUARD_INJECT``'s faults may fire here, else why not (defect 18). Pure but for
    ``alive`` (default: signal 0 to the pid).

    Faults fire only under a supervisor that asked for them: a run dir must be set, and a
    supervisor pid, when given, must be alive. A stray ``OOMGUARD_INJECT`` left in a shell, or an
    orphan whose supervisor died, trains normally. No pid with a run dir is a test harness acting
    as the supervisor (it writes the run dir itself), so it may inject.
    """
    if not environ.get(protocol.ENV_INJECT, "").strip():
        return None
    if not _text(environ, protocol.ENV_RUN_DIR):
        return f"{protocol.ENV_RUN_DIR} is unset: no oomguard supervisor runs this process"
    raw = _text(environ, protocol.ENV_SUPERVISOR_PID)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) <= 0:
        return f"{protocol.ENV_SUPERVISOR_PID}={raw!r} is not a process id"
    if not (alive or process_alive)(int(raw)):
        return f"the supervisor (pid {raw}) that set it is gone"
    return None


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): kill(0) is all we know
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")



def _text(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _int(environ: Mapping[str, str], name: str, *, default: int, minimum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; set it to a whole number >= {minimum} "
                         "or unset it") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}; set it to a whole number >= {minimum} or unset it")
    return value


def _rank(environ: Mapping[str, str]) -> int:
    # RANK is the global rank (torchrun, accelerate); LOCAL_RANK alone means one node.
    name = "RANK" if environ.get("RANK", "").strip() else "LOCAL_RANK"
    return _int(environ, name, default=0, minimum=0)


def _knobs(raw: str) -> dict[str, Any]:
    return protocol.parse_orders(raw)
