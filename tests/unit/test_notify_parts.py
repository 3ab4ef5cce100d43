"""--notify / --on-end pieces: the body each webhook takes, the secret part of a URL never shown, a failed
POST printed once and journaled, the --on-end command's stdin, exit code and timeout."""

from __future__ import annotations

import json
import sys
import time

import pytest

from oomguard.errors import UsageError
from oomguard.supervisor.notify import (
    DISCORD_LIMIT,
    Notifier,
    NotifySpec,
    check_url,
    end_message,
    payload,
    post_json,
    recovery_message,
    run_on_end,
    target_text,
    tell_end,
)

DOC = {"schema": "oomguard.report/1", "status": "succeeded", "exit_code": 0, "wall_s": 33.2, "final_step": 24,
       "root_cause": {"text": "cuda_oom after step 6: CUDA out of memory"},
       "attempts": [{}, {}, {}],
       "recoveries": [{"attempt": 1, "reason": "CUDA OOM after step 6: max_seq_length 256 → 128"},
                      {"attempt": 2, "reason": "NaN after step 14: learning_rate 0.001 → 0.0005"}],
       "knobs": [{"knob": "max_seq_length", "requested": 256, "final": 128, "changed": True,
                  "verification": "verified"},
                 {"knob": "lora_r", "requested": 8, "final": 8, "changed": False, "verification": None}]}


def _events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_end_message_says_status_counts_root_cause_and_changes():
    title, text = end_message(DOC, "/runs/a")
    assert title == "oomguard: run finished (3 attempts, 2 recoveries, exit code 0)"
    lines = text.splitlines()
    assert lines[0].startswith(title) and "last step 24" in lines[0] and ":/runs/a" in lines[0]
    assert lines[1] == "root cause: cuda_oom after step 6: CUDA out of memory"
    assert "recovery after attempt 2: NaN after step 14" in text
    assert lines[-1] == "changed: max_seq_length 256 → 128 (verified)" and "lora_r" not in text


def test_recovery_message_uses_one_step_wording():
    notice = {"attempt": 1, "reason": "CUDA OOM at step 6 (forward_backward): batch 8 → 4"}
    title, text = recovery_message(notice, "/r")
    assert title == "oomguard: recovery after attempt 1" and "CUDA OOM after step 6" in text


def test_payload_fits_slack_discord_and_ntfy_templates():
    body = payload("run_ended", "t", "x" * 3000, "/r", {"report": DOC})
    assert body["text"] == "x" * 3000 and len(body["content"]) == DISCORD_LIMIT and body["content"].endswith("…")
    assert body["title"] == "t" and body["oomguard"]["event"] == "run_ended" and body["oomguard"]["report"] == DOC
    assert body["oomguard"]["run_dir"] == "/r" and body["oomguard"]["host"]
    json.dumps(body)


def test_url_checked_and_its_secret_part_never_shown():
    assert check_url("https://hooks.slack.com/services/T0/B0/s3cret") .endswith("s3cret")
    assert target_text("https://hooks.slack.com/services/T0/B0/s3cret") == "https://hooks.slack.com/…"
    assert target_text("https://user:pw@ntfy.example/topic") == "https://ntfy.example/…"
    for bad in ("ftp://host/x", "hooks.slack.com/x", "https://", ""):
        with pytest.raises(UsageError) as err:
            check_url(bad)
        assert "s3cret" not in str(err.value)


def test_failed_post_is_said_once_and_journaled_every_time(tmp_path):
    said = []
    n = Notifier(NotifySpec(url="http://127.0.0.1:9/hook/s3cret", on_recovery=True, post_timeout_s=2), str(tmp_path),
                 say=said.append)
    n.recovery({"attempt": 1, "reason": "CUDA OOM at step 2"})
    n.end(DOC)
    assert len(said) == 1 and "POST to http://127.0.0.1:9/… failed" in said[0] and "s3cret" not in said[0]
    notes = [e for e in _events(tmp_path) if e["event"] == "notification"]
    assert [(e["kind"], e["ok"]) for e in notes] == [("recovery", False), ("end", False)]
    assert all("s3cret" not in json.dumps(e) for e in notes)


def test_recovery_posts_only_when_asked(tmp_path):
    n = Notifier(NotifySpec(url="http://127.0.0.1:9/x"), str(tmp_path), say=lambda s: None)
    n.recovery({"attempt": 1})
    assert _events(tmp_path) == []


def test_post_json_reports_what_went_wrong():
    status, error = post_json("http://127.0.0.1:9/x", {"a": 1}, timeout_s=2)
    assert status is None and error


def test_on_end_gets_the_document_on_stdin_and_its_env(tmp_path):
    out = tmp_path / "got.json"
    cmd = (f"{sys.executable} -c \"import json,os,sys; d=json.load(sys.stdin); "
           f"d['env']=[os.environ[k] for k in ('OOMGUARD_END_RUN_DIR','OOMGUARD_END_STATUS','OOMGUARD_END_EXIT_CODE')];"
           f" json.dump(d, open({str(out)!r}, 'w'))\"")
    assert run_on_end(cmd, DOC, "/runs/a", 0) == (0, None)
    got = json.loads(out.read_text())
    assert got["schema"] == "oomguard.report/1" and got["env"] == ["/runs/a", "succeeded", "0"]


def test_on_end_failure_and_timeout_are_reported_not_raised(tmp_path):
    assert run_on_end("exit 3", DOC, str(tmp_path), 0) == (3, "exit code 3")
    assert run_on_end("true", DOC, str(tmp_path), 0) == (0, None)  # never reads stdin: no broken pipe
    t0 = time.monotonic()
    code, error = run_on_end("sleep 30", DOC, str(tmp_path), 0, timeout_s=0.5)
    assert code is None and "timed out after 0.5 s" in error and time.monotonic() - t0 < 10


def test_tell_end_journals_on_end_and_keeps_going(tmp_path):
    said = []
    spec = NotifySpec(on_end="exit 4")
    tell_end(spec, str(tmp_path), 0, DOC, notifier=Notifier(spec, str(tmp_path), say=said.append))
    assert said == ["[oomguard] --on-end command failed: exit code 4 (the run's exit code stays 0)"]
    ev = [e for e in _events(tmp_path) if e["event"] == "on_end"]
    assert ev and ev[0]["ok"] is False and ev[0]["exit_code"] == 4


def test_the_loops_recovery_notice_is_posted_with_its_fields(tmp_path):
    from oomguard.supervisor.spec import Recovery

    posted = []
    n = Notifier(NotifySpec(url="http://127.0.0.1:9/x", on_recovery=True), str(tmp_path), say=lambda s: None)
    n.post = lambda kind, body: posted.append((kind, body))
    change = "learning_rate: 0.001 → 0.0005"
    n.recovery(Recovery(run_dir=str(tmp_path), attempt=2, kind="nan_loss", step=14,
                        reason="NaN at step 14: learning_rate 0.001 → 0.0005", changes=(change,)))
    (kind, body), = posted
    assert kind == "recovery" and body["text"].startswith("oomguard: recovery after attempt 2 on ")
    assert "NaN after step 14" in body["text"] and body["oomguard"]["recovery"]["changes"] == [change]
