"""Fakes for the supervisor loop's two seams (torch.distributed.elastic's agent tests are the model):
a launcher that plays a scripted child in-process (no subprocess, no torch) and a clock that never
sleeps. A scripted attempt writes what a real child leaves: checkpoints, journal events, error records.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import struct
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from oomguard import protocol
from oomguard.policy import load_policy
from oomguard.protocol import ErrorRecord, FailureKind, Phase
from oomguard.supervisor.loop import supervise
from oomguard.supervisor.process import ChildOutcome, StopFlag, Watch
from oomguard.supervisor.spec import RunSpec

POLICY = Path(__file__).parents[1] / "integration" / "policies" / "fast.yaml"
BATCH, ACCUM = "per_device_train_batch_size", "gradient_accumulation_steps"


def write_checkpoint(out: Path, step: int) -> Path:
    """A complete ``checkpoint-<step>`` as ``supervisor/checkpoints.py`` checks it."""
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    (d / "adapter_config.json").write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt"):
        (d / name).write_bytes(b"x")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


@dataclasses.dataclass
class Child:
    """One scripted attempt: save checkpoints at ``saves``, report ``steps`` steps, then end as told.

    ``fail``: the error record's kind (None: success); ``interrupt``: the supervisor got that signal
    while it ran; ``stop_after``: a stop signal arrives right after the child ended (between attempts);
    ``die``: the supervisor itself dies mid-attempt (an exception out of the launcher)."""

    steps: int = 4
    saves: Sequence[int] = ()
    fail: FailureKind | None = None
    phase: Phase = Phase.FORWARD_BACKWARD
    detail: str = "CUDA out of memory. Tried to allocate 2.00 GiB"
    last_finite_step: int | None = None
    growth: float | None = None  # bytes/step the child reports before it fails
    interrupt: int | None = None
    stop_after: int | None = None
    die: bool = False


class SupervisorDied(BaseException):
    """Raised from the fake launcher: the supervisor process ends mid-attempt (SIGKILL, power)."""


@dataclasses.dataclass
class Launched:
    argv: list[str]
    env: dict[str, str]


class FakeLauncher:
    """``ChildLauncher``: plays ``script`` (one :class:`Child` per attempt) into the run dir."""

    def __init__(self, out: Path, script: Sequence[Child]):
        self.out, self.script, self.launched = out, list(script), []

    def __call__(self, argv: Sequence[str], env: Mapping[str, str], attempt_dir: Path, watch: Watch,
                 stop: StopFlag, on_tick: Callable[[], None] | None = None,
                 on_start: Callable[[int], None] | None = None) -> ChildOutcome:
        child = self.script[len(self.launched)]
        self.launched.append(Launched(list(argv), dict(env)))
        attempt_dir.mkdir(parents=True, exist_ok=True)
        run_dir, attempt = env[protocol.ENV_RUN_DIR], int(env[protocol.ENV_ATTEMPT])
        start = _resumed_step(env)
        for step in range(start + 1, start + child.steps + 1):
            protocol.emit_event(run_dir, "step", source="child", rank=0, step=step, max_steps=None, epoch=None,
                                attempt=attempt)
            if step in child.saves:
                path = write_checkpoint(self.out, step)
                protocol.emit_event(run_dir, "checkpoint_saved", source="child", rank=0, step=step, path=str(path))
        last = start + child.steps
        if child.growth:
            protocol.emit_event(run_dir, "memory_growth", source="child", rank=0, step=last,
                                slope_bytes_per_step=child.growth, level=2.0**30, cap=None, projected_step=None)
        if child.fail is not None:
            protocol.write_error_record(env[protocol.ENV_ERROR_FILE], ErrorRecord(
                kind=child.fail, phase=child.phase, step=last, detail=child.detail,
                last_finite_step=child.last_finite_step))
        if child.die:
            raise SupervisorDied()
        if child.interrupt is not None:
            stop.set(child.interrupt)
        elif child.stop_after is not None:
            stop.set(child.stop_after)
        return ChildOutcome(exit_code=1 if child.fail or child.interrupt else 0, signal=None, hung=False,
                            interrupted_by=child.interrupt, duration_s=0.01, host_mem_peak_percent=0.0,
                            stderr_tail="", pids=frozenset())


def _resumed_step(env: Mapping[str, str]) -> int:
    resume = env.get(protocol.ENV_RESUME_FROM)
    return int(Path(resume).name.split("-")[1]) if resume else 0


class FakeClock:
    """Real wall time plus ``offset`` (a test moves it); sleeps return at once and are summed."""

    def __init__(self) -> None:
        self.offset, self.slept, self._mono = 0.0, 0.0, 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return self._mono

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self._mono += seconds


def make_spec(tmp_path: Path, *, batch: int = 8, policy=None, **over: Any) -> RunSpec:
    out = tmp_path / "out"
    command = ("python", "train.py", "--per_device_train_batch_size", str(batch),
               "--gradient_accumulation_steps", "1", "--output_dir", str(out))
    fields = dict(command=command, policy=policy or load_policy(POLICY), run_dir=tmp_path / "run",
                  checkpoint_dir=out, requested={BATCH: batch, ACCUM: 1}, orders={}, extra_flags={},
                  world_size=1, gpu=None, echo=False)
    return RunSpec(**{**fields, **over})


def run(tmp_path: Path, script: Sequence[Child], *, spec: RunSpec | None = None,
        clock: FakeClock | None = None) -> tuple[int, FakeLauncher, dict[str, Any]]:
    """Supervise ``script``; (exit code, the launcher with what it launched, run.json)."""
    spec = spec or make_spec(tmp_path)
    launcher = FakeLauncher(spec.checkpoint_dir, script)
    code = supervise(spec, launch=launcher, clock=clock or FakeClock())
    return int(code), launcher, read_run(spec)


def read_run(spec: RunSpec) -> dict[str, Any]:
    return json.loads((spec.run_dir / protocol.RUN_JSON).read_text())


def events(spec: RunSpec, name: str | None = None) -> list[dict[str, Any]]:
    found = list(protocol.read_jsonl(spec.run_dir / protocol.EVENTS_JSONL))
    return [e for e in found if name is None or e.get("event") == name]


def flag(argv: Sequence[str], name: str) -> str:
    return argv[argv.index(name) + 1]


SIGINT = int(signal.SIGINT)
