"""Sharded checkpoints (issue 21, CPU part): the supervisor's scan reads FSDP's torch.distributed.checkpoint
folders as written by torch's own DCP writer on two real gloo ranks (FSDP2 ``fully_shard``), finds a
missing or cut shard (a resume starts only from a complete one). DeepSpeed's
layout is checked from files in its naming (DeepSpeed itself is not installed here)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from oomguard.supervisor.checkpoints import scan_checkpoints
from oomguard.supervisor.sharded import find_layout, read_dcp_storage

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OOMGUARD_RUN_DIR", None)
    # This only makes real DCP folders for the scan to read. In two of about six full-suite runs on the 2-core box
    # (session 7, with other torchrun tests on the other worker), rank 0 died of gloo's "terminate called without an
    # active exception" (SIGABRT): a fresh try with a fresh output dir, once, and both stderrs if that fails too.
    tails = []
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp(f"fsdp{attempt}") / "out"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(HERE / "_fsdp_dcp_script.py"), str(out), "4", "2"],
                              capture_output=True, text=True, timeout=240, env=env)
        if proc.returncode == 0:
            return out
        tails.append(proc.stderr[-3000:])
        if "terminate called without an active exception" not in proc.stderr:
            break
    raise AssertionError("\n--- next try ---\n".join(tails))


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_whole_fsdp_checkpoint_scans_complete_and_names_its_shards(fsdp_run):
    scans = scan_checkpoints(fsdp_run)
    assert [s.step for s in scans] == [4, 2]
    assert all(s.complete for s in scans), [s.problems for s in scans]
    assert not any("optimizer" in w for s in scans for w in s.warnings)  # it is in optimizer_0/
    layout = find_layout(fsdp_run / "checkpoint-4")
    assert layout.kind == "fsdp" and layout.ranks == 2 and layout.holds_weights
    assert [d.name for d in layout.dirs] == ["optimizer_0", "pytorch_model_fsdp_0"]
    # both ranks wrote a data file, and the metadata accounts for every byte of each
    storage = read_dcp_storage(fsdp_run / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata")
    assert sorted(storage) == ["__0_0.distcp", "__1_0.distcp"]
    for name, needed in storage.items():
        assert (fsdp_run / "checkpoint-4" / "pytorch_model_fsdp_0" / name).stat().st_size == needed


def test_a_cut_or_missing_shard_is_found_and_the_resume_takes_the_older_whole_checkpoint(fsdp_run, tmp_path):
    out = copy_tree(fsdp_run, tmp_path / "out")
    shard = out / "checkpoint-4" / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # rank 1's write cut short
    newest, older = scan_checkpoints(out)
    assert not newest.complete and older.complete  # a resume takes only complete ones: checkpoint-2
    assert any("pytorch_model_fsdp_0/__1_0.distcp is truncated (100 of" in p for p in newest.problems), newest.problems

    (out / "checkpoint-2" / "optimizer_0" / "__0_0.distcp").unlink()
    assert any("optimizer_0/__0_0.distcp missing" in p for p in scan_checkpoints(out)[1].problems)

    (out / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata").unlink()  # the coordinator never finished
    assert any(".metadata missing" in p for p in scan_checkpoints(out)[0].problems)


def test_the_metadata_reader_runs_no_code_from_the_file(tmp_path):
    """A pickle whose reduce would run a shell command builds an inert object instead."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / ".metadata"
    bad.write_bytes(pickle.dumps({"storage_data": Evil()}))
    with pytest.raises(ValueError, match="no storage_data"):
        read_dcp_storage(bad)
    assert not marker.exists()
    (tmp_path / "junk").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        read_dcp_storage(tmp_path / "junk")


def _deepspeed_checkpoint(root: Path, ranks: int, step: int = 6) -> Path:
    import json

    import torch

    ckpt = root / f"checkpoint-{step}"
    tag = ckpt / f"global_step{step}"
    tag.mkdir(parents=True)
    torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
    for r in range(ranks):
        torch.save({"optimizer_state_dict": {"r": r}}, tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"rank": r}, ckpt / f"rng_state_{r}.pth")
    (ckpt / "latest").write_text(f"global_step{step}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({}, ckpt / "scheduler.pt")
    return ckpt


def test_deepspeed_layout_every_rank_shard_and_latest(tmp_path):
    ckpt = _deepspeed_checkpoint(tmp_path, ranks=2)
    (scan,) = scan_checkpoints(tmp_path)
    assert scan.complete, scan.problems
    (ckpt / "global_step6" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert any("optimizer shards of rank(s) 1 missing" in p for p in scan_checkpoints(tmp_path)[0].problems)
    (ckpt / "latest").write_text("global_step8")
    assert any("latest names 'global_step8'" in p for p in scan_checkpoints(tmp_path)[0].problems)


def test_deepspeed_shard_cut_inside_fails_its_zip_check(tmp_path):
    ckpt = _deepspeed_checkpoint(tmp_path, ranks=2)
    shard = ckpt / "global_step6" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-30])
    (scan,) = scan_checkpoints(tmp_path)
    assert any("global_step6/bf16_zero_pp_rank_0" in p and "truncated" in p for p in scan.problems), scan.problems
