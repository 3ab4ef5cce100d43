"""A warm launcher's single-process worker, forked from the spare instead of started cold (issue 17 item 1).

``accelerate launch train.py`` and ``trl sft …`` (which calls accelerate's launcher) run their one
worker as ``subprocess.Popen([sys.executable, script, *args], env=…)`` from
``accelerate.commands.launch.simple_launcher`` (accelerate >= 1.16: ``psutil.Popen(…, stderr=PIPE)``,
whose stderr the launcher tees), and wait for it. When the launcher itself is a warm
spare (it already holds torch, transformers, peft, trl…), the worker can start with those imports done:

- **The pre-forked worker.** :func:`arm` runs as the spare becomes the launcher, before any launcher
  code: it forks once, there and then. The fork child (the *pre-worker*) waits on a pipe; it is the
  spare's state right after its imports (the state a warm child starts from), with nothing of the
  launcher's own code in it: no CUDA context (``trl sft`` parses its ``SFTConfig`` in the launcher,
  which initialises CUDA through accelerate's ``PartialState``: a fork *at the launch* would copy a
  driver the child cannot use), no launcher threads, none of the launcher's module state. The fork
  is made only where the spare is single-threaded in Python and nothing has called ``cuInit``.
- **At the launch** accelerate's launch module gets a ``subprocess`` and a ``psutil`` whose ``Popen``
  (:class:`ForkPopen`) hands the worker's command, environment and working directory to the pre-worker, which becomes
  ``python script args`` the way :mod:`.become` turns the spare into a child; its pid is the Popen's.
  It is the launcher's own child, so the launcher's code around it (``wait``, the return code,
  ``CalledProcessError``, its traceback) runs as written. Where :func:`why_not` finds the hand-over
  is not exactly a fresh worker, the launcher's own ``Popen`` runs; the worker's start is journaled
  either way (``worker_start``). The conditions:

  - the command is ``[sys.executable, script | -m module, …]``, the interpreter had no options, the
    ``Popen`` sets nothing but the command, ``env`` and a piped stderr (no other pipe or redirection, no
    cwd, session, fds); the pre-worker holds the write end of a pipe made at the fork, which becomes its
    stderr, and Popen reads the other end through the descriptor it made for it;
  - the worker's environment differs from the one the pre-worker's imports saw only in what the
    launcher sets and nothing reads at import (:data:`RUNTIME_ENV`: ``ACCELERATE_*``,
    ``MASTER_ADDR``/``PORT``, and ``OMP_NUM_THREADS``, which the worker re-applies with
    ``torch.set_num_threads``, the value a fresh interpreter's OpenMP would read; ``KMP_*``, which
    ``accelerate launch --cpu`` sets for Intel's OpenMP, when that library is not loaded: torch's
    libgomp never reads it);
  - the launcher's stdin, stdout and stderr are still the files they were at the fork.

The pre-worker, once told: the launcher's working directory of the moment, the worker's environment
(``putenv``), the interpreter's initial signal handlers, ``sys.argv`` / ``orig_argv`` / ``path`` as a
fresh ``python script`` has them, the bootstrap's per-process state reset, the script run in a new
``__main__``; it ends as the interpreter's top level would end it (exit codes, ``SystemExit``
messages, tracebacks, ``KeyboardInterrupt``) through :func:`oomguard.bootstrap.fast_exit.finish`
(threads joined, atexit run, files flushed). Never told (the launcher ran torchrun's agent, a second
worker, or died): it sees the pipe close and exits 0 at once, without a word; a signal while it waits
ends it the same way.
"""

from __future__ import annotations

import atexit
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
import types
from typing import Any, Mapping, Sequence

from oomguard.spare import read_all, write_all
from oomguard.spare.become import Saved, path0, restore_signals, run_code

__all__ = ["RUNTIME_ENV", "ForkPopen", "arm", "armed", "why_not"]

RUNTIME_ENV = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")  # and every ACCELERATE_*: read at run time
# saved: the spare's start state; pre: the pre-worker (pid, fd, what its imports saw); why: none and why
_state: dict[str, Any] = {"saved": None, "pre": None, "why": None}


def armed() -> bool:
    return _state["saved"] is not None


def arm(saved: Saved) -> None:
    """In a spare that becomes a launcher, before the launcher's code: fork the pre-worker where that
    is safe, and route accelerate's worker ``Popen`` to it."""
    from oomguard.bootstrap.imports import when_imported

    _state["saved"], _state["pre"] = saved, None
    _state["why"] = _fork_problem()
    if _state["why"] is None:
        _state["pre"] = _fork_pre_worker()
    when_imported("accelerate.commands.launch", _patch)


