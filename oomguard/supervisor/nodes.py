"""Which node of a multi-node job this supervisor is, and where its files go. Pure but for the
directory checks of :func:`node_role`.

One supervisor per node (``srun --ntasks-per-node 1 oomguard run --run-dir D -- torchrun --nnodes N …``);
``D`` is the *job's* directory, on a filesystem every node sees. Node K's supervisor keeps its own run
in ``D/node-K/`` (the single-node layout of DESIGN §3, unchanged: run.json, events.jsonl, attempts/,
heartbeats, ledger/ of the ranks on that node) and agrees with the others through ``D/cluster/``
(``supervisor/cluster.py``). Node 0's supervisor is the leader: it decides for the job.

The node count and this node's rank, first found wins:
1. ``oomguard run --nnodes N --node-rank K`` (explicit);
2. the launcher's own flags in the command: torchrun ``--nnodes N`` / ``--node-rank K`` (``--node_rank``),
   accelerate ``--num_machines N`` / ``--machine_rank K``;
3. torchrun's own environment defaults for those flags, ``PET_NNODES`` / ``PET_NODE_RANK``;
4. for the rank only, SLURM's ``SLURM_NODEID`` (``srun`` sets it per node). The count is always what the
   child runs: a one-node command inside a bigger allocation stays a one-node run.
A count the command states must agree with an explicit ``--nnodes``; elastic ``MIN:MAX`` is accepted only
with MIN = MAX (every node must be there for one decision). With one node nothing changes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import UsageError
from ..protocol import RUN_JSON
from .command import node_count_of, node_rank_of
from .journal import load_record
from .launch import LauncherKind, classify_launcher

__all__ = ["CLUSTER_DIR", "NodeRole", "node_dir_name", "node_role"]

CLUSTER_DIR = "cluster"  # D/cluster/: the agreement files (cluster.py)


def node_dir_name(rank: int) -> str:
    return f"node-{rank}"


@dataclasses.dataclass(frozen=True)
class NodeRole:
    """This supervisor's place in a job of ``count`` nodes; ``source`` says where rank and count came from."""

    rank: int
    count: int
    job_dir: Path
    source: str

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        """This node's own run dir (DESIGN §3 layout)."""
        return self.node_run_dir(self.rank)

    def node_run_dir(self, rank: int) -> Path:
        return self.job_dir / node_dir_name(rank)

    @property
    def cluster_dir(self) -> Path:
        return self.job_dir / CLUSTER_DIR

    @property
    def others(self) -> tuple[int, ...]:
        return tuple(k for k in range(self.count) if k != self.rank)

    def to_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "count": self.count, "job_dir": str(self.job_dir), "source": self.source}


def _number(raw: str, what: str, where: str, *, positive: bool) -> int:
    text = raw.strip()
    if not text.isdigit() or (positive and int(text) == 0):
        need = "a whole number ≥ 1" if positive else "a whole number ≥ 0"
        raise UsageError(f"{where}: {what} is {raw!r}, not {need}; fix it (or pass oomguard run "
                         f"--{'nnodes' if positive else 'node-rank'} explicitly)")
    return int(text)


def _fixed_count(raw: str, where: str) -> int:
    """``"2"`` or ``"2:2"`` -> 2; an elastic range with MIN < MAX is refused: the leader waits for every node."""
    low, _, high = raw.partition(":")
    count = _number(high or low, "the node count", where, positive=True)
    if high and _number(low, "the node count", where, positive=True) != count:
        raise UsageError(f"{where}: elastic node count {raw!r}: oomguard's one decision per job needs every node "
                         f"of a fixed count; write --nnodes {count} (or {count}:{count})")
    return count


