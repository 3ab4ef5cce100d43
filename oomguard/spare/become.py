"""Turn the spare into the attempt's child, as a fresh ``python`` would have started it. Stdlib only.

What a fresh process has and the spare gives it: the attempt's environment (``os.environ``
replaced: ``putenv`` too, so the child's own children inherit it), cwd, stdout/stderr on the
attempt's log files (``dup2``, append), every signal handler as the interpreter had it before the
imports, ``sys.argv`` / ``sys.orig_argv``, ``sys.path`` (``[0]`` the script's directory, symlinks
resolved, or the cwd for ``-m``), a new empty ``__main__``, the bootstrap installed from the
attempt's environment (what ``sitecustomize`` does at a fresh start), and the code run with the
interpreter's own top level: ``SystemExit``, an uncaught exception (traceback on stderr, exit 1)
and ``KeyboardInterrupt`` end the process exactly as they would a fresh one. Tracebacks leave out
the spare's own frames. What differs: ``/proc/<pid>/cmdline`` and ``/proc/<pid>/environ`` still
show how the spare was started (they are fixed at exec), and the pid is older than the attempt.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import runpy
import signal
import sys
import types
from typing import Any, Callable, Mapping

__all__ = ["Saved", "become", "path0", "restore_signals", "run_code", "save_state"]

_BOOTSTRAP_OFF = ("0", "off", "false", "no")
_HERE = os.path.dirname(os.path.abspath(__file__))
_OURS = frozenset({os.path.abspath(__file__), os.path.join(_HERE, "__main__.py"), os.path.join(_HERE, "fork_worker.py"),
                   "<frozen runpy>", getattr(runpy, "__file__", "") or ""})


@dataclasses.dataclass(frozen=True)
class Saved:
    """The interpreter's state at the spare's start, before any import of its own."""

    signals: dict[int, Any]
    base_path: tuple[str, ...]  # sys.path without its [0]


def save_state() -> Saved:
    handlers = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler is not None:  # None: set from C, not ours to restore
            handlers[int(sig)] = handler
    return Saved(signals=handlers, base_path=tuple(sys.path[1:]))


def path0(kind: str, name: str) -> str:
    """``sys.path[0]`` of a fresh ``python NAME`` (the script's real directory) or ``python -m NAME`` (cwd)."""
    if kind == "module":
        return os.getcwd()
    return os.path.dirname(os.path.realpath(name))


def restore_signals(saved: Saved) -> None:
    for sig, handler in saved.signals.items():
        try:
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        except (OSError, ValueError, TypeError):
            continue


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.dup2(target, fd)
    finally:
        os.close(target)


def _install_bootstrap() -> None:
    """What the bootstrap's ``sitecustomize`` does at a fresh start, now that the env is the attempt's:
    register the post-import hooks (a module already imported is patched at once)."""
    if not os.environ.get("OOMGUARD_RUN_DIR", "").strip():
        return
    if os.environ.get("OOMGUARD_BOOTSTRAP", "").strip().lower() in _BOOTSTRAP_OFF:
        return
    if not any(_is_bootstrap_site(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        return  # the supervisor gave this command no bootstrap (flags and env only)
    from oomguard.bootstrap.injection import install

    install()


def _is_bootstrap_site(path: str) -> bool:
    """A PYTHONPATH entry that is oomguard's bootstrap folder: the supervisor's own copy of oomguard,
    which may be another install than this interpreter's (a light supervisor venv)."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep) if path else []
    return parts[-3:] == ["oomguard", "bootstrap", "site"] and os.path.isfile(os.path.join(path, "sitecustomize.py"))


def _trim(tb: Any) -> Any:
    """The traceback from the first frame that is not the spare's (or runpy's, which ran it)."""
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename in _OURS:
        tb = tb.tb_next
    return tb if tb is not None else first


def _excepthook(base: Callable[..., Any]) -> Callable[..., Any]:
    from oomguard.bootstrap.fast_exit import wraps_excepthook  # stdlib only

    def hook(kind, value, tb):
        tb = _trim(tb)
        if isinstance(value, BaseException):
            value = value.with_traceback(tb)  # the built-in hook prints the exception's own traceback
        return base(kind, value, tb)

    return wraps_excepthook(hook)


def _fresh_main() -> types.ModuleType:
    main = types.ModuleType("__main__")
    main.__dict__.update({"__builtins__": builtins, "__annotations__": {}, "__package__": None, "__spec__": None,
                          "__loader__": None, "__cached__": None})
    sys.modules["__main__"] = main
    return main


def _run_script(name: str) -> None:
    import importlib.machinery

    filename = os.path.abspath(name)
    main = _fresh_main()
    main.__file__ = filename
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", filename)
    with open(filename, "rb") as f:
        source = f.read()
    code = compile(source, filename, "exec", dont_inherit=True)
    exec(code, main.__dict__)


def _run_module(name: str) -> None:
    _fresh_main()
    runpy._run_module_as_main(name, alter_argv=True)  # what `python -m NAME` calls


def become(orders: Mapping[str, Any], saved: Saved, kind: str, name: str) -> None:
    """Take the attempt's identity and run its code; returns (or raises) as that code does."""
    os.chdir(orders["cwd"])
    os.environ.clear()
    os.environ.update(orders["env"])
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    _redirect(1, orders["stdout"])
    _redirect(2, orders["stderr"])
    restore_signals(saved)
    sys.argv = list(orders["argv"])
    sys.orig_argv = list(orders["orig_argv"])
    sys.path[:] = [path0(kind, name), *saved.base_path]
    _install_bootstrap()
    sys.excepthook = _excepthook(sys.excepthook)
    if orders.get("fork_worker"):  # a launcher: its single-process worker may fork from it (fork_worker.py)
        from oomguard.spare.fork_worker import arm

        arm(saved)
    run_code(kind, name)


def run_code(kind: str, name: str) -> None:
    """Run the script or module as ``__main__``, as ``python NAME`` / ``python -m NAME`` does."""
    if kind == "module":
        _run_module(name)
    else:
        _run_script(name)
