"""The event catalogue (oomguard/protocol/events.py): complete, emitted, and enforced."""

import re
from pathlib import Path

import pytest

from oomguard import protocol as p
from oomguard.protocol import CATALOGUE, Event, EventSource, check_event

SRC = Path(__file__).resolve().parents[2] / "oomguard"
# the writers' call shapes: Journal.emit / journal.event / EventWriter.emit / emit(...) / emit_event(run_dir, ...)
_CALL = re.compile(r"(?<!\w)(?:emit|event|emit_event)\(\s*(?:#[^\n]*\n\s*)?(?:[\w.]*run_dir\s*,\s*)?([^,)\s]+)")
_CONST = re.compile(r"^(EVENT_\w+)\s*=\s*[\"'](\w+)[\"']", re.M)
# emitted through a variable: the event the writer picks at run time, and the file that picks it
DYNAMIC = {Event.CHANGE_VERIFIED: "supervisor/recipe.py", Event.CHANGE_NOT_APPLIED: "supervisor/recipe.py"}


def _sources() -> dict[str, str]:
    return {str(f.relative_to(SRC)): f.read_text() for f in SRC.rglob("*.py")
            if not str(f.relative_to(SRC)).startswith("protocol")}


def _emitted() -> set[str]:
    sources = _sources()
    constants = {name: value for text in sources.values() for name, value in _CONST.findall(text)}
    constants.update({name: getattr(p, name) for name in dir(p) if name.startswith("EVENT_")})
    found = set()
    for text in sources.values():
        for arg in _CALL.findall(text):
            if m := re.fullmatch(r"[\"'](\w+)[\"']", arg):
                found.add(m.group(1))
            elif m := re.search(r"Event\.([A-Z_]+)(?:\.value)?$", arg):
                found.add(Event[m.group(1)].value)
            elif (name := arg.rsplit(".", 1)[-1]) in constants:
                found.add(constants[name])
    for event, path in DYNAMIC.items():
        if re.search(rf"\bEVENT_{event.name}\b|Event\.{event.name}\b", sources[path]):
            found.add(event.value)
    return found


def test_every_event_has_a_source_and_a_payload():
    assert set(CATALOGUE) == set(Event)
    for event, spec in CATALOGUE.items():
        assert isinstance(spec.source, EventSource) and spec.about, event
        assert all(f.types for f in spec.payload.fields), event


def test_every_catalogued_event_is_emitted_by_oomguard_and_every_emitted_name_is_catalogued():
    emitted = _emitted()
    assert emitted, "the writer pattern found no emission: update _CALL to the writers' shape"
    assert sorted(emitted - set(Event._value2member_map_)) == [], "emitted but not in the catalogue"
    assert sorted(e.value for e in Event if e.value not in emitted) == [], "catalogued but emitted nowhere"


def test_the_old_constants_name_catalogued_events():
    for const in ("EVENT_STEP", "EVENT_TRAINER_LOG", "EVENT_RECIPE_OBSERVED", "EVENT_BOOTSTRAP_TRAINER",
                  "EVENT_CHANGE_VERIFIED", "EVENT_CHANGE_NOT_APPLIED"):
        assert getattr(p, const) in Event._value2member_map_


def _step(**over):
    return {"time": 1.0, "event": "step", "source": "child", "rank": 0, "step": 3, "max_steps": 10,
            "epoch": 0.5, "attempt": 1, **over}


def test_check_event_accepts_a_conforming_line():
    assert check_event(_step()) == []
    assert check_event(_step(max_steps=None, epoch=None)) == []
    assert check_event(_step(epoch=1)) == []  # an int is a float


@pytest.mark.parametrize("line,problem", [
    ({"time": 1.0, "event": "heartbeat_step", "source": "child", "step": 1}, "unknown event 'heartbeat_step'"),
    ({k: v for k, v in _step().items() if k != "attempt"}, "missing field 'attempt'"),
    (_step(step="3"), "field 'step' is str"),
    (_step(step=True), "field 'step' is bool"),
    (_step(max_steps=2.5), "field 'max_steps' is float"),
    (_step(loss=0.1), "fields ['loss'] are not in its payload"),
    (_step(source="supervisor"), "the catalogue says 'child'"),
    (_step(time="yesterday"), "field 'time' is str"),
])
def test_check_event_names_the_problem(line, problem):
    problems = check_event(line)
    assert any(problem in text for text in problems), problems


def test_an_open_payload_takes_more_fields_but_still_checks_its_own():
    line = {"time": 1.0, "event": "fault_injected", "source": "child", "rank": 0, "step": 2, "fault": "nan",
            "key": "nan@step=2", "value": "nan"}
    assert check_event(line) == []
    assert "missing field 'key'" in check_event({k: v for k, v in line.items() if k != "key"})[0]


def test_emit_event_adds_the_source_and_is_strict_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(p.ENV_STRICT_EVENTS, raising=False)
    p.emit_event(tmp_path, "step", rank=0, step=1, max_steps=None, epoch=None, attempt=1)
    p.emit_event(tmp_path, "no_such_event", rank=0)  # production: written, never raised
    lines = list(p.read_jsonl(tmp_path / p.EVENTS_JSONL))
    assert lines[0]["source"] == "child" and check_event(lines[0]) == []
    assert lines[1]["event"] == "no_such_event"
    monkeypatch.setenv(p.ENV_STRICT_EVENTS, "1")
    with pytest.raises(ValueError, match="unknown event 'no_such_event'"):
        p.emit_event(tmp_path, "no_such_event", rank=0)
    with pytest.raises(ValueError, match="missing field 'attempt'"):
        p.emit_event(tmp_path, Event.STEP, rank=0, step=1, max_steps=None, epoch=None)
    assert len(list(p.read_jsonl(tmp_path / p.EVENTS_JSONL))) == 2  # a refused line is not written


def test_a_shape_checked_once_is_not_checked_again_but_another_shape_is(monkeypatch):
    """event_record remembers the clean shapes (names, value types, source) it checked: the per-step event
    skips the check, and a line of the same event with a value of another type is still refused."""
    monkeypatch.setenv(p.ENV_STRICT_EVENTS, "1")
    calls = []
    real = p.events.check_event
    monkeypatch.setattr(p.events, "check_event", lambda obj: calls.append(obj["event"]) or real(obj))
    fields = dict(rank=0, max_steps=None, epoch=0.5, attempt=1)
    for step in (11, 12, 13):
        assert p.event_record("step", step=step, **fields)["step"] == step
    assert len(calls) <= 1  # once (or never, where an earlier test checked this shape)
    with pytest.raises(ValueError, match="field 'step' is str"):
        p.event_record("step", step="14", **fields)
    with pytest.raises(ValueError, match="source 'supervisor'"):
        p.event_record("step", step=15, source="supervisor", **fields)


def test_payload_spec_refuses_an_unknown_type():
    with pytest.raises(ValueError, match="unknown type"):
        p.Payload.parse("step:integer")
