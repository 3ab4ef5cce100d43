"""The morning summary's wording and the oomguard.report/1 JSON document, from hand-made records."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from oomguard.report.export import build_document
from oomguard.report.schema import REPORT_JSON_SCHEMA
from oomguard.report.summary import plain_steps, render_text, summarize_loaded

VALIDATOR = jsonschema.Draft202012Validator(REPORT_JSON_SCHEMA)
KNOBS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_seq_length": 512}


def _attempt(n, failure=None, decision=None, knobs=KNOBS, resumed=None, verified=None, max_step=None):
    return {"n": n, "started": 100.0 + n, "ended": 100.5 + n, "exit_code": 1 if failure else 0,
            "failure": failure, "decision": decision, "knobs": dict(knobs), "orders": {}, "rung": None,
            "resumed_from": resumed, "verified": verified or {}, "max_step": max_step}


def _run(status, attempts, **extra):
    final = attempts[-1]["knobs"]
    return {"status": status, "exit_code": 0 if status == "succeeded" else 5, "started": 100.0, "ended": 110.0,
            "requested": dict(KNOBS), "config": dict(final), "world_size": 1, "attempts": attempts,
            "requested_source": "observed", "root_cause": None, "policy": "test", **extra}


OOM = {"kind": "cuda_oom", "step": 2, "phase": "unknown", "detail": "CUDA out of memory at step 3", "rank": 0}
HALVED = {**KNOBS, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
RETRY = {"action": "retry", "reason": "CUDA OOM at step 2: per_device_train_batch_size 8 → 4; resuming from checkpoint-2",
         "resume_from": "/x/checkpoint-2", "rung": {"ladder": "cuda_oom", "index": 1}, "truncation_share": None,
         "changes": [{"knob": "per_device_train_batch_size", "old": 8, "new": 4},
                     {"knob": "gradient_accumulation_steps", "old": 2, "new": 4}]}


def recovered_run():
    return _run("succeeded", [
        _attempt(1, OOM, RETRY, max_step=2),
        _attempt(2, knobs=HALVED, resumed="/x/checkpoint-2", max_step=6,
                 verified={"per_device_train_batch_size": "verified", "gradient_accumulation_steps": "unverified"})])


def test_clean_run_has_no_root_cause_and_singular_counts():
    run = _run("succeeded", [_attempt(1, max_step=4)], root_cause="stale text")
    text = render_text(summarize_loaded(run, [], []))
    assert "after 1 attempt, 0 recoveries," in text and "root cause" not in text
    doc = build_document(run, [], [])
    assert doc["root_cause"] is None
    VALIDATOR.validate(doc)


def test_recovery_wording_one_step_number_after_step():
    text = render_text(summarize_loaded(recovered_run(), [], []))
    lines = text.splitlines()
    assert "after 2 attempts, 1 recovery," in lines[0]
    assert lines[1] == "root cause: cuda_oom after step 2: CUDA out of memory at step 3"  # the child's text stays
    assert "recovery after attempt 1: CUDA OOM after step 2:" in text and "[cost: 0 steps redone]" in text
    assert "(changed)" in text and "(not verified in the child)" in text
    assert "at step None" not in text and "recovery(ies)" not in text and "attempt(s)" not in text


def test_two_recoveries_and_crash_with_unknown_step():
    crash = {"kind": "crash", "step": None, "phase": "unknown", "detail": "ValueError: boom", "rank": 0}
    again = {**RETRY, "reason": "crash at step None (unknown): ValueError: boom: crash retry 1 of 2"}
    run = _run("failed", [_attempt(1, crash, again), _attempt(2, crash, again), _attempt(3, crash)])
    text = render_text(summarize_loaded(run, [], []))
    assert "after 3 attempts, 2 recoveries," in text
    assert "root cause: crash before the first optimizer step: ValueError: boom" in text
    assert "recovery after attempt 1: crash before the first optimizer step: ValueError: boom" in text
    assert "None" not in text.split("requested")[0] and "(unknown)" not in text
    VALIDATOR.validate(build_document(run, [], []))


@pytest.mark.parametrize("text, plain", [
    ("cuda_oom at step 3", "cuda_oom after step 3"),
    ("rank 1: cuda_oom at step 2", "rank 1: cuda_oom after step 2"),
    ("crash at step None: x at step 4", "crash before the first optimizer step: x at step 4"),
    ("non-finite loss or gradient after step 5", "non-finite loss or gradient after step 5"),
])
def test_plain_steps(text, plain):
    assert plain_steps(text) == plain


def test_document_fields():
    events = [{"event": "change_not_applied", "knob": "lora_r", "expected": 8, "attempt": 2, "why": "saw 16"}] * 2
    doc = build_document(recovered_run(), events, [])
    VALIDATOR.validate(doc)
    assert doc["schema"] == "oomguard.report/1" and doc["status"] == "succeeded" and doc["exit_code"] == 0
    assert doc["root_cause"]["failure"] == OOM and doc["root_cause"]["attempt"] == 1
    a1, a2 = doc["attempts"]
    assert a1["failure"]["step"] == 2 and a2["failure"] is None and a2["resumed_from"] == "/x/checkpoint-2"
    knobs = {k["knob"]: k for k in doc["knobs"]}
    assert knobs["per_device_train_batch_size"] == {"knob": "per_device_train_batch_size", "requested": 8, "final": 4,
                                                    "changed": True, "verification": "verified"}
    assert knobs["gradient_accumulation_steps"]["verification"] == "unverified"
    assert knobs["max_seq_length"] == {"knob": "max_seq_length", "requested": 512, "final": 512,
                                       "changed": False, "verification": None}
    (rec,) = doc["recoveries"]
    assert rec["cost"] == {"steps_redone": 0, "seconds_to_next_step": None} and rec["rung"]["index"] == 1
    assert rec["reason"].startswith("CUDA OOM after step 2") and len(rec["changes"]) == 2
    assert doc["effective_batch"] == {"requested": 16, "final": 16, "kept": True, "world_size": 1}
    assert doc["tokens_cut"]["share"] is None and len(doc["not_applied"]) == 1


def test_invalid_documents_fail_the_schema():
    doc = build_document(recovered_run(), [], [])
    for breakage in (lambda d: d.update(schema="oomguard.report/2"),
                     lambda d: d.pop("attempts"),
                     lambda d: d["knobs"][0].update(verification="maybe"),
                     lambda d: d["recoveries"][0]["cost"].update(steps_redone="two"),
                     lambda d: d.update(status="exploded")):
        bad = copy.deepcopy(doc)
        breakage(bad)
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(bad)


def test_schema_is_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(REPORT_JSON_SCHEMA)
    assert REPORT_JSON_SCHEMA["$schema"].endswith("/draft/2020-12/schema")


def test_an_untested_stack_and_a_degraded_guard_part_are_in_the_summary_and_the_document():
    stack_event = {"event": "guard_stack", "attempt": 1, "tested": False, "versions": {"transformers": "4.46.3"},
                   "outside": ["transformers 4.46.3 is older than the tested 4.57-5.24"], "missing": [],
                   "degraded": []}
    degraded = {"event": "guard_degraded", "part": "exact resume position", "error": "AttributeError: x",
                "consequence": "the run resumes where transformers places it"}
    events = [stack_event, {**stack_event, "attempt": 2}, degraded]
    text = render_text(summarize_loaded(recovered_run(), events, []))
    assert text.count("guard stack: transformers 4.46.3 is older than the tested 4.57-5.24") == 1
    assert "guard degraded: exact resume position: AttributeError: x (the run resumes where" in text
    doc = build_document(recovered_run(), events, [])
    VALIDATOR.validate(doc)
    assert len(doc["guard_notes"]) == 2
    assert build_document(recovered_run(), [{**stack_event, "tested": True}], [])["guard_notes"] == []


GROW = {"action": "retry", "resume_from": "/x/checkpoint-6", "rung": None, "truncation_share": None,
        "reason": "grow back: batch 4 → 8 (accumulation 4 → 2) after 5 steps below 50 % of the cap (step peak at most "
                  "0.40 of 1.00 GiB): ...; the child stopped at step 6, resuming from checkpoint-6",
        "changes": [{"knob": "per_device_train_batch_size", "old": 4, "new": 8},
                    {"knob": "gradient_accumulation_steps", "old": 4, "new": 2}]}


def grown_run():
    return _run("succeeded", [
        _attempt(1, OOM, RETRY, max_step=2),
        _attempt(2, decision=GROW, knobs=HALVED, resumed="/x/checkpoint-2", max_step=6),
        _attempt(3, resumed="/x/checkpoint-6", max_step=10)])


def _grow_event(verified, why=None):
    return {"event": "grow_back", "attempt": 3, "verified": verified, "why": why, "knobs": dict(KNOBS),
            "changes": GROW["changes"], "resumed_from": "/x/checkpoint-6", "reason": GROW["reason"]}


def test_a_grow_back_is_listed_after_the_recoveries_with_the_childs_verdict():
    lines = render_text(summarize_loaded(grown_run(), [_grow_event(True)], [])).splitlines()
    assert "after 3 attempts, 1 recovery," in lines[0]  # a grow-back is no recovery
    [rec] = [i for i, line in enumerate(lines) if "recovery after attempt 1" in line]
    assert lines[rec + 1] == ("  grew back after attempt 2: batch 4 → 8 (accumulation 4 → 2) after 5 steps below "
                              "50 % of the cap (step peak at most 0.40 of 1.00 GiB): ...; the child stopped at step 6,"
                              " resuming from checkpoint-6 (in force in the child)")
    # Trust rule 3: "grew back" only where the child showed it
    text = render_text(summarize_loaded(grown_run(), [_grow_event(False, "per_device_train_batch_size: saw 4")], []))
    assert "  grow back after attempt 2: batch 4 → 8" in text and "(not applied: per_device_train_batch_size: saw 4)" \
        in text and "grew back" not in text
    text = render_text(summarize_loaded(grown_run(), [], []))
    assert "(not verified in the child: no grow_back verdict journaled for attempt 3)" in text
    stopped = _run("interrupted", grown_run()["attempts"][:2])
    assert "(not verified in the child: no later attempt ran it)" in render_text(summarize_loaded(stopped, [], []))


def test_the_document_lists_grow_backs():
    doc = build_document(grown_run(), [_grow_event(True)], [])
    VALIDATOR.validate(doc)
    assert len(doc["recoveries"]) == 1
    [grow] = doc["grow_backs"]
    assert grow == {"attempt": 2, "reason": GROW["reason"], "resumed_from": "/x/checkpoint-6",
                    "changes": GROW["changes"], "verified": True, "why": None,
                    "cost": {"steps_redone": 0, "seconds_to_next_step": None}}
    assert build_document(recovered_run(), [], [])["grow_backs"] == []
