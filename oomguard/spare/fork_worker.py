"""A warm launcher's single-process worker, forked from it instead of started cold (issue 17 item 1).

``accelerate launch train.py`` and ``trl sft …`` (which calls accelerate's launcher) run their one
worker as ``subprocess.Popen([sys.executable, script, *args], env=…)`` from
``accelerate.commands.launch.simple_launcher``, and wait for it. When the launcher itself is a warm
spare (it already holds torch, transformers, peft, trl…), the worker can be a ``fork`` of it that
becomes ``python script args`` the way :mod:`.become` turns the spare into a child: the worker
starts with the imports done instead of paying them again.

Only where that is exactly a fresh worker, checked at the launch (:func:`why_not`); otherwise the
launcher's own ``Popen`` runs, and the worker's start is journaled either way (``worker_start``):

- the command is ``[sys.executable, script | -m module, …]``, the interpreter had no options;
- no Python thread but the main one, and no native thread beyond those the imports started (the
  BLAS pool: OpenBLAS winds it down and back up around a fork with its own ``pthread_atfork``
  handlers), since a thread that holds a lock at the fork leaves it held in the child; nothing called ``cuInit``
  (a forked child cannot use a driver its parent initialised). The launcher's own availability
  check (``torch.cuda.is_available``: ``cudaGetDeviceCount`` → ``cuInit``) is answered from NVML
  for the launcher's life, as torch's ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` does (:mod:`.cuda_view`);
  the worker gets torch's own function back;
- the worker's environment differs from the launcher's only in what the launcher sets and nothing
  reads at import (:data:`RUNTIME_ENV`: ``ACCELERATE_*``, ``MASTER_ADDR``/``PORT``, and
  ``OMP_NUM_THREADS``, which the worker re-applies with ``torch.set_num_threads``, the value a fresh
  interpreter's OpenMP would read; ``KMP_*``, which ``accelerate launch --cpu`` sets for Intel's
  OpenMP, when that library is not loaded: torch's libgomp never reads it).

accelerate's launch module gets a ``subprocess`` whose ``Popen`` (:class:`ForkPopen`) does the fork in
its ``_execute_child``; the launcher's own code around it (``wait``, the return code,
``CalledProcessError``, its traceback) runs as written. The fork child: every writable file
flushed before the fork (no buffer written twice), the
worker's environment (``putenv``), the interpreter's initial signal handlers, ``sys.argv`` /
``orig_argv`` / ``path`` as a fresh ``python script`` has them, torch's CUDA functions back, the
bootstrap's per-process state reset, the script run in a new ``__main__``; it ends as the
interpreter's top level would end it (exit codes, ``SystemExit`` messages, tracebacks,
``KeyboardInterrupt``) through :func:`oomguard.bootstrap.fast_exit.finish` (threads joined, atexit
run, files flushed) and never returns into the launcher's code. The launcher waits for it as
``Popen.wait`` would and handles its return code exactly as accelerate does.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import traceback
import types
from typing import Any, Mapping, Sequence

from oomguard.spare.become import Saved, path0, restore_signals, run_code

__all__ = ["RUNTIME_ENV", "ForkPopen", "arm", "armed", "why_not"]

RUNTIME_ENV = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")  # and every ACCELERATE_*: read at run time
_state: dict[str, Any] = {"saved": None, "view": None, "threads": frozenset()}


def armed() -> bool:
    return _state["saved"] is not None


def arm(saved: Saved) -> None:
    """In a spare that became a launcher: fork its single-process worker where that is safe."""
    from oomguard.bootstrap.imports import when_imported

    _state["saved"] = saved
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        from oomguard.spare.cuda_view import answers, nvml_view

        caps = answers(torch.cuda)
        if isinstance(caps, tuple):
            stack = contextlib.ExitStack()
            stack.enter_context(nvml_view(torch.cuda, caps))
            _state["view"] = stack
    _state["threads"] = _tids()  # the imports' (and NVML's) own native threads, before any launcher code
    when_imported("accelerate.commands.launch", _patch)


def _patch(module: Any) -> None:
    """accelerate's launch module gets a ``subprocess`` of its own whose ``Popen`` forks when it may;
    the rest of its code (the wait, the return code, ``CalledProcessError``) runs unchanged."""
    real = getattr(module, "subprocess", None)
    if real is None or isinstance(real, _Subprocess):
        return
    module.subprocess = _Subprocess(real)


class _Subprocess(types.ModuleType):
    """``subprocess`` as accelerate's launch module sees it: the same module but for :class:`ForkPopen`."""

    def __init__(self, real: types.ModuleType):
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self.Popen = ForkPopen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


