"""The warm spare's own side (issue 17): an interpreter that has done the heavy imports and waits to
become the next attempt's child. Stdlib only until :mod:`.preload` imports the training stack.

The supervisor (``oomguard/supervisor/spare.py``) starts ``python [the command's interpreter
options] -m oomguard.spare PLAN ORDERS_FD READY_FD`` with the current attempt's environment less
every ``OOMGUARD_*`` variable (so the bootstrap installs nothing yet and the stray scan never
mistakes it for a child of the run). ``PLAN`` (JSON) says what the next child runs: ``kind``
``script`` (a ``.py`` file or a Python console script) or ``module`` (``python -m``) and its
``name``. The spare sets ``sys.path[0]`` as that fresh process would, imports the stack the
script names (:mod:`.preload`; never CUDA: a module that initialises it ends the spare), says so
on ``READY_FD``, and blocks on ``ORDERS_FD``. The orders (JSON, then EOF) are the attempt's argv,
environment, cwd and log files; :mod:`.become` turns the process into that child. EOF without
orders: the run needs no spare any more, exit 0.
"""

import os

PLAN_KINDS = ("script", "module")
EXIT_CUDA = 3  # the spare's exit code when an import initialised CUDA (the supervisor drops that module)

__all__ = ["EXIT_CUDA", "PLAN_KINDS", "read_all", "write_all"]


def read_all(fd: int) -> bytes:
    """Everything on pipe ``fd`` up to EOF (the orders' protocol: JSON, then the writer closes)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` onto pipe ``fd`` (raises OSError when the reader is gone)."""
    while data:
        data = data[os.write(fd, data):]
