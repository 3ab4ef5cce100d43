"""Which launcher a command uses, and the bootstrap delivery that follows from it. Pure but for
reading a script's first lines (to tell a shell script or a Python entry point from a binary).

A Python child gets the bootstrap (``oomguard/bootstrap/site`` first on ``PYTHONPATH``): every
interpreter a launcher spawns inherits it. A non-Python command gets flags and env only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..bootstrap import SITE_DIR
from ..protocol import ENV_BOOTSTRAP, ENV_DELIVERED, EVENT_BOOTSTRAP_TRAINER

_PYTHON_RE = re.compile(r"^(python|pypy)(\d+(\.\d+)?)?$")
_SHELLS = ("sh", "bash", "zsh", "dash", "ksh")
# Words in a shell script that start Python; \b so "mytrl" does not count.
_PY_IN_SCRIPT = re.compile(r"(^|[\s;&|(`/])(python[\d.]*|pypy[\d.]*|accelerate|torchrun|trl|deepspeed)\s")
_NO_SITE_FLAGS = ("-I", "-E", "-S")  # isolated / ignore PYTHON* env / no site: the bootstrap cannot load
OFF_VALUES = ("0", "off", "false", "no")


__all__ = ["GuardDelivery", "Delivery", "LaunchPlan", "LauncherKind", "Launcher", "OFF_VALUES", "PYTHON_LAUNCHERS",
           "RECIPE_MODULE", "bootstrap_env", "bootstrap_outcome", "classify_launcher", "is_builtin_recipe",
           "is_python", "launch_plan"]


class LauncherKind(str, enum.Enum):
    """Which launcher a command starts with (the loop's ``ChildLauncher`` seam is another thing)."""

    PYTHON_SCRIPT = "python_script"  # python train.py
    PYTHON_MODULE = "python_module"  # python -m pkg.train
    ACCELERATE = "accelerate"  # accelerate launch ...
    TORCHRUN = "torchrun"  # torchrun ... / python -m torch.distributed.run
    TRL = "trl"  # trl sft ... (itself an accelerate launcher)
    PYTHON_ENTRY = "python_entry_point"  # any console script whose shebang runs Python
    SHELL_SCRIPT = "shell_script"  # a shell script that calls one of the above
    OTHER = "other"  # not Python as far as oomguard can tell


class GuardDelivery(str, enum.Enum):
    """How the in-child guard and in-process knobs reach the child (``knobs.Delivery`` says how one knob does)."""

    BOOTSTRAP = "bootstrap"  # in-process (bootstrap) plus flags/env
    FLAGS_ENV = "flags_env"  # flags in the command, OOMGUARD_KNOBS, stderr classification
    DISABLED = "disabled"  # OOMGUARD_BOOTSTRAP=0


Launcher, Delivery = LauncherKind, GuardDelivery  # the former names

PYTHON_LAUNCHERS = frozenset(set(LauncherKind) - {LauncherKind.OTHER})


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    launcher: LauncherKind
    delivery: GuardDelivery
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"launcher": self.launcher.value, "delivery": self.delivery.value, "reason": self.reason}


def _skip_env_prefix(argv: Sequence[str]) -> list[str]:
    """``env A=1 B=2 cmd ...`` -> ``cmd ...``."""
    out = list(argv)
    if out and os.path.basename(out[0]) == "env":
        out = out[1:]
        while out and ("=" in out[0] or out[0].startswith("-")):
            out = out[1:]
    return out