_EXECUTE = inspect.signature(subprocess.Popen._execute_child)  # type: ignore[attr-defined]
_DEFAULTS = {"executable": None, "preexec_fn": None, "cwd": None, "shell": False, "p2cread": -1, "c2pwrite": -1,
             "errwrite": -1, "start_new_session": False, "process_group": -1, "gid": None, "gids": None,
             "uid": None, "umask": -1}


class ForkPopen(subprocess.Popen):
    """``Popen`` whose child is a fork of this (warm) process that becomes the worker, where
    :func:`why_not` allows; everything else about the object (wait, poll, signals) is Popen's."""

    def _execute_child(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        call = _EXECUTE.bind(self, *args, **kwargs).arguments
        why = _call_problem(call) or why_not(call["args"], call["env"])
        _journal("fork" if why is None else "exec", why)
        if why is not None:
            return super()._execute_child(*args, **kwargs)  # type: ignore[misc]
        self.pid = _fork(list(call["args"]), dict(call["env"]))
        self._child_created = True
        self._closed_child_pipe_fds = True  # there were none: what _execute_child says when it is done
        return None


def _call_problem(call: Mapping[str, Any]) -> str | None:
    """Why this ``Popen`` call is not a plain ``Popen(cmd, env=...)``: pipes, cwd, a shell, a session..."""
    if not isinstance(call.get("args"), (list, tuple)) or call.get("env") is None:
        return "the worker is not started as Popen(list, env=...)"
    for name, default in _DEFAULTS.items():
        if name in call and call[name] != default and not (name == "process_group" and call[name] is None):
            return f"the worker's Popen sets {name} (a fork repeats only Popen(cmd, env=...))"
    if call.get("pass_fds"):
        return "the worker's Popen passes file descriptors"
    return None


def _journal(start: str, reason: str | None) -> None:
    from oomguard.protocol import ENV_ATTEMPT, ENV_RUN_DIR, Event, emit_event

    run_dir = os.environ.get(ENV_RUN_DIR, "").strip()
    if not run_dir:
        return
    try:
        emit_event(run_dir, Event.WORKER_START, attempt=int(os.environ.get(ENV_ATTEMPT) or 1), start=start,
                   reason=reason or "a fork of the warm launcher, its imports done")
    except (OSError, ValueError):
        pass


def _worker(cmd: Sequence[str]) -> tuple[str, str] | None:
    """(kind, name) of ``[sys.executable, script | -m module, ...]``; None for anything else."""
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1] == "-m":
        return ("module", cmd[2]) if len(cmd) > 2 else None
    if cmd[1].startswith("-"):
        return None
    return "script", cmd[1]


def _tids() -> frozenset[str]:
    try:
        return frozenset(os.listdir("/proc/self/task"))
    except OSError:
        return frozenset()  # unknown: not safe


def _named(tids: frozenset[str]) -> str:
    """The threads' names (``/proc/self/task/TID/comm``), for the journal."""
    names = []
    for tid in sorted(tids):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            names.append(tid)
    return ", ".join(names)


