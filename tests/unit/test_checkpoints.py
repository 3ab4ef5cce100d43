"""Checkpoint discovery: newest complete first; incomplete ones reported, never touched."""

import json
import struct

from oomguard import protocol
from oomguard.supervisor.checkpoints import (
    QUARANTINE_DIR,
    quarantine_after,
    quarantine_after_nan,
    safetensors_problem,
    scan_checkpoints,
)


def make(ck, step, *, state_step=None, weights=True, truncate=0):
    d = ck / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if weights:
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        data = struct.pack("<Q", len(header)) + header + b"\0" * 8
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) - truncate])
    for name in ("optimizer.pt", "scheduler.pt"):
        (d / name).write_bytes(b"x")
    if state_step is not False:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step if state_step is None else state_step}))
    return d


def test_newest_complete_first_and_problems_named(tmp_path):
    make(tmp_path, 2)
    make(tmp_path, 10)
    make(tmp_path, 4, truncate=3)
    make(tmp_path, 6, state_step=False)
    make(tmp_path, 8, state_step=7)
    scans = scan_checkpoints(tmp_path)
    assert [s.step for s in scans] == [10, 8, 6, 4, 2]
    assert [s.complete for s in scans] == [True, False, False, False, True]
    assert "truncated" in scans[3].problems[0]
    assert "trainer_state.json" in scans[2].problems[0]
    assert "global_step 7" in scans[1].problems[0]
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").exists()


def test_header_garbage_and_missing_weights(tmp_path):
    p = tmp_path / "a.safetensors"
    p.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    assert "exceeds" in safetensors_problem(p)
    make(tmp_path, 3, weights=False)
    assert "no weights file" in scan_checkpoints(tmp_path)[0].problems[0]
    assert scan_checkpoints(tmp_path / "missing") == []


def test_truncated_torch_zip_is_a_problem_but_a_legacy_file_is_not(tmp_path):
    import torch

    good = make(tmp_path, 2)
    torch.save({"state": {}, "param_groups": []}, good / "optimizer.pt")
    bad = make(tmp_path, 4)
    torch.save({"state": {0: torch.zeros(1000)}, "param_groups": []}, bad / "optimizer.pt")
    data = (bad / "optimizer.pt").read_bytes()
    (bad / "optimizer.pt").write_bytes(data[: len(data) // 2])
    scans = {s.step: s for s in scan_checkpoints(tmp_path)}
    assert scans[2].complete  # b"x" scheduler.pt: not a zip, passed
    assert not scans[4].complete and "optimizer.pt is truncated" in scans[4].problems[0]
    assert "adapter_config.json missing" in scans[2].warnings[0]


def test_quarantine_moves_newer_checkpoints_and_never_deletes(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step)
    moved = quarantine_after(tmp_path, 2)
    assert sorted(q.step for q in moved) == [4, 6]
    assert [s.step for s in scan_checkpoints(tmp_path)] == [2]
    assert (tmp_path / QUARANTINE_DIR / "checkpoint-4" / "adapter_model.safetensors").exists()
    make(tmp_path, 4)  # written again after a rollback, then bad again: both copies kept
    [again] = quarantine_after(tmp_path, 3)
    assert again.moved_to.name == "checkpoint-4.2" and (tmp_path / QUARANTINE_DIR / "checkpoint-4").exists()


def test_quarantine_after_nan_reads_the_last_finite_step(tmp_path):
    ck, err = tmp_path / "ck", tmp_path / "attempts" / "001" / protocol.ERROR_JSON
    for step in (2, 3, 4):
        make(ck, step)
    protocol.write_error_record(err, protocol.ErrorRecord(kind=protocol.FailureKind.NAN_LOSS, step=4,
                                                          last_finite_step=2))
    protocol.write_error_record(err, protocol.ErrorRecord(kind=protocol.FailureKind.NAN_LOSS, step=4, rank=1,
                                                          last_finite_step=3))
    emitted = []
    moved = quarantine_after_nan(ck, err, 4, lambda name, **f: emitted.append((name, f)))
    assert sorted(q.step for q in moved) == [3, 4]  # the lowest rank's last finite step wins
    assert [e[0] for e in emitted] == ["checkpoint_quarantined"] * 2
    assert {e[1]["step"] for e in emitted} == {3, 4} and emitted[0][1]["last_finite_step"] == 2
    # no record: the failure's step decides; no step at all: nothing is known to be bad
    assert quarantine_after_nan(ck, tmp_path / "none.json", None, lambda *a, **k: None) == []
    assert quarantine_after_nan(ck, tmp_path / "none.json", 1, lambda *a, **k: None)[0].step == 2