def _fork_problem() -> str | None:
    """Why the spare cannot fork its pre-worker now (threads, an initialised CUDA driver), or None."""
    from oomguard.spare.cuda_view import driver_initialised

    if threading.active_count() != 1:
        return f"the spare runs {threading.active_count()} Python threads (forking threads is unsafe)"
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None) and \
            (torch.cuda.is_initialized() or driver_initialised()):
        return "the spare initialised CUDA (a forked worker could not use it)"
    return None


def _stdio() -> tuple[tuple[int, int] | None, ...]:
    """(device, inode) of fds 0-2: which files the worker would inherit."""
    out = []
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
            out.append((st.st_dev, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def _fork_pre_worker() -> dict[str, Any]:
    from oomguard.bootstrap.fast_exit import _flush, open_writable_files
    from oomguard.spare.cuda_view import library_mapped

    _flush(open_writable_files())  # nothing buffered at the fork: no line written twice
    read_fd, write_fd = os.pipe()
    err_read, err_write = os.pipe()  # the worker's stderr where the launcher reads it (accelerate >= 1.16)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the pre-worker: becomes the worker or exits, never returns
        os.close(write_fd)
        os.close(err_read)
        _await_orders(read_fd, err_write)
    os.close(read_fd)
    os.close(err_write)
    pre = {"pid": pid, "fd": write_fd, "err": err_read, "environ": dict(os.environ), "stdio": _stdio(),
           "kmp_unread": library_mapped((b"libiomp",)) is False}  # KMP_* (accelerate --cpu): Intel OpenMP's
    atexit.register(_release, pre)
    return pre


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _release(pre: dict[str, Any]) -> None:
    """At the launcher's exit, a pre-worker never told: close its pipe (it exits) and reap it."""
    if _state["pre"] is not pre:
        return
    _state["pre"] = None
    _close(pre["fd"], pre["err"])
    _reap(pre["pid"])


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except OSError:
        pass


def _await_orders(fd: int, err_write: int) -> None:  # pragma: no cover - runs in the pre-worker
    try:
        raw = read_all(fd)  # the spare's orders protocol: JSON, then the launcher closes the pipe
        os.close(fd)
        orders = json.loads(raw) if raw.strip() else None
    except BaseException:  # noqa: BLE001 - a signal, or orders cut short by a launcher that died: go quietly
        os._exit(0)
    if orders is None:  # the pipe closed without orders: no worker to be
        os._exit(0)
    if orders.get("stderr_pipe"):
        os.dup2(err_write, 2)  # Popen(stderr=PIPE): the launcher reads (and tees) it
    os.close(err_write)
    try:
        os.chdir(orders["cwd"])
    except OSError:
        pass
    _be_worker(list(orders["cmd"]), dict(orders["env"]))


def _patch(module: Any) -> None:
    """accelerate's launch module gets a ``subprocess`` (accelerate <= 1.15: ``subprocess.Popen``) and a
    ``psutil`` (>= 1.16: ``psutil.Popen(cmd, env=…, stderr=PIPE)``) of its own whose ``Popen`` uses the
    pre-worker when it may; the rest of its code (the wait, the stderr tee, the return code,
    ``CalledProcessError``, the process-tree kill on SIGTERM) runs unchanged."""
    real = getattr(module, "subprocess", None)
    if real is not None and not isinstance(real, _Shim):
        module.subprocess = _Shim(real, ForkPopen)
    real = getattr(module, "psutil", None)
    if real is not None and not isinstance(real, _Shim):
        module.psutil = _Shim(real, _psutil_popen(real))


class _Shim(types.ModuleType):
    """A module as accelerate's launch module sees it: the same module but for its ``Popen``."""

    def __init__(self, real: types.ModuleType, popen: Any):
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self.Popen = popen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _psutil_popen(psutil: types.ModuleType) -> Any:
    """``psutil.Popen`` whose ``subprocess.Popen`` is :class:`ForkPopen`. psutil's ``Popen.__init__`` is two
    lines (``self.__subproc = subprocess.Popen(…)``, ``self._init(pid, _ignore_nsp=True)``); where it is not
    that any more, the real one runs and the worker starts as the launcher asked, journaled."""
    real = psutil.Popen
    names = getattr(getattr(real.__init__, "__code__", None), "co_names", ())
    if not ("_Popen__subproc" in names and "_init" in names and hasattr(real, "_init")):
        def popen(*args: Any, **kwargs: Any) -> Any:
            _journal("exec", f"psutil {getattr(psutil, '__version__', '?')}'s Popen is not the one a fork can "
                             "stand in for")
            return real(*args, **kwargs)
        return popen

    class ForkPsutilPopen(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):  # noqa: D107 - psutil's own two lines, with ForkPopen
            self._Popen__subproc = ForkPopen(*args, **kwargs)
            self._init(self._Popen__subproc.pid, _ignore_nsp=True)

    ForkPsutilPopen.__name__ = ForkPsutilPopen.__qualname__ = "Popen"
    return ForkPsutilPopen


_EXECUTE = inspect.signature(subprocess.Popen._execute_child)  # type: ignore[attr-defined]
_DEFAULTS = {"executable": None, "preexec_fn": None, "cwd": None, "shell": False, "p2cread": -1, "c2pwrite": -1,
             "errwrite": -1, "start_new_session": False, "process_group": -1, "gid": None, "gids": None,
             "uid": None, "umask": -1}


class ForkPopen(subprocess.Popen):
    """``Popen`` whose child is the pre-forked worker, told to become the worker, where :func:`why_not`
    allows; everything else about the object (wait, poll, signals) is Popen's."""

    def _execute_child(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        call = _EXECUTE.bind(self, *args, **kwargs).arguments
        why = _call_problem(call) or why_not(call["args"], call["env"])
        pid = None
        if why is None:
            pre, _state["pre"] = _state["pre"], None
            piped = call.get("errread", -1) != -1  # stderr=PIPE: Popen made a pipe and reads errread
            try:
                write_all(pre["fd"], json.dumps({"cmd": list(call["args"]), "env": dict(call["env"]),
                                                 "cwd": os.getcwd(), "stderr_pipe": piped}).encode())
                pid = pre["pid"]
            except (OSError, TypeError, ValueError) as exc:  # gone, or orders JSON cannot carry (bytes in env)
                why = f"the pre-forked worker could not take the worker ({type(exc).__name__}: {exc})"
            finally:
                os.close(pre["fd"])
            if pid is not None and piped:
                os.dup2(pre["err"], call["errread"], inheritable=False)  # Popen reads the worker's stderr there
                _close(call["errwrite"])  # Popen's child end, which its _execute_child would close
            _close(pre["err"])
            if pid is None:
                _reap(pre["pid"])  # the pipe is closed: it exits at once if it has not already
        _journal("fork" if why is None else "exec", why)
        if pid is None:
            return super()._execute_child(*args, **kwargs)  # type: ignore[misc]
        self.pid = pid
        self._child_created = True
        self._closed_child_pipe_fds = True  # the child's ends are closed: what _execute_child says when done
        return None


def _call_problem(call: Mapping[str, Any]) -> str | None:
    """Why this ``Popen`` call is not a plain ``Popen(cmd, env=...)``: pipes, cwd, a shell, a session..."""
    if not isinstance(call.get("args"), (list, tuple)) or call.get("env") is None:
        return "the worker is not started as Popen(list, env=...)"
    for name, default in _DEFAULTS.items():
        if name == "errwrite" and call.get("errread", -1) != -1:
            continue  # stderr=PIPE (accelerate >= 1.16 tees it): the pre-worker has a pipe for it
        if name in call and call[name] != default and not (name == "process_group" and call[name] is None):
            return f"the worker's Popen sets {name} (a fork repeats only Popen(cmd, env=..., stderr=PIPE))"
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
                   reason=reason or "the warm launcher's pre-forked worker, its imports done")
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


def why_not(cmd: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why the worker cannot be the pre-forked one (it then starts as the launcher asked)."""
    if not armed():
        return "the launcher did not start warm"
    pre = _state["pre"]
    if pre is None:
        return _state["why"] or "the pre-forked worker was taken by an earlier worker"
    if _worker(cmd) is None:
        python = os.path.basename(sys.executable)
        return f"the worker command is not `{python} SCRIPT|-m MODULE …` ({' '.join(cmd[:3])})"
    if len(sys.orig_argv) > 1 and sys.orig_argv[1].startswith("-") and sys.orig_argv[1] != "-m":
        return f"the launcher's interpreter has options ({sys.orig_argv[1]}) its worker would not"
    seen = pre["environ"]
    changed = sorted(k for k in set(env) | set(seen) if env.get(k) != seen.get(k)
                     and not k.startswith("ACCELERATE_") and k not in RUNTIME_ENV
                     and not (pre["kmp_unread"] and k.startswith("KMP_")))
    if changed:
        return f"the worker's environment differs in what is read at import ({', '.join(changed[:6])})"
    threads = env.get("OMP_NUM_THREADS", "").strip()
    if threads and not threads.isdigit():
        return f"OMP_NUM_THREADS={threads!r} is not a number a forked worker can apply"
    if _stdio() != pre["stdio"]:
        return "the launcher's stdin, stdout or stderr is not the file it was at the fork"
    return None


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
    _state["pre"] = None  # this process is the worker now
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