def why_not(cmd: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why the worker cannot be a fork of this launcher (it then starts as the launcher asked)."""
    from oomguard.spare.cuda_view import driver_initialised, library_mapped

    if not armed():
        return "the launcher did not start warm"
    if _worker(cmd) is None:
        python = os.path.basename(sys.executable)
        return f"the worker command is not `{python} SCRIPT|-m MODULE …` ({' '.join(cmd[:3])})"
    if len(sys.orig_argv) > 1 and sys.orig_argv[1].startswith("-") and sys.orig_argv[1] != "-m":
        return f"the launcher's interpreter has options ({sys.orig_argv[1]}) its worker would not"
    if threading.active_count() != 1:
        return f"the launcher runs {threading.active_count()} Python threads (forking threads is unsafe)"
    native, known = _tids(), _state["threads"]
    if not native or not known or native - known:
        return (f"the launcher started native threads after its imports ({_named(native - known) or 'unknown'}; "
                "forking threads is unsafe)")
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None) and \
            (torch.cuda.is_initialized() or driver_initialised()):
        return "the launcher initialised CUDA (a forked worker could not use it)"
    kmp_unread = library_mapped((b"libiomp",)) is False  # KMP_* (accelerate --cpu): Intel OpenMP's, not libgomp's
    changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)
                     and not k.startswith("ACCELERATE_") and k not in RUNTIME_ENV
                     and not (kmp_unread and k.startswith("KMP_")))
    if changed:
        return f"the worker's environment differs in what is read at import ({', '.join(changed[:6])})"
    threads = env.get("OMP_NUM_THREADS", "").strip()
    if threads and not threads.isdigit():
        return f"OMP_NUM_THREADS={threads!r} is not a number a forked worker can apply"
    return None


def _fork(cmd: list[str], env: dict[str, str]) -> int:
    """Fork; the child becomes the worker and never returns; the parent gets its pid."""
    from oomguard.bootstrap.fast_exit import _flush, open_writable_files

    _flush(open_writable_files())  # nothing buffered at the fork: no line written twice
    pid = os.fork()
    if pid == 0:
        _be_worker(cmd, env)  # pragma: no cover - never returns
    return pid


def _be_worker(cmd: list[str], env: dict[str, str]) -> None:
    code = 1
    try:
        code = _run_worker(cmd, env)
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        _flush_std()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # how a fresh interpreter ends on an uncaught Ctrl-C
    except BaseException:  # noqa: BLE001 - the interpreter's top level: the traceback, exit 1
        try:
            sys.excepthook(*sys.exc_info())
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        code = 1
    finally:
        _finish(code)


def _run_worker(cmd: list[str], env: dict[str, str]) -> int:
    saved: Saved = _state["saved"]
    view = _state["view"]
    if view is not None:
        view.close()  # torch's own is_available / get_device_capability for the worker
    os.environ.clear()
    os.environ.update(env)
    restore_signals(saved)
    _reset_bootstrap()
    threads = env.get("OMP_NUM_THREADS", "").strip()
    torch = sys.modules.get("torch")
    if threads.isdigit() and torch is not None and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    kind, name = _worker(cmd)  # type: ignore[misc]
    sys.argv = ["-m", *cmd[3:]] if kind == "module" else list(cmd[1:])
    sys.orig_argv = list(cmd)
    sys.path[:] = [path0(kind, name), *saved.base_path]
    run_code(kind, name)
    return 0


def _reset_bootstrap() -> None:
    """The launcher's bootstrap Context (built from its own process) is not the worker's."""
    injection = sys.modules.get("oomguard.bootstrap.injection")
    if injection is not None:
        injection._context = None
        injection._vram_done = False


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    _flush_std()
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _flush_std() -> None:
    from oomguard.bootstrap.fast_exit import _flush

    _flush((sys.stdout, sys.stderr))


def _finish(code: int) -> None:
    from oomguard.bootstrap.fast_exit import finish

    finish(code)  # threads, atexit, files, os._exit
    os._exit(code & 0xFF)  # finish failed part-way: still never back into the launcher
