"""The warm spare (issue 17): one interpreter that has done the heavy imports, kept while an attempt
trains, that becomes the next attempt's child. Supervisor side; the spare's own side is
``oomguard/spare/``. On by default (:func:`default_on`; ``--no-warm-spare`` or ``OOMGUARD_WARM_SPARE=0``
turns it off).

- **Which commands** (:func:`warm_target`): ``python script.py``, ``python -m pkg``, Python console
  scripts, and the ``accelerate``/``trl`` launchers, whose single-process worker then is a fork the
  warm launcher made before its own code ran (``spare/fork_worker.py``). torchrun, deepspeed, shells
  and ``python -c`` start cold.
- **When**: during attempt N, once its heartbeat moved (it trains) or :data:`START_AFTER_S` after
  its launch, and only if its process has torch loaded (``/proc/PID/maps``; a script of the
  standard library alone is not even looked at); never during attempt 1's own start-up. Attempt 1
  is always the user's command as a plain fresh process; a spare only ever serves attempts >= 2.
- **What**: ``<the command's interpreter and options> -m oomguard.spare``, started through
  ``process.start_spare`` (own session, parent-death signal) with attempt N's environment less
  every ``OOMGUARD_*`` variable: the bootstrap installs nothing until the attempt's environment is
  in place, and the stray scan (``tree.run_processes``) never takes it for a child of the run. It
  holds host memory only (the stack's modules: about 1 GiB for torch + transformers + trl + peft
  + datasets; ``child_start`` journals its RSS), no CUDA context (a module whose import initialises
  CUDA ends it; the next spare leaves that module out).
- **Handing over** (:meth:`Spares.take`): the command must be one a fresh ``python`` would start
  the same way (:func:`warm_target`), the spare alive and ready (waited for up to
  :data:`READY_TIMEOUT_S` after its start: it was importing while the supervisor waited), and the
  environment the stack reads at import time — everything but ``OOMGUARD_*`` and the trackers'
  run ids — unchanged. Then its start-up output goes into the attempt's logs, the orders (argv,
  env, cwd, log paths) down its pipe, and its ``Popen`` is the attempt's child: the same watch,
  tree, group kill, heartbeat and orphan record as a fresh one. Otherwise a cold start. Every
  attempt >= 2 journals which it was and why (``child_start``).
- **End**: the spare is killed when an attempt succeeds or is interrupted, at :func:`close_all`
  (atexit), and by its parent-death signal / the EOF on its orders pipe if the supervisor dies.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil

from ..bootstrap.injection import LAUNCHER_NAMES
from ..protocol import ENV_ATTEMPT, ENV_RUN_DIR, Event, emit_event
from ..spare import write_all  # stdlib only
from ..spare.cuda_view import library_mapped  # stdlib only
from ..spare.preload import stdlib_only  # stdlib only: the spare's own rule for "nothing to preload"
from .launch import LauncherKind, classify_launcher, is_python
from .process import StopFlag, start_spare
from .trackers import TRACKER_ENV

__all__ = ["ENV_WARM_SPARE", "READY_TIMEOUT_S", "START_AFTER_S", "Spare", "Spares", "Target", "close_all", "default_on",
           "import_env", "runs_torch", "spares_for", "warm_target"]

ENV_WARM_SPARE = "OOMGUARD_WARM_SPARE"  # "0"/"off"/"false"/"no": the default is off (--warm-spare still turns it on)
START_AFTER_S = 20.0  # a spare is started this long after the launch even before a heartbeat moved
READY_TIMEOUT_S = 120.0  # after its start, a spare not ready by then is a cold start
MIN_HOST_AVAILABLE = 3 << 30  # bytes of available host memory below which no spare is started
MAX_DEATHS = 2  # spares that died before use; then this run starts cold
SPARE_DIR = "spare"  # in the run dir: the spare's own stdout/stderr until it is handed an attempt
_SIMPLE_OPTS = set("bBdOqsuv")  # python options without an argument that a warm start can repeat
_ARG_OPTS = ("-W", "-X")
_VOLATILE = {name for pairs in TRACKER_ENV.values() for name, _ in pairs}  # set from attempt 2 on, read later


@dataclasses.dataclass(frozen=True)
class Target:
    """How a fresh process would run the command: the interpreter (with the command's options),
    ``kind`` script/module and its ``name``, and the ``sys.argv`` / ``sys.orig_argv`` it would see."""

    interpreter: tuple[str, ...]
    kind: str
    name: str
    argv: tuple[str, ...]
    orig_argv: tuple[str, ...]
    launcher: str | None = None  # accelerate / trl: its single-process worker is pre-forked (spare/fork_worker.py)
    also: tuple[tuple[str, str], ...] = ()  # what else it preloads: ("script", the worker path) or ("default", "")

    def same_start(self, other: "Target") -> bool:
        return (self.interpreter, self.kind, self.name) == (other.interpreter, other.kind, other.name)


def default_on(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a run without --warm-spare/--no-warm-spare keeps a spare: yes, unless OOMGUARD_WARM_SPARE says no."""
    return environ.get(ENV_WARM_SPARE, "").strip().lower() not in ("0", "off", "false", "no")


def import_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` a spare is started with (and that must not change before it is used)."""
    return {k: v for k, v in env.items() if not k.startswith("OOMGUARD_") and k not in _VOLATILE}


def _options(args: Sequence[str]) -> tuple[list[str], int] | str:
    """The interpreter options before the script / ``-m`` (and where they end), or why not warm."""
    opts, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "-m" or not a.startswith("-") or (a.startswith("-m") and len(a) > 2):
            return opts, i
        if a in _ARG_OPTS:
            if i + 1 >= len(args):
                return f"python option {a} without its value"
            opts += [a, args[i + 1]]
            i += 2
            continue
        if a.startswith(_ARG_OPTS) or (len(a) > 1 and set(a[1:]) <= _SIMPLE_OPTS):
            opts.append(a)
            i += 1
            continue
        return f"python option {a} (a warm start repeats only -b -B -d -O -q -s -u -v -W -X)"
    return "no script or module to run"


def _script_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{path} is not a file"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if head.startswith(b"PK") or path.endswith((".pyc", ".pyo")):
        return f"{path} is a zip or compiled file"
    return None


def _python_target(argv: Sequence[str]) -> Target | str:
    parsed = _options(argv[1:])
    if isinstance(parsed, str):
        return parsed
    opts, i = parsed
    rest = list(argv[1 + i:])
    interpreter = (argv[0], *opts)
    if rest[0] == "-m" or rest[0].startswith("-m"):
        module, args = (rest[1], rest[2:]) if rest[0] == "-m" else (rest[0][2:], rest[1:])
        return Target(interpreter, "module", module, ("-m", *args), tuple(argv))
    problem = _script_problem(rest[0])
    if problem:
        return problem
    return Target(interpreter, "script", rest[0], tuple(rest), tuple(argv))


def _entry_target(argv: Sequence[str], env: Mapping[str, str]) -> Target | str:
    """A console script: the kernel runs ``#!interp [arg] /path/to/script args``; so do we, warm."""
    exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if not exe:
        return f"{argv[0]} is not on PATH"
    with open(exe, "rb") as f:
        line = f.read(512).split(b"\n", 1)[0][2:].decode(errors="replace").strip()
    words = line.split(None, 1)
    interp, arg = words[0], (words[1].strip() if len(words) > 1 else "")
    if os.path.basename(interp) == "env":
        if not arg or " " in arg or arg.startswith("-"):
            return f"its #! line ({line}) passes options to env"
        return Target((interp, arg), "script", exe, (exe, *argv[1:]), (arg, exe, *argv[1:]))
    if arg and (" " in arg or isinstance(_options([arg, "x"]), str)):
        return f"its #! line ({line}) has an option a warm start cannot repeat"
    head = (interp, arg) if arg else (interp,)
    problem = _script_problem(exe)
    return problem or Target(head, "script", exe, (exe, *argv[1:]), (*head, exe, *argv[1:]))


def warm_target(argv: Sequence[str], env: Mapping[str, str]) -> Target | str:
    """How the spare would run ``argv``, or why it cannot or need not (then the attempt is a cold start)."""
    target = _target(argv, env)
    if isinstance(target, Target) and target.kind == "script" and _stdlib_script(target.name):
        return "the script imports the standard library only: a spare would save nothing"
    return target


def _stdlib_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return stdlib_only(f.read().decode("utf-8", "replace"))
    except OSError:
        return False


def _target(argv: Sequence[str], env: Mapping[str, str]) -> Target | str:
    if not argv:
        return "no command"
    if os.path.basename(argv[0]) == "env":
        return "the command starts with `env` (it changes the environment the interpreter starts with)"
    launcher = classify_launcher(argv, env.get("PATH"))
    if launcher in (LauncherKind.ACCELERATE, LauncherKind.TRL):
        target = _python_target(argv) if is_python(argv[0]) else _entry_target(argv, env)
        if isinstance(target, str):
            return target
        return dataclasses.replace(target, launcher=launcher.value, also=_worker_preload(launcher, argv))
    if launcher is LauncherKind.TORCHRUN or os.path.basename(argv[0]) in LAUNCHER_NAMES:
        return (f"{launcher.value if launcher is LauncherKind.TORCHRUN else os.path.basename(argv[0])} starts its "
                "workers through an agent of its own (only accelerate's and trl's single-process launch run warm)")
    if launcher in (LauncherKind.PYTHON_SCRIPT, LauncherKind.PYTHON_MODULE):
        return _python_target(argv)
    if launcher is LauncherKind.PYTHON_ENTRY:
        return _entry_target(argv, env)
    return f"a {launcher.value} command is not one Python process (only python script / -m / console scripts)"


def _worker_preload(launcher: LauncherKind, argv: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """What the launcher's worker will import, for the spare to preload: ``accelerate launch``'s training
    script (the first existing ``.py`` argument after ``launch``), else the default stack (trl's own
    scripts import it). A guess only decides what is preloaded, never what runs."""
    if launcher is LauncherKind.ACCELERATE and "launch" in argv:
        for arg in argv[list(argv).index("launch") + 1:]:
            if arg.endswith(".py") and os.path.isfile(arg):
                return (("script", os.path.abspath(arg)),)
    return (("default", ""),)


class Spare:
    """One started spare: its process, pipes, what it was started for and what it said."""

    def __init__(self, target: Target, env: dict[str, str], log_dir: Path, drop: Sequence[str]):
        self.target, self.env, self.log_dir = target, env, log_dir
        self.started = time.monotonic()
        self.report: dict[str, Any] | None = None
        self.checked_for: Sequence[str] | None = None
        self._buffer = b""
        log_dir.mkdir(parents=True, exist_ok=True)
        orders_r, self.orders_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        plan = json.dumps({"kind": target.kind, "name": target.name, "drop": sorted(drop),
                           "also": [list(pair) for pair in target.also]})
        argv = [*target.interpreter, "-m", "oomguard.spare", plan, str(orders_r), str(ready_w)]
        with (log_dir / "stdout.log").open("wb") as out, (log_dir / "stderr.log").open("wb") as err:
            started = start_spare(argv, env, out, err, (orders_r, ready_w))
        os.close(orders_r)
        os.close(ready_w)
        os.set_blocking(self.ready_r, False)
        self.popen: subprocess.Popen | None = started if isinstance(started, subprocess.Popen) else None
        self.spawn_error = None if self.popen else f"could not start: {started}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def poll_ready(self, timeout_s: float = 0.0) -> bool:
        """True once the spare said it is ready (its report is read); waits up to ``timeout_s``."""
        if self.report is not None or self.ready_r < 0:
            return bool(self.report and self.report.get("ready"))
        if select.select([self.ready_r], [], [], max(0.0, timeout_s))[0]:
            try:
                chunk = os.read(self.ready_r, 1 << 16)
            except BlockingIOError:
                return False
            self._buffer += chunk
            if chunk and not self._buffer.endswith(b"\n"):
                return False
            try:
                self.report = json.loads(self._buffer) if self._buffer.strip() else {"ready": False}
            except ValueError:
                self.report = {"ready": False}
            os.close(self.ready_r)
            self.ready_r = -1
        return bool(self.report and self.report.get("ready"))

    def why_dead(self) -> str:
        code = self.popen.poll() if self.popen else None
        tail = _last_line(self.log_dir / "stderr.log")
        return f"the spare ended (exit code {code})" + (f": {tail}" if tail else "")

    def hand_over(self, orders: Mapping[str, Any], out_path: Path, err_path: Path) -> bool:
        """The spare's start-up output into the attempt's logs, then the orders; False if it is gone."""
        for name, path in (("stdout.log", out_path), ("stderr.log", err_path)):
            data = (self.log_dir / name).read_bytes() if (self.log_dir / name).exists() else b""
            if data:
                with path.open("ab") as f:
                    f.write(data)
        try:
            write_all(self.orders_w, json.dumps(dict(orders)).encode())
        except OSError:
            return False
        finally:
            os.close(self.orders_w)
            self.orders_w = -1
        return True

    def kill(self) -> None:
        """SIGKILL its group (it is a session leader) and reap it; its pipes closed."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for fd in (self.orders_w, self.ready_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.orders_w = self.ready_r = -1


def runs_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's library mapped (``/proc/PID/maps``); True when unreadable
    (no /proc: assume it does). A command that never loads torch gains nothing from a spare."""
    mapped = library_mapped((b"libtorch", b"libc10"), pid)
    return True if mapped is None else mapped


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class Spares:
    """A run's spare keeper: at most one spare at a time, for the run in ``run_dir``."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.current: Spare | None = None
        self.why_none: str | None = None  # why there is no spare (said at the next take)
        self.drop: set[str] = set()  # modules that initialised CUDA on import
        self.deaths = 0
        self._skipped: Sequence[str] | None = None  # the attempt (its argv) that needs no spare
        self.warm_now = False  # the running attempt started warm
        self.distrust: str | None = None  # a warm attempt failed before its first step: cold from now on

    # while an attempt runs ------------------------------------------------------------------
    def tick(self, argv: Sequence[str], env: Mapping[str, str], elapsed_s: float, beat_moved: bool,
             pid: int | None = None) -> None:
        """Once per poll of the running attempt: start the next attempt's spare when it is time (its
        heartbeat moved, or START_AFTER_S passed) and the attempt's process runs torch."""
        if not self.enabled or self.distrust or not (beat_moved or elapsed_s >= START_AFTER_S) or self._skipped is argv:
            return
        if self.current is None and pid is not None and not runs_torch(pid):
            self._skipped = argv  # not again this attempt
            self.why_none = "the last attempt's process had not loaded torch: a spare would save nothing"
            return
        spare = self.current
        if spare is not None and not spare.alive() and spare.popen is not None:
            self._buried(spare)
            spare = None
        if spare is not None and spare.checked_for is not argv:
            spare.checked_for = argv  # once per attempt (argv is that attempt's list)
            target = warm_target(argv, env)
            if isinstance(target, Target) and target.same_start(spare.target) and spare.env == import_env(env):
                return
            spare.kill()  # started for another command or environment
            self.current = None
        self.prepare(argv, env)

    def _buried(self, spare: Spare) -> None:
        spare.poll_ready()
        cuda = (spare.report or {}).get("cuda")
        if cuda:
            self.drop.add(cuda)
        self.deaths += 1
        self.why_none = (f"the spare stopped: importing {cuda} initialised CUDA" if cuda else spare.why_dead())
        spare.kill()
        self.current = None

    def prepare(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        if self.current is not None or self.deaths >= MAX_DEATHS or self.distrust or not self.enabled:
            return
        target = warm_target(argv, env)
        if isinstance(target, str):
            self.why_none = target
            return
        available = psutil.virtual_memory().available
        if available < MIN_HOST_AVAILABLE:
            self.why_none = f"host memory low ({available / 2**30:.1f} GiB available): no spare started"
            return
        spare = Spare(target, import_env(env), self.run_dir / SPARE_DIR, sorted(self.drop))
        if spare.popen is None:
            self.deaths = MAX_DEATHS
            self.why_none = spare.spawn_error
            return
        self.current, self.why_none = spare, None

    def ended(self, returncode: int | None, beat_moved: bool) -> None:
        """The running attempt ended. One that started warm and failed before its heartbeat ever moved
        might have failed because it started warm: every later attempt starts cold (journaled)."""
        if self.warm_now and returncode != 0 and not beat_moved:
            self.distrust = (f"an attempt that started warm failed before its first step (exit code {returncode}); "
                             "the rest of the run starts cold")
            self.close()
        self.warm_now = False

    # at the next attempt's start -------------------------------------------------------------
    def take(self, argv: Sequence[str], env: Mapping[str, str], out_path: Path, err_path: Path,
             stop: StopFlag) -> subprocess.Popen | None:
        """The spare as this attempt's child (orders sent), or None: start it cold. Journaled from attempt 2."""
        attempt = int(env.get(ENV_ATTEMPT) or 1)
        if attempt < 2:
            return None
        t0 = time.monotonic()
        got, reason, spare = self._take(argv, env, out_path, err_path, stop)
        self.warm_now = got is not None
        fields: dict[str, Any] = {"waited_s": round(time.monotonic() - t0, 2)}
        if spare is not None:
            report = spare.report or {}
            fields.update(spare_pid=spare.pid, spare_rss=report.get("rss"), preloaded=list(report.get("imported", [])),
                          spare_ready_s=round(float(report.get("seconds", 0.0)), 2))
        run_dir = env.get(ENV_RUN_DIR) or str(self.run_dir)
        emit_event(run_dir, Event.CHILD_START, source="supervisor", attempt=attempt,
                   start="warm" if got else "cold", reason=reason, **fields)
        return got

    def _take(self, argv: Sequence[str], env: Mapping[str, str], out_path: Path, err_path: Path,
              stop: StopFlag) -> tuple[subprocess.Popen | None, str | None, Spare | None]:
        if not self.enabled:
            return None, "cold start: the warm spare is off (--no-warm-spare or OOMGUARD_WARM_SPARE=0)", None
        if self.distrust:
            return None, f"cold start: {self.distrust}", None
        target = warm_target(argv, env)
        if isinstance(target, str):
            self.close()
            return None, f"cold start: {target}", None
        spare, self.current = self.current, None
        if spare is None:
            why = self.why_none or "the last attempt ended before one was started"
            return None, f"cold start: no spare ({why})", None
        why = self._unusable(spare, target, env, stop)
        if why is not None:
            if spare.popen is not None and spare.popen.poll() is not None:
                self._buried(spare)
            spare.kill()
            return None, f"cold start: {why}", None
        orders = {"argv": list(target.argv), "orig_argv": list(target.orig_argv), "env": dict(env),
                  "cwd": os.getcwd(), "stdout": str(out_path.absolute()), "stderr": str(err_path.absolute()),
                  "fork_worker": target.launcher is not None}
        if not spare.hand_over(orders, out_path, err_path):
            spare.kill()
            return None, "cold start: the spare was gone when handed the attempt", None
        if target.launcher is not None:
            return spare.popen, (f"warm start: the spare's interpreter runs the {target.launcher} launcher; a "
                                 "single-process worker forks from it (worker_start says)"), spare
        return spare.popen, "warm start: the spare's interpreter runs the attempt", spare

    def _unusable(self, spare: Spare, target: Target, env: Mapping[str, str], stop: StopFlag) -> str | None:
        if not target.same_start(spare.target):
            return "the command now starts another interpreter or script than the spare was started for"
        changed = sorted(k for k in set(spare.env) | set(import_env(env))
                         if spare.env.get(k) != env.get(k))
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            return f"the environment read at import time changed ({shown})"
        while not spare.poll_ready(0.1):
            if not spare.alive() or (spare.report is not None and not spare.report.get("ready")):
                spare.poll_ready()
                cuda = (spare.report or {}).get("cuda")
                return f"the spare stopped: importing {cuda} initialised CUDA" if cuda else spare.why_dead()
            if time.monotonic() - spare.started > READY_TIMEOUT_S:
                return f"the spare was not ready {READY_TIMEOUT_S:g} s after its start"
            if stop.is_set:
                return "a stop signal came while the spare was still importing"
        return None

    def close(self) -> None:
        if self.current is not None:
            self.current.kill()
            self.current = None


_KEEPERS: dict[str, Spares] = {}


def spares_for(run_dir: Path, enabled: bool) -> Spares:
    """The keeper of ``run_dir``'s spare (one per run, kept across attempts)."""
    key = str(Path(run_dir).absolute())
    keeper = _KEEPERS.get(key)
    if keeper is None or keeper.enabled != enabled:
        if keeper is not None:
            keeper.close()
        keeper = _KEEPERS[key] = Spares(Path(run_dir), enabled)
    return keeper


def close_all() -> None:
    """Kill every spare of this process (the runs are over)."""
    for keeper in list(_KEEPERS.values()):
        keeper.close()
    _KEEPERS.clear()


atexit.register(close_all)
