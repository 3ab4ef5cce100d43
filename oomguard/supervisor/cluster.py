"""How the supervisors of a multi-node job agree: small JSON files in the job's shared dir, written
atomically (``protocol.atomic_write_json``: tmp, fsync, rename; NFS and Lustre rename atomically).
No network protocol of oomguard's own: the cluster filesystem is the channel.

``D/cluster/`` (``nodes.NodeRole.cluster_dir``)::

    node-K.json                    node K's supervisor is alive: rewritten every BEAT_S by a thread
                                   (session, pid, host, a counter; ``ended`` once it exited)
    attempt-NNN/plan.json          the leader: what attempt NNN runs (knobs, orders, rung, checkpoint, mode)
    attempt-NNN/joined.node-K.json node K started its part of it
    attempt-NNN/end.node-K.json    node K's part ended: exit, failure, its ranks' error records, its
                                   complete checkpoints
    attempt-NNN/verdict.json       the leader: the job's verdict on it (retry | abandoned | end: status,
                                   exit code, root cause)

Liveness is judged on the reader's own clock (a beat whose content has not changed for ``timeout_s``),
never by comparing two hosts' clocks. A plan names the leader's session: a follower runs only the
plans of the leader that is alive now (a restarted leader first closes the plans it left open).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..policy import Limits
from ..protocol import atomic_write_json
from .nodes import NodeRole, node_dir_name
from .process import StopFlag

__all__ = ["BEAT_S", "PEER_STOP_S", "Cluster", "NodeEnd", "NodePlan", "PeerStop", "Verdict", "common_checkpoint"]

BEAT_S = 1.0  # seconds between a supervisor's beats
# another node's part failed: ours is stopped if it still runs this long after (the policy's
# limits.failed_rank_linger_s, the same rule as for a rank whose peer recorded its failure)
PEER_STOP_S = Limits().failed_rank_linger_s
WAIT_POLL_S = 0.2


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not there yet (an atomic rename makes a half file impossible)
    return data if isinstance(data, dict) else None


def _fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclasses.dataclass(frozen=True)
class NodePlan:
    """The leader's plan for one attempt of the job: every node runs it with the same knobs."""

    attempt: int
    session: str
    config: dict[str, Any]
    orders: dict[str, Any]
    rung: dict[str, Any] | None = None
    resume_from: str | None = None
    resume_mode: str = "normal"
    rewarm_steps: int = 0


