"""Several ranks in one child: which one failed first and why, world size, per-rank heartbeats."""

from __future__ import annotations

import signal

from oomguard.protocol import ErrorRecord, FailureKind, Phase
from oomguard.supervisor.classify import classify
from oomguard.supervisor.command import world_size_of
from oomguard.supervisor.process import ChildOutcome
from oomguard.supervisor.ranks import (
    first_failed_worker,
    peer_lost,
    rank_of_heartbeat,
    rank_records,
    root_cause_text,
    root_record,
)

GLOO_PEER = ("builtins.RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
             "peer [127.0.0.1]:29855. This is typically caused by a remote worker crashing.")
NCCL_PEER = "torch.distributed.DistBackendError: NCCL communicator was aborted on rank 0."

# torchrun's own report, as torch 2.13's elastic agent prints it (trimmed)
TORCHRUN_TAIL = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-25_21:43:42
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 21190)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 21190
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-25_21:43:42
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 21191)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def rec(kind: FailureKind, rank: int, t: float, detail: str = "", step: int = 2) -> ErrorRecord:
    return ErrorRecord(kind=kind, phase=Phase.FORWARD_BACKWARD, step=step, detail=detail, rank=rank, time=t)


def outcome(rc=1, sig=None, stderr="", mem=10.0, hung=False, ages=None):
    return ChildOutcome(exit_code=rc, signal=sig, hung=hung, interrupted_by=None, duration_s=1.0,
                        host_mem_peak_percent=mem, stderr_tail=stderr, pids=frozenset(), heartbeat_ages=ages or {})


def test_peer_lost_is_a_symptom_not_a_root_cause():
    oom = rec(FailureKind.CUDA_OOM, 1, 20.0, "torch.OutOfMemoryError: CUDA out of memory")
    peer = rec(FailureKind.CRASH, 0, 10.0, GLOO_PEER)  # written first (the OOM rank was still saving)
    assert peer_lost(peer) and not peer_lost(oom)
    assert peer_lost(rec(FailureKind.CRASH, 0, 1.0, NCCL_PEER))
    assert not peer_lost(rec(FailureKind.CUDA_OOM, 0, 1.0, GLOO_PEER))  # an OOM is never a symptom
    assert root_record([peer, oom]) is oom
    assert root_record([peer]) is peer and root_record([]) is None
    crash = rec(FailureKind.CRASH, 1, 5.0, "ValueError: bad row")
    assert root_record([crash, oom]) is crash  # earliest real cause wins
    f = classify(outcome(), [peer, oom], host_oom_percent=90)
    assert (f.kind, f.rank, f.step) == (FailureKind.CUDA_OOM, 1, 2)
    assert [r["rank"] for r in rank_records([peer, oom])] == [1, 0]
    assert [r["symptom"] for r in rank_records([peer, oom])] == [False, True]


def test_torchrun_report_names_the_first_failed_worker():
    w = first_failed_worker(TORCHRUN_TAIL.format(code="-9"))
    assert (w.rank, w.local_rank, w.exit_code, w.signal) == (1, 1, -9, signal.SIGKILL)
    assert "rank 1 was killed by SIGKILL" in w.describe()
    assert first_failed_worker(TORCHRUN_TAIL.format(code="1")).describe().startswith("rank 1 exited with code 1")
    assert first_failed_worker("Traceback: ValueError") is None


def test_a_rank_killed_by_the_oom_killer_under_torchrun_is_host_oom_on_that_rank():
    # torchrun itself exits 1; only its report says rank 1 got SIGKILL; rank 0 recorded the lost peer
    stderr = TORCHRUN_TAIL.format(code="-9")
    peer = rec(FailureKind.CRASH, 0, 10.0, GLOO_PEER)
    f = classify(outcome(rc=1, stderr=stderr, mem=97.0), [peer], host_oom_percent=90, last_step=7)
    assert (f.kind, f.rank, f.step) == (FailureKind.HOST_OOM, 1, 7)
    f = classify(outcome(rc=1, stderr=stderr, mem=20.0), [], host_oom_percent=90, last_step=7)
    assert (f.kind, f.rank) == (FailureKind.CRASH, 1) and "rank 1 was killed by SIGKILL" in f.detail
    # a native OOM that wrote no record (bitsandbytes calls exit(1)) is still an OOM of the rank torchrun names
    f = classify(outcome(stderr="Error out of memory at line 380 in file ops.cu\n" + TORCHRUN_TAIL.format(code="1")),
                 [peer], host_oom_percent=90, last_step=3)
    assert (f.kind, f.rank) == (FailureKind.CUDA_OOM, 1)
    # only a symptom and no other evidence: the symptom's own words, not an invented cause
    f = classify(outcome(stderr="exit"), [peer], host_oom_percent=90)
    assert (f.kind, f.rank) == (FailureKind.CRASH, 0) and "Connection closed" in f.detail


def test_hang_detail_lists_heartbeat_ages_per_rank():
    f = classify(outcome(rc=None, sig=signal.SIGKILL, hung=True, ages={0: 6.2, 1: 9.0}), [],
                 host_oom_percent=90, last_step=2)
    assert f.kind == FailureKind.HANG and "rank 0 6" in f.detail and "rank 1 9" in f.detail


def test_root_cause_names_the_rank_only_for_several_processes():
    failure = {"kind": "cuda_oom", "step": 3, "rank": 1}
    assert root_cause_text(failure, 2) == "rank 1: cuda_oom at step 3"
    assert root_cause_text(failure, 1) == "cuda_oom at step 3"
    assert root_cause_text(None, 2) is None


def test_world_size_of_launchers():
    assert world_size_of(["torchrun", "--nproc-per-node", "2", "t.py"]) == 2
    assert world_size_of(["torchrun", "--nproc_per_node=4", "--nnodes", "2", "t.py"]) == 8
    assert world_size_of(["torchrun", "--nnodes=1:3", "--nproc_per_node", "2", "t.py"]) == 6  # elastic: the most
    assert world_size_of(["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "t.py"]) == 2
    assert world_size_of(["accelerate", "launch", "--num_processes", "2", "t.py"]) == 2
    assert world_size_of(["accelerate", "launch", "--num-processes", "3", "t.py"]) == 3
    assert world_size_of(["torchrun", "--nproc_per_node", "gpu", "t.py"]) == 1  # not countable here


def test_heartbeat_file_names_map_to_ranks():
    # the per-rank staleness itself is timed on the supervisor's monotonic clock:
    # tests/unit/test_process_reliability.py::test_one_rank_that_stops_beating_is_a_hang
    assert [rank_of_heartbeat(n) for n in ("heartbeat", "heartbeat.rank3", "heartbeat.tmp")] == [0, 3, None]

