"""``python -m oomguard.spare PLAN ORDERS_FD READY_FD``: import, say ready, wait, become the child.

See :mod:`oomguard.spare`. This runs in the CHILD's interpreter (the command's python, maybe
another venv than the supervisor's): stdlib only until the preload.
"""

import json
import os
import sys

from oomguard.spare import EXIT_CUDA, read_all, write_all
from oomguard.spare.become import Saved, become, path0, save_state


def _say_ready(fd: int, report: dict) -> None:
    try:
        write_all(fd, (json.dumps(report) + "\n").encode())
    finally:
        os.close(fd)


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list) -> None:
    saved: Saved = save_state()  # before any import of ours: what a fresh interpreter has
    plan, orders_fd, ready_fd = json.loads(argv[1]), int(argv[2]), int(argv[3])
    kind, name = plan["kind"], plan["name"]
    sys.path[0:1] = [path0(kind, name)]  # imports resolve as they will in the child
    from oomguard.spare.preload import DEFAULT, preload, wanted

    drop = plan.get("drop", ())
    modules = wanted(kind, name, drop)
    for also_kind, also_name in plan.get("also", ()):  # a launcher's worker: what it will import
        modules += [(m, ()) for m in DEFAULT if m not in drop] if also_kind == "default" else \
            wanted(also_kind, also_name, drop)
    report = preload(modules)
    report.update(pid=os.getpid(), rss=_rss(), ready=report["cuda"] is None)
    _say_ready(ready_fd, report)
    if report["cuda"] is not None:
        print(f"oomguard spare: importing {report['cuda']} initialised CUDA; a spare must not hold a CUDA "
              "context, exiting", file=sys.stderr)
        raise SystemExit(EXIT_CUDA)
    raw = read_all(orders_fd)
    os.close(orders_fd)
    if not raw.strip():
        raise SystemExit(0)  # the run needs no spare any more
    become(json.loads(raw), saved, kind, name)


if __name__ == "__main__":
    main(sys.argv)
