"""Checkpoint discovery: newest complete first; incomplete ones reported, never touched."""

import json
import struct

from oomguard.supervisor.checkpoints import safetensors_problem, scan_checkpoints


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
