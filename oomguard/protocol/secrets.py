"""Secrets in command lines: never written into the run dir (``--hub_token``, ``*_key``, ``HF_TOKEN=``)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SECRET_MASK", "is_secret_name", "redact_argv", "secret_values", "redact"]

SECRET_MASK = "***"
_SECRET_WORDS = ("token", "key", "secret", "password", "passwd")
_ENV_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_MIN_SCRUB = 6  # chars: a shorter secret value is masked in argv only (scrubbing "1" everywhere ruins the journal)


def is_secret_name(name: str) -> bool:
    """``hub_token``, ``api-key``, ``HF_TOKEN``, ``db.password``: a word of the name ends in a secret
    word. Word-wise so that ``--tokenizer_name`` or ``--max_tokens`` are not taken for secrets."""
    words = re.split(r"[-_.]+", name.lower())
    return any(w.endswith(_SECRET_WORDS) for w in words if w)


def _secret_slots(argv: list[str]) -> dict[int, str]:
    """index -> the redacted form of that argument (``--x ***``'s value, ``--x=***``, ``X_KEY=***``)."""
    slots: dict[int, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("-") and is_secret_name(arg.lstrip("-").partition("=")[0]):
            name, eq, _ = arg.partition("=")
            if eq:
                slots[i] = f"{name}={SECRET_MASK}"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                slots[i + 1] = SECRET_MASK  # "--hub_token VALUE"; a bare switch before a flag has no value
        elif (m := _ENV_ASSIGN.match(arg)) and is_secret_name(m.group(1)):
            slots[i] = f"{m.group(1)}={SECRET_MASK}"
    return slots


def redact_argv(argv: Any) -> list[str]:
    """``argv`` with every secret value replaced by ``***`` (for files, never for what runs)."""
    argv = [str(a) for a in argv]
    slots = _secret_slots(argv)
    return [slots.get(i, a) for i, a in enumerate(argv)]


def secret_values(argv: Any) -> list[str]:
    """The secret values ``argv`` holds (long enough to be scrubbed out of any text)."""
    argv = [str(a) for a in argv]
    values = []
    for i, redacted in _secret_slots(argv).items():
        value = argv[i][len(redacted) - len(SECRET_MASK):] if redacted != SECRET_MASK else argv[i]
        if len(value) >= _MIN_SCRUB and value != SECRET_MASK:
            values.append(value)
    return values


def redact(obj: Any, secrets: list[str] = ()) -> Any:  # type: ignore[assignment]
    """A copy of a JSON-shaped ``obj`` fit for the run dir: every all-string list is redacted as an
    argv, and each of ``secrets`` is replaced by ``***`` inside every string (a traceback, a reason)."""
    if isinstance(obj, str):
        for value in secrets:
            obj = obj.replace(value, SECRET_MASK)
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(x, str) for x in obj):
            return [redact(x, secrets) for x in redact_argv(obj)]
        return [redact(x, secrets) for x in obj]
    return obj
