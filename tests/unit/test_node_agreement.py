"""Several nodes: which node a supervisor is (nodes.py), the shared-dir agreement (cluster.py), and the
leader's and a follower's loop (node_loop.py) with the fake launcher and clock: no subprocess, no torch.
The real thing (two torchrun agents, 4 ranks) is tests/integration/test_nodes.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from _loop_fakes import BATCH, Child, FakeClock, FakeLauncher, make_spec, read_run, write_checkpoint

from oomguard.errors import ExitCode, UsageError
from oomguard.protocol import ENV_STRICT_EVENTS, ErrorRecord, FailureKind, Phase
from oomguard.supervisor.cluster import AttemptWatch, Cluster, NodeEnd, NodePlan, PeerStop, Verdict, common_checkpoint
from oomguard.supervisor.loop import supervise
from oomguard.supervisor.nodes import NodeRole, node_role
from oomguard.supervisor.process import StopFlag

TORCHRUN = ["torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "train.py"]


@pytest.fixture(autouse=True)
def strict_events(monkeypatch):
    monkeypatch.setenv(ENV_STRICT_EVENTS, "1")


# ---- which node ------------------------------------------------------------------------------------

def test_one_node_changes_nothing(tmp_path):
    assert node_role(tmp_path, ["torchrun", "--nproc-per-node", "2", "train.py"], {}) is None
    # torchrun without --nnodes runs one node, whatever the SLURM allocation says
    assert node_role(tmp_path, ["torchrun", "--nproc-per-node", "2", "t.py"], {"SLURM_NNODES": "4",
                                                                                "SLURM_NODEID": "2"}) is None
    assert node_role(tmp_path, ["python", "train.py"], {}) is None
    # SLURM names the node, never the count: a one-node command in a 2-node allocation stays one node
    assert node_role(tmp_path, ["accelerate", "launch", "t.py"], {"SLURM_NNODES": "2", "SLURM_NODEID": "1"}) is None


@pytest.mark.parametrize("command, env, rank, source", [
    ([*TORCHRUN[:1], "--node-rank", "1", *TORCHRUN[1:]], {}, 1, "the command's launcher flags"),
    ([*TORCHRUN[:1], "--node_rank=1", *TORCHRUN[1:]], {}, 1, "the command's launcher flags"),
    (TORCHRUN, {"PET_NODE_RANK": "1"}, 1, "torchrun's PET_NNODES/PET_NODE_RANK"),
    (TORCHRUN, {"SLURM_NODEID": "1"}, 1, "SLURM_NODEID"),
    (["accelerate", "launch", "--num_machines", "2", "--machine_rank", "1", "t.py"], {}, 1,
     "the command's launcher flags"),
])
def test_node_rank_and_count_from_the_command_or_its_environment(tmp_path, command, env, rank, source):
    role = node_role(tmp_path / "job", command, env)
    assert (role.rank, role.count, role.leader) == (rank, 2, rank == 0)
    assert role.run_dir == tmp_path / "job" / "node-1" and role.cluster_dir == tmp_path / "job" / "cluster"
    assert source in role.source


def test_the_explicit_options_win_and_must_agree_with_the_command(tmp_path):
    role = node_role(tmp_path, TORCHRUN, {"SLURM_NODEID": "1"}, node_rank=0, nnodes=2)
    assert (role.rank, role.count, role.source) == (0, 2, "count: --nnodes; rank: --node-rank")
    # accelerate with its machines in a config file: --nnodes says the count, SLURM the rank
    config = node_role(tmp_path, ["accelerate", "launch", "t.py"], {"SLURM_NODEID": "1"}, nnodes=2)
    assert (config.rank, config.count, config.source) == (1, 2, "count: --nnodes; rank: SLURM_NODEID")
    with pytest.raises(UsageError, match="--nnodes 3 but the command says 2"):
        node_role(tmp_path, TORCHRUN, {}, node_rank=0, nnodes=3)


@pytest.mark.parametrize("command, env, kw, match", [
    (TORCHRUN, {}, {}, "cannot tell which node this is: pass `oomguard run --node-rank K`"),
    (TORCHRUN, {"SLURM_NODEID": "2"}, {}, "node rank 2 .* is not below the node count 2"),
    (["torchrun", "--nnodes", "1:4", "t.py"], {"SLURM_NODEID": "0"}, {}, "elastic node count '1:4'"),
    (["torchrun", "--nnodes", "two", "t.py"], {}, {}, "not a whole number"),
    (TORCHRUN, {"SLURM_NODEID": "0"}, {"explicit_dir": False}, "the same --run-dir"),
    (TORCHRUN, {}, {"node_rank": -1}, "node ranks run from 0"),
    (TORCHRUN, {}, {"nnodes": 0}, "1 or more"),
])
def test_what_cannot_be_a_node_of_a_job_is_refused_with_the_fix(tmp_path, command, env, kw, match):
    with pytest.raises(UsageError, match=match):
        node_role(tmp_path, command, env, **kw)


def test_a_fixed_elastic_range_is_a_count_and_a_one_node_run_dir_is_refused(tmp_path):
    assert node_role(tmp_path, ["torchrun", "--nnodes", "2:2", "t.py"], {"SLURM_NODEID": "1"}).count == 2
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(UsageError, match="holds a one-node run"):
        node_role(tmp_path, TORCHRUN, {"SLURM_NODEID": "1"})


# ---- the agreement files ---------------------------------------------------------------------------

def _cluster(tmp_path: Path, rank: int, clock: FakeClock | None = None, timeout_s: float = 5.0) -> Cluster:
    return Cluster(NodeRole(rank=rank, count=2, job_dir=tmp_path, source="test"), timeout_s, clock or FakeClock())


def test_the_checkpoint_every_node_can_resume_from(tmp_path):
    ck = str(tmp_path / "checkpoint-6")
    shared = {0: NodeEnd(0, 1, True, checkpoints=[2, 4, 6]), 1: NodeEnd(1, 1, False, checkpoints=[2, 4, 6])}
    assert common_checkpoint(ck, shared) == (ck, None)
    apart = {0: NodeEnd(0, 1, True, checkpoints=[2, 4, 6]), 1: NodeEnd(1, 1, False, checkpoints=[2, 4])}
    chosen, why = common_checkpoint(ck, apart)
    assert chosen == str(tmp_path / "checkpoint-4") and "not complete on node 1" in why
    none = {0: NodeEnd(0, 1, True, checkpoints=[6]), 1: NodeEnd(1, 1, False, checkpoints=[])}
    assert common_checkpoint(ck, none)[0] is None
    unknown = {0: NodeEnd(0, 1, True, checkpoints=[6]), 1: NodeEnd(1, 1, False, checkpoints=None)}
    assert common_checkpoint(ck, unknown) == (ck, None)  # a node that does not know where it saves does not veto


def test_a_peer_is_lost_on_the_readers_clock_never_by_comparing_hosts_clocks(tmp_path):
    clock = FakeClock()
    leader, follower = _cluster(tmp_path, 0), _cluster(tmp_path, 1, clock)
    assert follower.lost(0) is None
    clock.sleep(6)
    assert "node 0's supervisor never came up" in follower.lost(0)
    leader._beat()
    assert follower.lost(0) is None  # it came: the clock starts again
    clock.sleep(4)
    leader._beat()
    assert follower.lost(0) is None  # it beat: seen changed now
    clock.sleep(4)
    assert follower.lost(0) is None
    clock.sleep(2)
    assert "stopped beating 6 s ago" in follower.lost(0)
    leader._beat(ended=3)  # a session it saw alive ended: lost at once
    assert "ended (exit 3)" in follower.lost(0)


def test_an_ended_beat_of_an_earlier_run_only_waits_for_the_next_supervisor(tmp_path):
    _cluster(tmp_path, 0)._beat(ended=75)  # the last run of the job, before the requeue
    clock = FakeClock()
    follower = _cluster(tmp_path, 1, clock)
    assert follower.lost(0) is None and follower.leader_session() is None
    clock.sleep(6)
    assert "stopped beating" in follower.lost(0)


def test_a_follower_takes_only_the_live_leaders_open_plan(tmp_path):
    old, new = _cluster(tmp_path, 0), _cluster(tmp_path, 0)
    old.session, new.session = "old", "new"
    new._beat()
    old.publish_plan(NodePlan(attempt=1, session="old", config={}, orders={}))
    new.publish_plan(NodePlan(attempt=2, session="new", config={BATCH: 2}, orders={BATCH: 2}))
    new.publish_plan(NodePlan(attempt=3, session="new", config={}, orders={}))
    new.publish_verdict(Verdict(2, "abandoned"))
    follower = _cluster(tmp_path, 1)
    plan = follower.next_plan(0, stopped=lambda: False)
    assert plan.attempt == 3 and plan.session == "new"
    assert follower.next_plan(3, stopped=lambda: True) is None  # nothing newer: the stop ends the wait


def test_a_peer_failure_stops_this_nodes_child_after_the_grace_a_lost_node_at_once(tmp_path):
    clock = FakeClock()
    me, peer = _cluster(tmp_path, 0, clock), _cluster(tmp_path, 1)
    peer._beat()
    stop = PeerStop(StopFlag())
    watch = AttemptWatch(me, 1, stop)
    watch.tick()
    assert not stop.is_set
    peer.publish_end(NodeEnd(1, 1, False, failure={"kind": "cuda_oom", "step": 2}))
    clock.sleep(1)
    watch.tick()
    assert stop.peer is None  # the rendezvous usually ends our part first
    clock.sleep(me.peer_stop_s + 1)
    peer._beat()
    watch.tick()
    assert "node 1's part of attempt 1 ended (cuda_oom at step 2)" in stop.peer
    assert stop.is_set and stop.signum == signal.SIGTERM and stop.forward == signal.SIGTERM
    # the supervisor's own signal still reads through (and wins)
    own = StopFlag()
    both = PeerStop(own)
    both.peer = "x"
    both.set(signal.SIGUSR1)
    assert own.signum == both.signum == signal.SIGUSR1


# ---- the loops, with the fake child ----------------------------------------------------------------

def _node_spec(tmp_path: Path, rank: int, **over):
    role = NodeRole(rank=rank, count=2, job_dir=tmp_path / "job", source="test")
    return make_spec(tmp_path, run_dir=role.run_dir, node=role, node_timeout_s=5.0, world_size=4, **over)


def test_a_follower_without_a_leader_ends_with_node_lost_and_says_how_to_go_on(tmp_path):
    spec = _node_spec(tmp_path, 1)
    launcher = FakeLauncher(spec.checkpoint_dir, [])
    assert supervise(spec, launch=launcher, clock=FakeClock()) == ExitCode.NODE_LOST
    run = read_run(spec)
    assert launcher.launched == [] and (run["status"], run["exit_code"]) == ("failed", 7)
    assert "node 0's supervisor never came up" in run["root_cause"]
    assert f"oomguard run --run-dir {tmp_path / 'job'}" in run["root_cause"]
    beat = json.loads((tmp_path / "job" / "cluster" / "node-1.json").read_text())
    assert beat["ended"] == 7  # the others need not wait for the timeout


class _WithFollower(FakeLauncher):
    """The leader's child, while node 1's supervisor is played beside it: on attempt 1 its rank 3 OOMs
    (its record and failure come with its end), on attempt 2 it trains to the end."""

    def __init__(self, out: Path, script, job: Path):
        super().__init__(out, script)
        self.node1 = Cluster(NodeRole(rank=1, count=2, job_dir=job, source="test"), 5.0, FakeClock())

    def __call__(self, argv, env, attempt_dir, watch, stop, on_tick=None, on_start=None):
        outcome = super().__call__(argv, env, attempt_dir, watch, stop, on_tick, on_start)
        n = len(self.launched)
        self.node1._beat()
        oom = ErrorRecord(kind=FailureKind.CUDA_OOM, phase=Phase.FORWARD_BACKWARD, step=2, detail="CUDA out of memory",
                          rank=3)
        end = NodeEnd(1, n, True, exit_code=0, checkpoints=[2]) if n > 1 else NodeEnd(
            1, n, False, exit_code=1, failure={"kind": "cuda_oom", "step": 2, "phase": "forward_backward",
                                               "detail": "CUDA out of memory", "rank": 3},
            records=[oom.to_dict()], checkpoints=[2])
        self.node1.publish_end(end)
        return outcome


def test_the_leader_decides_from_every_nodes_records_and_publishes_the_plan(tmp_path):
    spec = _node_spec(tmp_path, 0)
    peer_lost = Child(steps=2, saves=[2], fail=FailureKind.CRASH, detail="RuntimeError: Connection closed by peer")
    launcher = _WithFollower(spec.checkpoint_dir, [peer_lost, Child(steps=2)], tmp_path / "job")
    assert supervise(spec, launch=launcher, clock=FakeClock()) == ExitCode.SUCCESS
    first = read_run(spec)["attempts"][0]
    # rank 3's OOM on node 1 is the root cause, not node 0's "connection closed by peer"
    assert (first["failure"]["kind"], first["failure"]["rank"]) == ("cuda_oom", 3)
    assert (spec.run_dir / "attempts" / "001" / "error.rank3.json").is_file()
    cluster = Cluster(spec.node, 5.0, FakeClock())
    plan = cluster.read_plan(2)
    assert plan.config[BATCH] == 4 and plan.orders[BATCH] == 4 and plan.resume_from.endswith("checkpoint-2")
    assert cluster.read_verdict(1).outcome == "retry" and cluster.read_verdict(1).failure["rank"] == 3
    end = cluster.read_verdict(2)
    assert (end.outcome, end.status, end.exit_code) == ("end", "succeeded", 0)
    assert launcher.launched[1].env["OOMGUARD_RESUME_FROM"].endswith("checkpoint-2")


def test_a_leader_whose_follower_never_comes_ends_with_node_lost(tmp_path):
    spec = _node_spec(tmp_path, 0)
    write_checkpoint(spec.checkpoint_dir, 2)
    launcher = FakeLauncher(spec.checkpoint_dir, [Child(steps=2)])
    assert supervise(spec, launch=launcher, clock=FakeClock()) == ExitCode.NODE_LOST
    run = read_run(spec)
    assert "node 1's supervisor never came up" in run["root_cause"]
    verdict = Cluster(spec.node, 5.0, FakeClock()).read_verdict(1)
    assert (verdict.outcome, verdict.exit_code) == ("end", 7)  # a third node would hear it too


def test_a_follower_ends_with_a_job_end_of_a_leader_it_saw_never_with_a_stale_one(tmp_path):
    stale = _cluster(tmp_path, 0)
    stale.session = "last-run"
    stale.publish_verdict(Verdict(2, "end", status="interrupted", exit_code=75))
    stale._beat(ended=75)
    follower = _cluster(tmp_path, 1)
    assert follower.next_plan(0, stopped=lambda: True) is None  # the last run's end is not this run's
    leader = _cluster(tmp_path, 0)
    leader._beat()
    assert follower.next_plan(0, stopped=lambda: True) is None  # seen alive now; nothing for us yet
    leader.publish_verdict(Verdict(3, "end", status="gave_up", exit_code=3, root_cause="ladder exhausted"))
    leader._beat(ended=3)
    got = follower.next_plan(0, stopped=lambda: True)
    assert isinstance(got, Verdict) and (got.attempt, got.exit_code, got.session) == (3, 3, leader.session)


def test_a_child_killed_by_the_signal_the_supervisor_got_is_interrupted_not_a_crash(tmp_path):
    """SLURM signals every process of a step: SIGUSR1 ends torchrun's agent (no handler by default) at the
    moment the supervisor gets it. One node or several, that is the scheduler's stop (exit 75), not a crash."""
    from oomguard.supervisor.process import ChildOutcome

    def killed(argv, env, attempt_dir, watch, stop, on_tick=None, on_start=None):
        stop.set(signal.SIGUSR1)
        return ChildOutcome(exit_code=None, signal=int(signal.SIGUSR1), hung=False, interrupted_by=None,
                            duration_s=0.1, host_mem_peak_percent=0.0, stderr_tail="", pids=frozenset())

    spec = make_spec(tmp_path)
    assert supervise(spec, launch=killed, clock=FakeClock()) == ExitCode.REQUEUE
    run = read_run(spec)
    assert run["status"] == "interrupted" and run["attempts"][0]["failure"] is None
    assert run["attempts"][0]["decision"] is None and run["root_cause"] == "interrupted by SIGUSR1"
