"""What a child sees of its own start (tests/integration/test_spare.py): run fresh and warm, compared.

Usage: python _spare_probe.py OUT_JSON BEHAVIOUR   (0 | 3 | msg | exc | term | handler)
"""

import json
import os
import signal
import sys

import numpy  # noqa: F401 - a heavy-stack import the spare preloads (cheap)

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGXFSZ", "SIGCHLD", "SIGUSR1", "SIGQUIT")


def seen() -> dict:
    main = sys.modules["__main__"]
    torch = sys.modules.get("torch")
    return {
        "name": __name__, "file": __file__, "argv": sys.argv, "orig_argv": sys.orig_argv,
        "executable": sys.executable, "path0": sys.path[0], "path": sys.path, "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k != "_"}, "package": main.__package__,
        "spec": repr(main.__spec__), "loader": type(main.__loader__).__name__, "cached": main.__cached__,
        "signals": {name: repr(signal.getsignal(getattr(signal, name))) for name in SIGNALS},
        "flags": repr(sys.flags), "session_leader": os.getsid(0) == os.getpid(), "pgid": os.getpgid(0) == os.getpid(),
        "stdin": os.path.realpath("/proc/self/fd/0"), "stdout_log": os.path.basename(os.path.realpath("/proc/self/fd/1")),
        "stderr_log": os.path.basename(os.path.realpath("/proc/self/fd/2")),
        "cuda_initialized": bool(torch.cuda.is_initialized()) if torch is not None else None,
        "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
        "threads": torch.get_num_threads() if torch is not None else None,
        # a launcher's worker holds nothing the launcher's run did (fork_worker forks it before that runs;
        # modules the spare preloaded are there, as in any warm child): the launch module's patch is not in it
        "launcher_ran": getattr(sys.modules.get("accelerate.commands.launch"), "subprocess", None)
        not in (None, sys.modules.get("subprocess")),
    }


def main(out: str, behaviour: str) -> None:
    with open(out, "w") as f:
        json.dump(seen(), f)
    print("probe stdout line")
    if behaviour == "exc":
        raise ValueError("the probe fails")
    if behaviour == "msg":
        raise SystemExit("the probe says goodbye")
    if behaviour == "term":
        os.kill(os.getpid(), signal.SIGTERM)  # the default action: killed by SIGTERM
        signal.pause()
    if behaviour == "handler":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
    sys.exit(int(behaviour))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
