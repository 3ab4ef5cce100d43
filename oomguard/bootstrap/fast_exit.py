"""The failed child's quick exit (issue 17 item 2). Stdlib only.

A child whose guard has written its error record ends with ``SystemExit(1)`` (``guard/emergency.die``).
The interpreter's finalization then tears down every module and object of torch, transformers and
their kind: 1.9–2.0 s on an 8B QLoRA child (H200), 2–5 s on a 2-core CPU, while the process holds its
GPU memory and the next attempt waits. Nothing in that teardown is needed except what Py_Finalize does
first, so :class:`GuardExit` does only that, in its order, and ends the process with the same exit code
(0.33 s and 0.13 s from the error record to the exit, docs/BENCHMARKS.md):

1. join the non-daemon threads (``threading._shutdown``, Py_Finalize's first step);
2. run the ``atexit`` handlers (``logging.shutdown``, ``weakref.finalize``, multiprocessing, trackers…);
3. flush every open writable file object (found by ``gc``), close those a Python class implements
   (``GzipFile`` writes its trailer on close), flush them again, flush the std streams and C stdio;
4. ``os._exit(code)``.

Only when the interpreter's own top level handles the exit: ``GuardExit`` is a ``SystemExit``, so the
user's ``finally`` blocks, ``with`` exits and ``except SystemExit`` run as before, and one that
catches it and goes on, or exits with another code, gets the ordinary exit. The top level is the
only reader of ``code`` with no Python frame above it (CPython's ``_Py_HandleSystemExit``). Not
run: ``__del__`` of objects still alive at exit (CPython does not promise those either), C
``atexit`` handlers of extension libraries. ``OOMGUARD_FAST_EXIT=0`` turns it off.

A launcher (``accelerate launch``, ``trl``, ``torchrun``) whose worker failed ends with an uncaught
exception (accelerate's ``CalledProcessError``): its interpreter prints the traceback and then tears
down torch the same way (2.6 s of the 8B ``trl sft`` restart on the H200, docs/BENCHMARKS.md).
:func:`exit_fast_after_uncaught` makes that exit the same :func:`finish` with code 1, after the
traceback is printed, only when ``sys.excepthook`` is called by the interpreter's top level (not by
code that prints an exception and goes on), and never for ``KeyboardInterrupt`` (whose exit is a signal).
"""

from __future__ import annotations

import _io
import atexit
import ctypes
import gc
import io
import os
import sys
import threading
from typing import Any, Iterable

__all__ = ["ENV_FAST_EXIT", "GuardExit", "enabled", "exit_fast_after_uncaught", "finish", "open_writable_files",
           "wraps_excepthook"]

ENV_FAST_EXIT = "OOMGUARD_FAST_EXIT"  # "0"/"off"/"false"/"no": the ordinary interpreter exit
_OFF = ("0", "off", "false", "no")
_CODE = SystemExit.__dict__["code"]  # the C member that holds SystemExit's code


def enabled(environ=os.environ) -> bool:
    return environ.get(ENV_FAST_EXIT, "").strip().lower() not in _OFF


class GuardExit(SystemExit):
    """``SystemExit(code)`` that, read by the interpreter's top level, ends the process at once
    (:func:`finish`); read anywhere else (an ``except SystemExit`` handler, pytest) it is a SystemExit."""

    @property
    def code(self) -> Any:
        code = _CODE.__get__(self, type(self))
        if isinstance(code, int) and enabled() and _read_by_top_level():
            finish(code)  # returns only if something in it failed: then the ordinary exit goes on
        return code


def _read_by_top_level() -> bool:
    """True when the caller of ``GuardExit.code`` is C code with no Python frame: the main thread's
    top-level SystemExit handler, about to finalize the interpreter with that code."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        sys._getframe(2)  # 0: this function, 1: the property, 2: whoever read it
    except ValueError:
        return True
    return False


def finish(code: int) -> None:
    """Py_Finalize's steps that can matter to anyone (threads, atexit, buffered files), then ``os._exit``."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize calls first
        atexit._run_exitfuncs()  # each handler once, newest first, then cleared (as at exit)
        flush_files()
    except BaseException:  # noqa: BLE001 - the ordinary exit does what is left, nothing twice
        return
    os._exit(code & 0xFF)


