"""Errors and the documented exit codes of ``oomguard``. Stdlib only."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``oomguard run`` returns; a scheduler can act on it (README, "Exit codes")."""

    SUCCESS = 0
    INTERNAL = 1  # a bug in oomguard itself: please report it
    USAGE = 2  # bad command line, policy file or run dir; nothing was started
    GAVE_UP = 3  # the ladder or a budget is spent; the root cause is in the summary
    NO_PROGRESS = 4  # no new optimizer step across the budgeted attempts: do not requeue
    CHILD_FAILED = 5  # the child failed in a way no rung can help (e.g. a bug in the script)
    RUN_DIR_FAILED = 6  # the run dir stopped taking writes mid-run (disk full, read-only): free it, continue
    # several nodes (docs/DISTRIBUTED.md): another node's supervisor is gone, or never came, past --node-timeout;
    # the nodes cannot agree on the next attempt: restart (requeue) every node's `oomguard run --run-dir D`
    NODE_LOST = 7
    REQUEUE = 75  # stopped by a scheduler (SIGTERM, SIGUSR1, SIGUSR2) after the child saved: requeue the job
    INTERRUPTED = 130  # SIGINT (Ctrl-C) or SIGHUP (the terminal closed); `oomguard run --run-dir D` resumes


class OomguardError(Exception):
    """Base class: every subclass maps to an exit code and carries a fix in its text."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(OomguardError):
    exit_code = ExitCode.USAGE


class PolicyError(UsageError):
    """A policy file is invalid. ``problems`` are lines ``file: key.path: problem``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunDirError(UsageError):
    """The run dir is not one, or is in use by another supervisor."""