def _shebang(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return ""
    return head.split(b"\n", 1)[0].decode("utf-8", "replace") if head.startswith(b"#!") else ""


def _script_text(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace")[:100_000] if path else ""
    except OSError:
        return ""


def is_python(arg0: str) -> bool:
    """Whether ``arg0`` names a Python interpreter (``python``, ``python3.11``, ``pypy3``; a path or not)."""
    return bool(_PYTHON_RE.match(os.path.basename(arg0)))


def classify_launcher(argv: Sequence[str], path: str | None = None) -> LauncherKind:
    """The launcher of ``argv``; ``path`` is the PATH used to resolve the executable."""
    args = _skip_env_prefix(argv)
    if not args:
        return LauncherKind.OTHER
    name = os.path.basename(args[0])
    if is_python(name):
        return _python_kind(args[1:])
    if name in ("accelerate", "torchrun", "trl"):
        return {"accelerate": LauncherKind.ACCELERATE, "torchrun": LauncherKind.TORCHRUN, "trl": LauncherKind.TRL}[name]
    if name in _SHELLS:
        script = next((a for a in args[1:] if not a.startswith("-")), None)
        return _shell_kind(_script_text(script)) if "-c" not in args[1:2] else _shell_kind(" ".join(args[2:3]) + " ")
    exe = args[0] if os.sep in args[0] else shutil.which(args[0], path=path)
    line = _shebang(exe)
    if "python" in line or "pypy" in line:
        return LauncherKind.PYTHON_ENTRY
    if any(sh in line for sh in _SHELLS):
        return _shell_kind(_script_text(exe))
    return LauncherKind.OTHER


def _python_kind(rest: Sequence[str]) -> LauncherKind:
    for i, arg in enumerate(rest):
        if arg == "-m" and i + 1 < len(rest):
            return LauncherKind.TORCHRUN if rest[i + 1] == "torch.distributed.run" else \
                LauncherKind.ACCELERATE if rest[i + 1].startswith("accelerate.commands") else \
                LauncherKind.TRL if rest[i + 1].startswith("trl.cli") else LauncherKind.PYTHON_MODULE
        if arg.startswith("-m") and len(arg) > 2:
            return LauncherKind.PYTHON_MODULE
        if not arg.startswith("-"):
            return LauncherKind.PYTHON_SCRIPT
    return LauncherKind.PYTHON_SCRIPT  # python -c ... or bare python: still a Python interpreter


RECIPE_MODULE = "oomguard.recipes.sft"


def is_builtin_recipe(argv: Sequence[str]) -> bool:
    """``python -m oomguard.recipes.sft ...`` or ``oomguard train ...``: oomguard's own recipe,
    whose defaults are the policy's knobs."""
    args = _skip_env_prefix(argv)
    if len(args) >= 2 and os.path.basename(args[0]) == "oomguard" and args[1] == "train":
        return True
    pairs = list(zip(args, args[1:], [*args[2:], ""]))
    return any(a == "-m" and (b == RECIPE_MODULE or (b == "oomguard" and c == "train")) for a, b, c in pairs)


def _shell_kind(text: str) -> LauncherKind:
    return LauncherKind.SHELL_SCRIPT if _PY_IN_SCRIPT.search(text) else LauncherKind.OTHER


def _no_site_flag(argv: Sequence[str]) -> str | None:
    args = _skip_env_prefix(argv)
    if not args or not is_python(args[0]):
        return None
    for arg in args[1:]:
        if not arg.startswith("-") or arg in ("-m", "-c"):
            return None
        for flag in _NO_SITE_FLAGS:
            if arg == flag or (len(arg) > 2 and not arg.startswith("--") and flag[1] in arg[1:]):
                return flag
    return None


def launch_plan(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> LaunchPlan:
    """How knobs and the guard reach the child of ``argv`` under ``env``."""
    launcher = classify_launcher(argv, env.get("PATH"))
    if env.get(ENV_BOOTSTRAP, "").strip().lower() in OFF_VALUES:
        return LaunchPlan(launcher, GuardDelivery.DISABLED, f"{ENV_BOOTSTRAP}={env[ENV_BOOTSTRAP]}: flags and env only")
    if launcher not in PYTHON_LAUNCHERS:
        return LaunchPlan(launcher, GuardDelivery.FLAGS_ENV, "not a Python command: flags and env only")
    flag = _no_site_flag(argv)
    if flag:
        return LaunchPlan(launcher, GuardDelivery.FLAGS_ENV,
                          f"python {flag} ignores PYTHONPATH or site: flags and env only; drop {flag} for the "
                          "in-process guard")
    return LaunchPlan(launcher, GuardDelivery.BOOTSTRAP, f"{launcher.value}: bootstrap on PYTHONPATH")


def bootstrap_env(env: Mapping[str, str], argv: Sequence[str],
                  delivered: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` for the child of ``argv``: the bootstrap first on PYTHONPATH for a Python child.

    ``delivered`` (knob -> how the command carried it) lets the child journal which path
    delivered each knob.
    """
    out = dict(env)
    if launch_plan(argv, env).delivery != GuardDelivery.BOOTSTRAP:
        return out
    site = str(SITE_DIR)
    parts = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != site]
    out["PYTHONPATH"] = os.pathsep.join([site, *parts])
    if delivered is not None:
        out[ENV_DELIVERED] = json.dumps(dict(delivered))
    return out


def bootstrap_outcome(plan_delivery: str, events: Iterable[Mapping[str, Any]], since: float) -> str:
    """What the bootstrap did in an attempt that started at ``since`` (an ``attempt_ended`` field).

    ``in_process``: a Trainer was patched; ``fallback``: a Python child that never built a
    Trainer (knobs by flags/env, failures from exit code and stderr); else the plan's delivery.
    """
    if plan_delivery != GuardDelivery.BOOTSTRAP.value:
        return plan_delivery
    seen = any(e.get("event") == EVENT_BOOTSTRAP_TRAINER and e.get("time", 0) >= since for e in events)
    return "in_process" if seen else "fallback"
