"""One probe child through the supervisor's normal launch path (``oomguard plan`` / ``tune``).

The supervisor runs the command as ``oomguard run`` would (same spec, env contract, bootstrap, card
emulation, the one Popen in ``supervisor/process.py``), with ``OOMGUARD_PROBE`` in its environment
(the child inherits the supervisor's) and one attempt at most: a probe that fails is reported, not
degraded and retried. Never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Sequence

from oomguard.errors import ExitCode, OomguardError, RunDirError
from oomguard.policy import GpuInfo, Policy, load_all_shipped, select_policy
from oomguard.protocol import RUN_JSON, parse_size
from oomguard.tune.record import ENV_PROBE, PROBE_JSON, ProbeRecord, ProbeSpec, read_probe

__all__ = ["ProbeFailed", "ProbeRun", "policy_for", "run_probe_child"]


class ProbeFailed(OomguardError):
    exit_code = ExitCode.CHILD_FAILED


@dataclasses.dataclass(frozen=True)
class ProbeRun:
    record: ProbeRecord
    policy: Policy
    run_dir: Path
    wall_s: float


def policy_for(gpu: str | None, vram: str | None) -> Policy | None:
    """The shipped policy of a named card (``--gpu NAME``, sized by ``--vram`` when given); None: the
    supervisor's usual choice (this machine's GPU, or the emulated card's size)."""
    if not gpu:
        return None
    shipped = load_all_shipped()
    if vram:
        return select_policy(shipped, GpuInfo(name=gpu, total_gib=parse_size(vram, require_unit=True) / 2**30))
    named = [p for p in shipped if p.match and p.match.name  # no size given: the card's name decides
             and any(re.search(pattern, gpu, re.IGNORECASE) for pattern in p.match.name)]
    return max(named, key=lambda p: (p.match.priority, p.name)) if named else select_policy(shipped, None)


def _one_attempt(policy: Policy) -> Policy:
    return policy.model_copy(update={"limits": policy.limits.model_copy(update={"max_attempts": 1})})


def default_run_dir(kind: str) -> Path:
    return Path("oomguard-runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")


def run_probe_child(command: Sequence[str], *, run_dir: Path, vram: str | None, policy: Policy | None,
                    policy_arg: str | None, probe: ProbeSpec, inject: str | None = None,
                    echo: bool = False) -> ProbeRun:
    """Run the probe child to its end; its ``probe.json`` as a record, or ProbeFailed saying why."""
    from oomguard.supervisor import build_spec, supervise
    from oomguard.supervisor.journal import check_not_in_use, remember_command

    if (run_dir / RUN_JSON).exists():
        raise RunDirError(f"{run_dir} already holds a run; a probe needs a new --run-dir (or none: one is made)")
    check_not_in_use(run_dir)
    remember_command(run_dir, list(command))
    arg = policy.source if policy is not None and policy.source else policy_arg
    spec = build_spec(command, policy_arg=arg, run_dir=run_dir, vram_limit=vram, inject=inject, echo=echo)
    chosen = spec.policy  # the ladder plan/tune ask; the probe child itself gets one attempt
    spec = dataclasses.replace(spec, policy=_one_attempt(chosen))
    started = time.monotonic()
    previous = os.environ.get(ENV_PROBE)
    os.environ[ENV_PROBE] = probe.to_json()  # the child's env starts from ours (supervisor/attempt.py)
    try:
        code = supervise(spec)
    finally:
        if previous is None:
            os.environ.pop(ENV_PROBE, None)
        else:
            os.environ[ENV_PROBE] = previous
    if not (run_dir / PROBE_JSON).is_file():
        raise ProbeFailed(f"the probe child ended (oomguard exit {int(code)}) without writing {run_dir / PROBE_JSON}; "
                          f"its output is in {run_dir}/attempts/001/stderr.log (`oomguard report {run_dir}` tells "
                          "how it ended). The command must build a transformers Trainer and call train().")
    return ProbeRun(record=read_probe(run_dir), policy=chosen, run_dir=run_dir,
                    wall_s=time.monotonic() - started)