def _launcher_facts(command: Sequence[str], env: Mapping[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(source, count, rank) as written, best first: the command's flags, torchrun's PET_* env, SLURM."""
    facts = [("the command's launcher flags", node_count_of(command), node_rank_of(command))]
    if classify_launcher(command, env.get("PATH")) is LauncherKind.TORCHRUN:
        facts.append(("torchrun's PET_NNODES/PET_NODE_RANK", env.get("PET_NNODES"), env.get("PET_NODE_RANK")))
    # SLURM names the node, never the count: the count is what the child runs (a single-node command in a
    # bigger allocation must not wait for nodes that will never come)
    facts.append(("SLURM_NODEID", None, env.get("SLURM_NODEID")))
    return facts


def node_role(job_dir: Path, command: Sequence[str], env: Mapping[str, str] | None = None, *,
              node_rank: int | None = None, nnodes: int | None = None, explicit_dir: bool = True) -> NodeRole | None:
    """This supervisor's role, or None for a one-node run (nothing changes then). ``command`` empty:
    a continuation (``oomguard run --run-dir D``), whose command is the one node K recorded."""
    env = os.environ if env is None else env
    if node_rank is not None and node_rank < 0:
        raise UsageError(f"--node-rank {node_rank}: node ranks run from 0 to N-1")
    if nnodes is not None and nnodes < 1:
        raise UsageError(f"--nnodes {nnodes}: give the job's node count (1 or more)")
    if not command and (Path(job_dir) / RUN_JSON).is_file():
        return None  # the continuation of a one-node run
    if not command:
        command = _recorded_command(Path(job_dir), env, node_rank)
    facts = _launcher_facts(command, env)
    count, count_from = (nnodes, "--nnodes") if nnodes is not None else (None, None)
    stated = facts[0][1]
    if stated is not None and nnodes is not None and _fixed_count(stated, "the command") != nnodes:
        raise UsageError(f"oomguard run --nnodes {nnodes} but the command says {stated} nodes; "
                         "drop --nnodes or make them agree")
    for source, raw, _ in facts:
        if count is None and raw:
            count, count_from = _fixed_count(raw, source), source
    if count is None or count == 1:
        return None
    rank, rank_from = (node_rank, "--node-rank") if node_rank is not None else (None, None)
    for source, _, raw in facts:
        if rank is None and raw:
            rank, rank_from = _number(raw, "the node rank", source, positive=False), source
    if rank is None:
        raise UsageError(f"this job runs on {count} nodes ({count_from}) but oomguard cannot tell which node this "
                         "is: pass `oomguard run --node-rank K`, or the launcher's own --node-rank/--machine_rank, "
                         "or start it with srun (SLURM_NODEID)")
    if rank >= count:
        raise UsageError(f"node rank {rank} ({rank_from}) is not below the node count {count} ({count_from}); "
                         "node ranks run from 0 to N-1")
    if not explicit_dir:
        raise UsageError(f"this job runs on {count} nodes: give every node's `oomguard run` the same --run-dir "
                         "on a filesystem they all see (e.g. --run-dir $SHARED/runs/$SLURM_JOB_ID)")
    _check_job_dir(job_dir)
    source = count_from if count_from == rank_from else f"count: {count_from}; rank: {rank_from}"
    return NodeRole(rank=rank, count=count, job_dir=Path(job_dir), source=source)


def _recorded_command(job_dir: Path, env: Mapping[str, str], node_rank: int | None) -> list[str]:
    """The command node K's run recorded (K from --node-rank or SLURM_NODEID), or [] (a one-node run dir,
    or not known which node this is: the count then comes from the options or SLURM alone)."""
    rank = node_rank if node_rank is not None else env.get("SLURM_NODEID", "").strip()
    if not (job_dir / CLUSTER_DIR).is_dir() or not str(rank).isdigit():
        return []
    record = load_record(job_dir / node_dir_name(int(rank)))
    return list(record.command) if record is not None else []


def _check_job_dir(job_dir: Path) -> None:
    if (Path(job_dir) / RUN_JSON).is_file():
        raise UsageError(f"{job_dir} holds a one-node run ({RUN_JSON}); a job of several nodes keeps each node's run "
                         f"in {job_dir}/node-K/: pass a new --run-dir for it")