def open_writable_files(objects: Iterable[Any] | None = None) -> list[io.IOBase]:
    """Every file object ``gc`` tracks that is open for writing (the std streams included)."""
    objects = gc.get_objects() if objects is None else list(objects)
    # Every file class has the C base in its MRO (io.IOBase is an ABC: isinstance on 500k objects takes 0.3 s)
    kinds = {t for t in set(map(type, objects)) if issubclass(t, _io._IOBase)}
    found = []
    for obj in [o for o in objects if type(o) in kinds]:
        try:
            if not obj.closed and obj.writable():
                found.append(obj)
        except (ValueError, OSError, AttributeError):  # detached or half-built
            continue
    return found


def flush_files() -> None:
    """What finalization does for files: each flushed (order does not matter: a flush goes down
    through the layers), those of a Python class closed as their finalizer would (outermost first),
    everything flushed again (a close may write into a lower layer), then the C stdio buffers."""
    files = open_writable_files()
    _flush(files)
    _close_python_level(files)
    _flush(files)
    _flush(s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None)
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio (an extension's printf into a log file)
    except (OSError, AttributeError):
        pass


def _flush(files: Iterable[Any]) -> None:
    for f in files:
        try:
            if not f.closed:
                f.flush()
        except Exception:  # noqa: BLE001 - a pipe gone, a full disk: finalization would only warn
            continue


def _std_streams() -> set[int]:
    return {id(s) for s in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)}


def _close_python_level(files: list[Any]) -> None:
    """Close the files a Python class implements (``gzip.GzipFile``, ``fsspec``'s, a user's), each
    before any such file it wraps: their ``close`` does more than flush. Built-in ``_io`` objects are
    left open, their bytes are all flushed and the OS closes the descriptors."""
    std = _std_streams()
    remaining = [f for f in files if type(f).__module__ not in ("_io", "io") and id(f) not in std]
    while remaining:
        held = {id(r) for f in remaining for r in _held(f)}
        outer = [f for f in remaining if id(f) not in held] or remaining  # a cycle: all at once
        for f in outer:
            try:
                f.close()
            except Exception:  # noqa: BLE001
                continue
        done = {id(f) for f in outer}
        remaining = [f for f in remaining if id(f) not in done]


def _held(obj: Any) -> list[Any]:
    """What ``obj`` refers to directly or through its ``__dict__``."""
    held = list(gc.get_referents(obj))
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        held.extend(attrs.values())
    return held


_HOOK_CODES: set[Any] = set()  # excepthook wrappers that may stand between the top level and ours


def wraps_excepthook(hook: Any) -> Any:
    """Mark ``hook`` as a wrapper that calls the previous ``sys.excepthook``: the top-level check sees through it."""
    code = getattr(hook, "__code__", None)
    if code is not None:
        _HOOK_CODES.add(code)
    return hook


def _called_by_top_level() -> bool:
    """True when only excepthook wrappers stand between the caller of ``sys.excepthook`` and C."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        frame = sys._getframe(2)  # 0: this function, 1: our hook; 2 up: whoever called it
    except ValueError:
        return True  # nothing above our hook: C called it
    while frame is not None:
        if frame.f_code not in _HOOK_CODES:
            return False
        frame = frame.f_back
    return True


def exit_fast_after_uncaught(applies: Any) -> None:
    """From now on an uncaught exception that reaches the top level of a process where ``applies(sys.argv)``
    is true ends it with :func:`finish` (code 1) once the traceback is printed."""
    base = sys.excepthook

    def hook(kind, value, tb):
        base(kind, value, tb)
        try:
            fast = (enabled() and not issubclass(kind, KeyboardInterrupt) and applies(sys.argv)
                    and _called_by_top_level())
        except Exception:  # noqa: BLE001 - never stand in the way of the ordinary exit
            fast = False
        if fast:
            finish(1)

    sys.excepthook = hook
