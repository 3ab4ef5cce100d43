"""``oomguard run --notify URL [--notify-on recovery] [--on-end CMD]``: say when the night ends.

Off by default, and the only network oomguard does: one JSON POST (stdlib ``urllib``) when the run
ends and, with ``--notify-on recovery``, one after each recovery decision. The body is shaped so the
common webhooks take it as it is:

* ``text``: Slack incoming webhooks (also Mattermost, Rocket.Chat, Google Chat, Discord's ``/slack`` URL);
* ``content``: Discord webhooks (at most 2,000 characters, so cut to that);
* ``title``: for ntfy's templates (``https://ntfy.sh/TOPIC?tpl=1&t={{.title}}&m={{.text}}``);
* ``oomguard``: the structured part (``event``, ``host``, ``run_dir``, and the ``oomguard.report/1``
  document at the end or the recovery's fields), for a receiver of one's own.

A failed POST is printed once (stderr) and journaled (``notification``); it never fails or slows the
run beyond the timeout. ``--on-end CMD`` runs CMD through the shell with the ``report --json`` document
on stdin (and ``OOMGUARD_END_RUN_DIR``, ``OOMGUARD_END_STATUS``, ``OOMGUARD_END_EXIT_CODE`` in its
environment), under a timeout; its failure is reported and journaled (``on_end``) but never changes the
run's exit code. A webhook URL is a secret: only its scheme and host are ever printed or written.
Stdlib only (and the protocol).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..protocol import emit_event

__all__ = ["DISCORD_LIMIT", "NOTIFY_ON", "Notifier", "NotifySpec", "check_url", "end_message", "payload",
           "post_json", "recovery_message", "run_on_end", "target_text", "tell_end"]

NOTIFY_ON = ("end", "recovery")
POST_TIMEOUT_S = 10.0
ON_END_TIMEOUT_S = 300.0
DISCORD_LIMIT = 2000  # characters of a Discord message's ``content``
HEAD = {"succeeded": "finished", "gave_up": "GAVE UP", "failed": "FAILED", "interrupted": "was interrupted",
        "running": "is still running"}


@dataclasses.dataclass(frozen=True)
class NotifySpec:
    """What ``oomguard run`` was asked to tell, and whom."""

    url: str | None = None
    on_recovery: bool = False
    on_end: str | None = None
    post_timeout_s: float = POST_TIMEOUT_S
    on_end_timeout_s: float = ON_END_TIMEOUT_S

    @property
    def active(self) -> bool:
        return bool(self.url or self.on_end)


def check_url(url: str) -> str:
    """An http(s) URL with a host, else UsageError (exit 2, before anything starts)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--notify {target_text(url)!r}: not an http(s) URL; give the webhook's full address, "
                         "e.g. https://hooks.slack.com/services/… or https://ntfy.sh/TOPIC?tpl=1&m={{.text}}")
    return url


def target_text(url: str) -> str:
    """``https://hooks.slack.com/…``: the part of a webhook URL that is not a secret."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return "…"
    host = parts.netloc.rpartition("@")[2]  # user:password@ is a secret too
    return f"{parts.scheme}://{host}/…"


def _where(run_dir: str) -> str:
    return f"{socket.gethostname()}:{run_dir}"


def _plain(text: str) -> str:
    from ..report.summary import (
        plain_steps,  # lazy: the report imports the supervisor's journal
    )

    return plain_steps(text)


def end_message(doc: dict[str, Any], run_dir: str) -> tuple[str, str]:
    """(title, text) of the run's end, from its ``oomguard.report/1`` document."""
    head = HEAD.get(doc.get("status"), str(doc.get("status")))
    attempts, recoveries = len(doc.get("attempts") or ()), len(doc.get("recoveries") or ())
    title = (f"oomguard: run {head} ({attempts} attempt{'s' * (attempts != 1)}, "
             f"{recoveries} recover{'ies' if recoveries != 1 else 'y'}, exit code {doc.get('exit_code')})")
    last = doc["final_step"] if doc.get("final_step") is not None else "-"
    lines = [f"{title}; {doc.get('wall_s', 0):.0f} s; last step {last}; {_where(run_dir)}"]
    if doc.get("root_cause"):
        lines.append(f"root cause: {doc['root_cause']['text']}")
    lines += [f"recovery after attempt {r['attempt']}: {r['reason']}" for r in doc.get("recoveries") or ()]
    changed = [f"{k['knob']} {k['requested']} → {k['final']}"
               + (f" ({k['verification']})" if k["verification"] else "")
               for k in doc.get("knobs") or () if k.get("changed")]
    if changed:
        lines.append("changed: " + ", ".join(changed))
    return title, "\n".join(lines)


def recovery_message(info: dict[str, Any], run_dir: str) -> tuple[str, str]:
    """(title, text) of one recovery decision (the loop's ``decision`` fields)."""
    title = f"oomguard: recovery after attempt {info.get('attempt', '?')}"
    return title, f"{title} on {_where(run_dir)}: {_plain(str(info.get('reason') or 'retrying'))}"