@dataclasses.dataclass(frozen=True)
class NodeEnd:
    """How one node's part of an attempt ended. ``checkpoints``: the steps of the complete checkpoints
    that node sees (None: it does not know where its Trainer saves)."""

    node: int
    attempt: int
    ok: bool  # exit 0, not stopped
    exit_code: int | None = None
    signal: int | None = None
    interrupted_by: int | None = None
    failure: dict[str, Any] | None = None
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checkpoints: list[int] | None = None
    max_step: int | None = None
    abandoned: bool = False  # closed by a restarted supervisor: its predecessor died in it


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The leader's verdict on attempt ``attempt``: ``retry`` (the next plan follows), ``abandoned``
    (a restarted leader closed it), or ``end`` (the job is over: ``status``, ``exit_code``, ``root_cause``)."""

    attempt: int
    outcome: str
    status: str | None = None
    exit_code: int | None = None
    root_cause: str | None = None
    failure: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    session: str | None = None  # the leader's that wrote it


def common_checkpoint(resume_from: str | None, ends: Mapping[int, NodeEnd]) -> tuple[str | None, str | None]:
    """The checkpoint every node can resume from: ``resume_from`` when its step is complete on every node
    that knows its checkpoints, else the newest older step that is (same folder), else None. With a
    shared output dir every node sees the same folders; with ``save_on_each_node`` each its own.
    Returns (checkpoint, why it changed or None)."""
    if resume_from is None:
        return None, None
    known = {k: set(e.checkpoints) for k, e in ends.items() if e.checkpoints is not None}
    path = Path(resume_from)
    step = _step_of(path.name)
    if step is None or all(step in steps for steps in known.values()):
        return resume_from, None
    common = set.intersection(*known.values())
    older = sorted((s for s in common if s < step), reverse=True)
    missing = sorted(k for k, steps in known.items() if step not in steps)
    nodes = ", ".join(f"node {k}" for k in missing)
    if not older:
        return None, (f"{path.name} is not complete on {nodes}, and no older checkpoint is complete on every node: "
                      "a fresh start (every node must see the checkpoint: a shared output_dir, or save_on_each_node)")
    chosen = str(path.with_name(f"checkpoint-{older[0]}"))
    return chosen, f"{path.name} is not complete on {nodes}: checkpoint-{older[0]}, the newest complete on every node"


def _step_of(name: str) -> int | None:
    head, _, tail = name.rpartition("-")
    return int(tail) if head == "checkpoint" and tail.isdigit() else None


class PeerStop(StopFlag):
    """The stop flag a node's child is watched with: the supervisor's own (signals), or set when another
    node's part of the attempt failed (then the child gets SIGTERM, as on a user's stop, but the attempt is
    not an interruption: ``peer`` says why it was stopped)."""

    def __init__(self, own: StopFlag):  # StopFlag.__init__ is not called: signum is read through
        self.own = own
        self.peer: str | None = None

    @property  # type: ignore[override]
    def signum(self) -> int | None:
        return self.own.signum if self.own.is_set else (signal.SIGTERM if self.peer else None)

    @property  # type: ignore[override]
    def urgent(self) -> bool:
        return self.own.urgent

    def set(self, signum: int) -> None:
        self.own.set(signum)

    @property
    def forward(self) -> int:
        return self.own.forward if self.own.is_set else signal.SIGTERM


class Cluster:
    """This node's side of the agreement. ``clock`` is the loop's (time, monotonic, sleep)."""

    def __init__(self, role: NodeRole, timeout_s: float, clock: Any, beat_s: float = BEAT_S,
                 peer_stop_s: float = PEER_STOP_S):
        self.role, self.timeout_s, self.clock = role, timeout_s, clock
        self.beat_s, self.peer_stop_s = beat_s, peer_stop_s
        self.session = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"
        self.attempt = 0  # the job attempt this node is in (the beat says it)
        self._seq = 0
        self._changed: dict[int, tuple[Any, float]] = {}  # node -> (its beat's content, our monotonic time)
        self._alive: dict[int, Any] = {}  # node -> the session we last saw beating
        self._since = clock.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- files -----------------------------------------------------------------------------------

    def _attempt_dir(self, n: int) -> Path:
        return self.role.cluster_dir / f"attempt-{n:03d}"

    def _beat_path(self, node: int) -> Path:
        return self.role.cluster_dir / f"{node_dir_name(node)}.json"

    def publish_plan(self, plan: NodePlan) -> None:
        atomic_write_json(self._attempt_dir(plan.attempt) / "plan.json", dataclasses.asdict(plan))

    def read_plan(self, n: int) -> NodePlan | None:
        data = _read(self._attempt_dir(n) / "plan.json")
        return NodePlan(**_fields(NodePlan, data)) if data else None

    def joined(self, n: int) -> None:
        atomic_write_json(self._attempt_dir(n) / f"joined.{node_dir_name(self.role.rank)}.json",
                          {"node": self.role.rank, "session": self.session, "time": self.clock.time()})

    def has_joined(self, n: int, node: int) -> bool:
        return (self._attempt_dir(n) / f"joined.{node_dir_name(node)}.json").is_file()

    def publish_end(self, end: NodeEnd) -> None:
        atomic_write_json(self._attempt_dir(end.attempt) / f"end.{node_dir_name(end.node)}.json",
                          dataclasses.asdict(end))

    def read_end(self, n: int, node: int) -> NodeEnd | None:
        data = _read(self._attempt_dir(n) / f"end.{node_dir_name(node)}.json")
        return NodeEnd(**_fields(NodeEnd, data)) if data else None

    def publish_verdict(self, verdict: Verdict) -> None:
        verdict = dataclasses.replace(verdict, session=self.session)
        atomic_write_json(self._attempt_dir(verdict.attempt) / "verdict.json", dataclasses.asdict(verdict))

    def read_verdict(self, n: int) -> Verdict | None:
        data = _read(self._attempt_dir(n) / "verdict.json")
        return Verdict(**_fields(Verdict, data)) if data else None

    def attempts(self) -> list[int]:
        """Every job attempt with a file (a plan; a verdict alone when the job ended before its next plan), in order."""
        found = []
        for p in self.role.cluster_dir.glob("attempt-*"):
            tail = p.name.partition("-")[2]
            if tail.isdigit() and p.is_dir():
                found.append(int(tail))
        return sorted(found)

    # ---- liveness --------------------------------------------------------------------------------

    def start(self) -> None:
        """Beat from a thread: whatever the loop is doing (a long save, a decision), the node is alive."""
        self.role.cluster_dir.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._beats, name="oomguard-node-beat", daemon=True)
        self._thread.start()

    def close(self, exit_code: int | None) -> None:
        """The last beat says this supervisor ended (with ``exit_code``): peers need not wait for the timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._beat(ended=exit_code)
        except OSError:
            pass

    def _beats(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._beat()
            except OSError:
                pass  # the shared dir is gone for a moment: the peers' timeout decides

    def _beat(self, ended: int | None = None) -> None:
        self._seq += 1
        atomic_write_json(self._beat_path(self.role.rank), {
            "node": self.role.rank, "session": self.session, "pid": os.getpid(), "host": socket.gethostname(),
            "seq": self._seq, "attempt": self.attempt, "time": time.time(), "ended": ended})

    def beat_of(self, node: int) -> dict[str, Any] | None:
        return _read(self._beat_path(node))

    def lost(self, node: int) -> str | None:
        """Why node ``node``'s supervisor counts as gone, else None: its beat says it ended (a session we
        saw alive), or has not changed for ``timeout_s`` of our clock, or never came in that time. An ended
        beat of an earlier session (the last run's, before a requeue) only waits for the new one."""
        beat = self.beat_of(node)
        now = self.clock.monotonic()
        key = (beat.get("session"), beat.get("seq")) if beat else None
        if beat is not None and beat.get("ended") is None:
            self._alive[node] = beat.get("session")
        elif beat is not None and self._alive.get(node) == beat.get("session"):
            return f"node {node}'s supervisor ended (exit {beat['ended']}) at its attempt {beat.get('attempt')}"
        seen = self._changed.get(node)
        if seen is None or seen[0] != key:
            self._changed[node] = (key, now if seen is not None or key is not None else self._since)
            return None
        quiet = now - seen[1]
        if quiet <= self.timeout_s:
            return None
        if key is None:
            return f"node {node}'s supervisor never came up ({quiet:.0f} s, --node-timeout {self.timeout_s:g})"
        return (f"node {node}'s supervisor stopped beating {quiet:.0f} s ago (--node-timeout {self.timeout_s:g}; "
                f"host {beat.get('host')}, pid {beat.get('pid')}, at its attempt {beat.get('attempt')})")

    def leader_session(self) -> str | None:
        """The session of the leader beating now (None: none beats), remembered as seen alive."""
        beat = self.beat_of(0)
        if beat and beat.get("ended") is None:
            self._alive[0] = beat.get("session")
            return beat.get("session")
        return None

    # ---- waits -----------------------------------------------------------------------------------

    def _wait(self, ready: Callable[[], Any], nodes: Callable[[], Sequence[int]], stopped: Callable[[], bool]) -> Any:
        """``ready()`` once it is not None; a str (why) when one of ``nodes()`` is lost (and what it owed
        did not come meanwhile); None when ``stopped()``."""
        while True:
            found = ready()
            if found is not None:
                return found
            for node in nodes():
                why = self.lost(node)
                if why is not None:
                    return ready() or why
            if stopped():
                return None
            self.clock.sleep(WAIT_POLL_S)

    def wait_ends(self, n: int, stopped: Callable[[], bool]) -> dict[int, NodeEnd] | str | None:
        """Every other node's end of attempt ``n`` (the leader), or why a node is lost."""
        ends: dict[int, NodeEnd] = {}

        def ready() -> dict[int, NodeEnd] | None:
            for node in self.role.others:
                if node not in ends and (end := self.read_end(n, node)) is not None:
                    ends[node] = end
            return ends if len(ends) == len(self.role.others) else None

        return self._wait(ready, lambda: [k for k in self.role.others if k not in ends], stopped)

    def wait_verdict(self, n: int, stopped: Callable[[], bool]) -> Verdict | str | None:
        return self._wait(lambda: self.read_verdict(n), lambda: (0,), stopped)

    def next_plan(self, after: int, stopped: Callable[[], bool]) -> NodePlan | Verdict | str | None:
        """A follower's next step after attempt ``after``: the first plan of the leader alive now that has no
        verdict yet, or the verdict that ended the job (of a leader session this node saw alive)."""
        def ready() -> NodePlan | Verdict | None:
            session = self.leader_session()
            for n in self.attempts():
                if n <= after:
                    continue
                verdict = self.read_verdict(n)
                if verdict is not None:
                    if verdict.outcome == "end" and verdict.session is not None \
                            and verdict.session == self._alive.get(0):
                        return verdict
                    continue
                plan = self.read_plan(n)
                if plan is not None and plan.session == session:
                    return plan
            return None

        return self._wait(ready, lambda: (0,), stopped)

    def failed_peer(self, n: int) -> tuple[str, bool] | None:
        """Why another node's part of attempt ``n`` counts as over for ours too, and whether at once: a
        peer part that ended failing or stopped (not at once: its launcher's teardown usually ends ours),
        the leader closed the attempt or a node is lost (at once); None while all is well."""
        verdict = self.read_verdict(n)
        if verdict is not None:
            return f"the leader closed attempt {n} ({verdict.outcome})", True
        for node in self.role.others:
            end = self.read_end(n, node)
            if end is not None and not end.ok:
                return f"node {node}'s part of attempt {n} ended ({_how(end)})", False
            why = self.lost(node)
            if why is not None:
                return why, True
        return None


def _how(end: NodeEnd) -> str:
    if end.failure:
        return f"{end.failure.get('kind')} at step {end.failure.get('step')}"
    if end.interrupted_by:
        return f"stopped by {signal.Signals(end.interrupted_by).name}"
    return f"exit {end.exit_code}" if end.signal is None else f"signal {end.signal}"


class AttemptWatch:
    """Watches the other nodes while this node's part of attempt ``n`` runs (the launcher's ``on_tick``):
    a peer's failure stops our child after ``peer_stop_s`` (the c10d rendezvous usually ends it sooner),
    a lost node or a closed attempt at once."""

    def __init__(self, cluster: Cluster, n: int, stop: PeerStop, every_s: float = 0.5):
        self.cluster, self.n, self.stop, self.every_s = cluster, n, stop, every_s
        self._next = 0.0
        self._noticed: float | None = None

    def tick(self) -> None:
        now = self.cluster.clock.monotonic()
        if now < self._next or self.stop.peer is not None:
            return
        self._next = now + self.every_s
        found = self.cluster.failed_peer(self.n)
        if found is None:
            return
        why, urgent = found
        if self._noticed is None:
            self._noticed = now
        if urgent or now - self._noticed >= self.cluster.peer_stop_s:
            self.stop.peer = why