def payload(kind: str, title: str, text: str, run_dir: str, data: dict[str, Any]) -> dict[str, Any]:
    """The POST body: Slack's ``text``, Discord's ``content``, a ``title``, and the structured part."""
    content = text if len(text) <= DISCORD_LIMIT else text[:DISCORD_LIMIT - 1] + "…"
    return {"text": text, "content": content, "title": title,
            "oomguard": {"event": kind, "host": socket.gethostname(), "run_dir": run_dir, "time": time.time(),
                         **data}}


def post_json(url: str, body: dict[str, Any], timeout_s: float = POST_TIMEOUT_S) -> tuple[int | None, str | None]:
    """POST ``body``; (HTTP status, None) on a 2xx answer, else (status or None, why)."""
    request = urllib.request.Request(url, data=json.dumps(body, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": f"oomguard/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status, None
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace").strip() if exc.fp else ""
        return exc.code, f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc)) or type(exc).__name__


def _journal(write: Callable[[], None]) -> None:
    """Journal one line; a full disk or a strict catalogue never fails the run's end."""
    try:
        write()
    except (OSError, ValueError):
        pass


class Notifier:
    """Posts to ``spec.url``; the first failure is printed, every one is journaled."""

    def __init__(self, spec: NotifySpec, run_dir: str, *, say: Callable[[str], None] | None = None):
        self.spec, self.run_dir = spec, str(run_dir)
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.failed = False

    def recovery(self, notice: Any) -> None:
        """``RunSpec.on_recovery``: the loop's hook after a retry decision (a ``spec.Recovery``, or its
        fields as a dict); never raises."""
        if not (self.spec.url and self.spec.on_recovery):
            return
        try:
            info = notice.to_dict() if hasattr(notice, "to_dict") else dict(notice)
            title, text = recovery_message(info, self.run_dir)
            self.post("recovery", payload("recovery", title, text, self.run_dir, {"recovery": info}))
        except Exception as exc:  # noqa: BLE001 - a notification never ends a run
            self._failed("recovery", None, f"{type(exc).__name__}: {exc}")

    def end(self, doc: dict[str, Any]) -> None:
        if not self.spec.url:
            return
        title, text = end_message(doc, self.run_dir)
        self.post("end", payload("run_ended", title, text, self.run_dir, {"report": doc}))

    def post(self, kind: str, body: dict[str, Any]) -> None:
        status, error = post_json(self.spec.url, body, self.spec.post_timeout_s)
        if error is None:
            _journal(lambda: emit_event(self.run_dir, "notification", kind=kind, target=target_text(self.spec.url),
                                        ok=True, status=status, error=None))
        else:
            self._failed(kind, status, error)

    def _failed(self, kind: str, status: int | None, error: str) -> None:
        target = target_text(self.spec.url or "")
        _journal(lambda: emit_event(self.run_dir, "notification", kind=kind, target=target, ok=False, status=status,
                                    error=error[:500]))
        if not self.failed:
            self.failed = True
            self.say(f"[oomguard] --notify: POST to {target} failed: {error[:300]} (the run is not affected; "
                     "later failures are only journaled)")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's process group (the shell and what it started), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a wrapped stream: the process's own fd 2
        return 2


def run_on_end(command: str, doc: dict[str, Any], run_dir: str, exit_code: int,
               timeout_s: float = ON_END_TIMEOUT_S) -> tuple[int | None, str | None]:
    """Run ``command`` (shell) with ``doc`` as JSON on stdin; (exit code, None) on success, else (code, why)."""
    env = {**os.environ, "OOMGUARD_END_RUN_DIR": str(run_dir), "OOMGUARD_END_STATUS": str(doc.get("status")),
           "OOMGUARD_END_EXIT_CODE": str(exit_code)}
    try:  # its stdout goes to oomguard's stderr: oomguard's stdout may be the child's pipe
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=_stderr_fd(), env=env,
                                start_new_session=True)
    except (OSError, ValueError) as exc:
        return None, f"could not start: {exc}"
    try:
        proc.communicate(json.dumps(doc, indent=2).encode() + b"\n", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return None, f"timed out after {timeout_s:g} s (stopped)"
    if proc.returncode != 0:
        return proc.returncode, f"exit code {proc.returncode}"
    return 0, None


def tell_end(spec: NotifySpec, run_dir: str, exit_code: int, doc: dict[str, Any] | None, *, why_no_doc: str = "",
             notifier: Notifier | None = None) -> None:
    """The run is over: POST its end (``--notify``) and run ``--on-end``. Never raises for either."""
    run_dir = str(run_dir)
    notifier = notifier or Notifier(spec, run_dir)
    if doc is None:
        if spec.url:
            text = f"oomguard: run ended with exit code {exit_code} on {_where(run_dir)}; no report: {why_no_doc}"
            notifier.post("end", payload("run_ended", text.partition(";")[0], text, run_dir, {"report": None}))
        if spec.on_end:
            notifier.say(f"[oomguard] --on-end not run: no report of the run ({why_no_doc})")
        return
    notifier.end(doc)
    if not spec.on_end:
        return
    t0 = time.monotonic()
    code, error = run_on_end(spec.on_end, doc, run_dir, exit_code, spec.on_end_timeout_s)
    seconds = round(time.monotonic() - t0, 3)
    _journal(lambda: emit_event(run_dir, "on_end", exit_code=code, ok=error is None, seconds=seconds, error=error))
    if error is not None:
        notifier.say(f"[oomguard] --on-end command failed: {error} (the run's exit code stays {exit_code})")
