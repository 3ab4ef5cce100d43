"""The event stream (``events.jsonl``): the catalogue of every event name, and the one writer.

Every line is ``{"time": float, "event": name, "source": "supervisor"|"child", ...payload}``; a child's
line also carries its ``rank``. :data:`CATALOGUE` gives each :class:`Event` its source and payload
(``field:type`` required, ``field?:type`` optional; ``|None`` where null is allowed; ``...`` where
more fields may follow). :func:`check_event` lists what a line breaks; :func:`emit_event` never
raises over that in production, and raises ``ValueError`` under ``OOMGUARD_STRICT_EVENTS=1`` (tests).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import time
from typing import Any, Mapping

from .env import ENV_STRICT_EVENTS
from .io import append_jsonl
from .layout import EVENTS_JSONL

__all__ = ["EVENT_BOOTSTRAP_TRAINER", "EVENT_RECIPE_OBSERVED", "STAGE_BUILT", "STAGE_IN_FORCE",
           "EVENT_CHANGE_VERIFIED", "EVENT_CHANGE_NOT_APPLIED", "EVENT_STEP", "EVENT_TRAINER_LOG",
           "Event", "EventSource", "FieldSpec", "Payload", "EventSpec", "CATALOGUE", "check_event", "emit_event",
           "event_record"]

log = logging.getLogger("oomguard.protocol")


class EventSource(str, enum.Enum):
    SUPERVISOR = "supervisor"
    CHILD = "child"


class Event(str, enum.Enum):
    """Every event name written to ``events.jsonl``, by either side."""

    # supervisor: the run and its attempts
    RUN_STARTED = "run_started"
    RUN_CONTINUED = "run_continued"
    RUN_ENDED = "run_ended"
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_ENDED = "attempt_ended"
    ATTEMPT_ABANDONED = "attempt_abandoned"
    DECISION = "decision"
    GPU_RELEASE_WAIT = "gpu_release_wait"
    CHILD_START = "child_start"
    NOTIFICATION = "notification"
    ON_END = "on_end"
    # supervisor: several nodes agreeing through the shared run dir (issue 20, supervisor/cluster.py)
    NODE_PLAN = "node_plan"
    NODE_VERDICT = "node_verdict"
    NODE_LOST = "node_lost"
    # supervisor: grow back after a resume-safe batch rung (issue 18 item 5, policy/grow.py)
    GROW_BACK_REQUESTED = "grow_back_requested"
    GROW_BACK = "grow_back"
    # supervisor: checkpoints and the recipe seen in the child
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    CHECKPOINT_FOREIGN = "checkpoint_foreign"
    CHECKPOINT_MOVED_ASIDE = "checkpoint_moved_aside"
    CHECKPOINT_QUARANTINED = "checkpoint_quarantined"
    CHECKPOINT_DIR = "checkpoint_dir"
    REQUESTED_OBSERVED = "requested_observed"
    CHANGE_VERIFIED = "change_verified"
    CHANGE_NOT_APPLIED = "change_not_applied"
    # child: progress
    STEP = "step"
    TRAINER_LOG = "trainer_log"
    MEMORY = "memory"
    MEMORY_GROWTH = "memory_growth"
    DATA_PROFILE = "data_profile"
    CACHE_CLEARED = "cache_cleared"
    TRACKER_OBSERVED = "tracker_observed"
    # child: saves and failures
    CHECKPOINT_SAVED = "checkpoint_saved"
    EMERGENCY_SAVE = "emergency_save"
    PRESSURE_SAVE = "pressure_save"
    SHUTDOWN_REQUESTED = "shutdown_requested"
    SHUTDOWN_SAVED = "shutdown_saved"
    GROW_STOPPED = "grow_stopped"
    PROBE_WRITTEN = "probe_written"
    ERROR_RECORDED = "error_recorded"
    NAN_DETECTED = "nan_detected"
    FAULT_INJECTED = "fault_injected"
    VRAM_LIMIT = "vram_limit"
    # child: a warm launcher's worker (issue 17, spare/fork_worker.py)
    WORKER_START = "worker_start"
    # child: the bootstrap and the recipe in force
    BOOTSTRAP_TRAINER = "bootstrap_trainer"
    BOOTSTRAP_LORA = "bootstrap_lora"
    BOOTSTRAP_RESUME = "bootstrap_resume"
    AUTO_FIND_BATCH_SIZE_OFF = "auto_find_batch_size_off"
    RECIPE_OBSERVED = "recipe_observed"
    RECIPE_UNREADABLE = "recipe_unreadable"
    LR_OVERRIDE = "lr_override"
    # child: resuming
    RESUME_CPU_FIRST = "resume_cpu_first"
    SCALER_DROPPED = "scaler_dropped"
    LORA_RANK_CUT = "lora_rank_cut"
    EFFECTIVE_BATCH_CHANGED = "effective_batch_changed"
    RESUME_POSITION_INEXACT = "resume_position_inexact"
    RESUME_POSITION_UNKNOWN = "resume_position_unknown"
    PACKED_POSITION_REINDEXED = "packed_position_reindexed"
    LR_NOTE = "lr_note"
    REWARM = "rewarm"
    # child: culprit batches (issue 19)
    CULPRIT_SPLIT = "culprit_split"
    CULPRIT_UNSPLITTABLE = "culprit_unsplittable"
    ROWS_QUARANTINED = "rows_quarantined"
    GUARD_STACK = "guard_stack"
    GUARD_DEGRADED = "guard_degraded"


EVENT_BOOTSTRAP_TRAINER = Event.BOOTSTRAP_TRAINER.value  # the child patched a Trainer it built (each rank)
# The child's observation of its recipe, one per rank and stage (``knobs`` uses registry names):
#   stage "built":    when its Trainer is constructed (after oomguard's orders, before training);
#   stage "in_force": at train begin, after a checkpoint's optimizer/scheduler state is loaded.
EVENT_RECIPE_OBSERVED = Event.RECIPE_OBSERVED.value
STAGE_BUILT = "built"
STAGE_IN_FORCE = "in_force"
EVENT_CHANGE_VERIFIED = Event.CHANGE_VERIFIED.value  # an ordered change shows in the child
EVENT_CHANGE_NOT_APPLIED = Event.CHANGE_NOT_APPLIED.value  # it does not (knob, expected, observed, why)
# The guard's per-step events: one ``step`` per completed optimizer step, one ``trainer_log`` per on_log.
EVENT_STEP = Event.STEP.value
EVENT_TRAINER_LOG = Event.TRAINER_LOG.value

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "num": (int, float), "str": (str,), "bool": (bool,),
    "list": (list,), "dict": (dict,), "None": (type(None),), "any": (object,),
}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    types: tuple[str, ...]  # names in _TYPES: ("int", "None") is an int or null
    required: bool = True

    def accepts(self, value: Any) -> bool:
        for t in self.types:
            if t == "any" or (isinstance(value, _TYPES[t]) and not (isinstance(value, bool) and t != "bool")):
                return True
        return False


@dataclasses.dataclass(frozen=True)
class Payload:
    fields: tuple[FieldSpec, ...]
    open: bool = False  # more fields may follow (a payload spread from a dict the writer builds)

    @classmethod
    def parse(cls, text: str) -> "Payload":
        """``"step:int max_steps:int|None why?:str ..."`` -> a payload spec."""
        words = text.split()
        fields = []
        for word in (w for w in words if w != "..."):
            name, _, types = word.partition(":")
            required = not name.endswith("?")
            fields.append(FieldSpec(name.rstrip("?"), tuple((types or "any").split("|")), required))
        for f in fields:
            unknown = set(f.types) - set(_TYPES)
            if unknown:
                raise ValueError(f"payload field {f.name!r}: unknown type(s) {sorted(unknown)}; use {sorted(_TYPES)}")
        return cls(tuple(fields), open="..." in words)


@dataclasses.dataclass(frozen=True)
class EventSpec:
    source: EventSource
    payload: Payload
    about: str


_S, _C = EventSource.SUPERVISOR, EventSource.CHILD
_STEP = "step:int"
_STEP_OR_NONE = "step:int|None"
# (event, source, payload, what it says)
_TABLE: tuple[tuple[Event, EventSource, str, str], ...] = (
    (Event.RUN_STARTED, _S, "command:list policy:str knobs:dict world_size:int gpu:dict|None "
     "policy_orders:dict|None", "a new run began"),
    (Event.RUN_CONTINUED, _S, "after_attempts:int knobs:dict previous_status:str", "an interrupted run goes on"),
    (Event.RUN_ENDED, _S, "status:str exit_code:int root_cause:str|None give_up?:str|None", "the run is over"),
    (Event.ATTEMPT_STARTED, _S, "attempt:int knobs:dict rung:dict|None orders:dict resumed_from:str|None "
     "command:list delivered:dict world_size:int effective_batch:int|None launch:dict", "a child launched"),
    (Event.ATTEMPT_ENDED, _S, "attempt:int exit_code:int|None signal:int|None duration_s:num failure:dict|None "
     "max_step:int|None interrupted_by:int|None world_size:int root_cause:str|None ranks:list bootstrap:str "
     "supervisor?:dict", "a child ended"),
    (Event.ATTEMPT_ABANDONED, _S, "attempt:int pid:int|None max_step:int|None orphan:str failure:dict|None "
     "root_cause:str|None", "a dead supervisor's attempt, found on continuing"),
    (Event.DECISION, _S, "attempt:int action:str reason:str knobs:dict rung:dict|None changes:list "
     "resume_from:str|None resume_class:str|None give_up:str|None backoff_s:num|None truncation_share:num|None "
     "effective_batch:list|None lr_note:str|None quarantine?:list resume_mode?:str rewarm_steps?:int culprit?:dict",
     "what the policy decided after a failure"),
    (Event.CHILD_START, _S, "attempt:int start:str reason:str|None waited_s:num spare_pid?:int|None "
     "spare_rss?:int|None preloaded?:list spare_ready_s?:num",
     "attempt >= 2: a warm start (the spare's pre-imported interpreter became the child) or a cold one, and why"),
    (Event.WORKER_START, _C, "attempt:int start:str reason:str",
     "a warm launcher's single-process worker: forked from it, imports done (fork), or started as the launcher "
     "asked (exec), and why"),
    (Event.GPU_RELEASE_WAIT, _S, "released:bool waited_s:num", "waited for the GPU memory to come back"),
    (Event.NOTIFICATION, _S, "kind:str target:str ok:bool status:int|None error:str|None",
     "a --notify POST (kind end|recovery; target: scheme://host/ only, the URL's path is a secret)"),
    (Event.ON_END, _S, "exit_code:int|None ok:bool seconds:num error:str|None", "the --on-end command ran"),
    (Event.NODE_PLAN, _S, "job_attempt:int node:int nodes:int leader:bool knobs:dict resume_from:str|None",
     "a node's attempt runs the leader's plan for this attempt of the job (the leader published it)"),
    (Event.NODE_VERDICT, _S, "job_attempt:int node:int outcome:str exit_code:int|None root_cause:str|None "
     "resume_from?:str|None note?:str|None", "the leader's verdict on an attempt of the job (retry | abandoned | end)"),
    (Event.NODE_LOST, _S, "job_attempt:int node:int lost:int why:str",
     "another node's supervisor is gone or never came: this node's supervisor ends (exit 7)"),
    (Event.GROW_BACK_REQUESTED, _S, f"attempt:int {_STEP} steps_below:int peak:int cap:int below_fraction:num "
     "knobs:dict changes:list reason:str",
     "memory stayed low after a halve_batch rung: the child is asked to save and stop at its next step end"),
    (Event.GROW_BACK, _S, "attempt:int verified:bool knobs:dict changes:list resumed_from:str|None reason:str "
     "why:str|None", "an attempt resumed with the batch before the rung; verified: the child shows it in force"),
    (Event.CHECKPOINT_SKIPPED, _S, f"path:str {_STEP_OR_NONE} problems:list", "an incomplete checkpoint"),
    (Event.CHECKPOINT_FOREIGN, _S, f"path:str {_STEP_OR_NONE} why:str", "another run's checkpoint, left alone"),
    (Event.CHECKPOINT_MOVED_ASIDE, _S, f"path:str {_STEP_OR_NONE} moved_to:str|None why?:str error?:str",
     "a damaged or quarantined checkpoint moved out of the way"),
    (Event.CHECKPOINT_QUARANTINED, _S, f"{_STEP} path:str moved_to:str last_finite_step:int|None reason:str",
     "a checkpoint written after the last finite step, moved out of a resume's reach"),
    (Event.CHECKPOINT_DIR, _S, "path:str previous:str|None reported_by:str", "where the child's checkpoints go"),
    (Event.REQUESTED_OBSERVED, _S, "attempt:int knobs:dict fields:dict", "attempt 1's recipe, as observed"),
    (Event.CHANGE_VERIFIED, _S, "attempt:int knob:str expected:any observed:any why:str|None",
     "an ordered change shows in the child"),
    (Event.CHANGE_NOT_APPLIED, _S, "attempt:int knob:str expected:any observed:any why:str|None",
     "an ordered change does not show in the child"),
    (Event.STEP, _C, f"{_STEP} max_steps:int|None epoch:float|None attempt:int",
     "an optimizer step completed (step = global_step now)"),
    (Event.TRAINER_LOG, _C, f"{_STEP} logs:dict", "the numbers of one Trainer on_log"),
    (Event.MEMORY, _C, f"{_STEP} allocated?:int reserved?:int active?:int step_peak?:int slack?:int "
     "inactive_split?:int alloc_retries?:int num_ooms?:int device_used?:int host_rss?:int window_peak?:int",
     "a memory sample (every step up to 10, then every 10th); window_peak: the highest step peak since the "
     "previous sample (grow back reads it where present)"),
    (Event.MEMORY_GROWTH, _C, f"{_STEP} slope_bytes_per_step:num level:num cap:int|None "
     "projected_step:int|None", "memory grows step after step"),
    (Event.DATA_PROFILE, _C, f"{_STEP} count:int quantiles:list max_len:int total_tokens:int sampled:bool "
     "packed:bool", "training row lengths"),
    (Event.CACHE_CLEARED, _C, f"{_STEP} reason:str bytes_freed:int|None", "the CUDA cache was emptied"),
    (Event.TRACKER_OBSERVED, _C, f"attempt:int {_STEP} tensorboard_dir?:str wandb_run_id?:str mlflow_run_id?:str",
     "the trackers' run ids (report_to; rank 0, once per attempt)"),
    (Event.CHECKPOINT_SAVED, _C, f"{_STEP} path:str", "a regular checkpoint was saved"),
    (Event.EMERGENCY_SAVE, _C, f"{_STEP} path:str seconds:num", "a checkpoint saved on the way down"),
    (Event.PRESSURE_SAVE, _C, f"{_STEP} projected_step:int|None slope_bytes_per_step:num cap:int|None",
     "a save ahead of a projected OOM"),
    (Event.SHUTDOWN_REQUESTED, _C, f"{_STEP} reason:str", "the child was asked to stop"),
    (Event.SHUTDOWN_SAVED, _C, f"{_STEP} reason:str path:str", "a checkpoint saved before stopping"),
    (Event.GROW_STOPPED, _C, f"{_STEP} path:str attempt:int",
     "the child saved and stopped for a grow back (the supervisor's request); it exits 0, the run is not over"),
    (Event.PROBE_WRITTEN, _C, "path:str points:int wall_s:num",
     "oomguard plan/tune: the child measured its configurations into probe.json and exits 0 without training"),
    (Event.ERROR_RECORDED, _C, f"{_STEP_OR_NONE} kind:str phase:str path:str saved_checkpoint:str|None",
     "the child wrote its error record"),
    (Event.NAN_DETECTED, _C, f"{_STEP} last_finite_step:int|None skipped:int action:str",
     "a non-finite loss or gradient (step = the step being attempted)"),
    (Event.FAULT_INJECTED, _C, f"{_STEP_OR_NONE} fault:str key:str ...", "an injected fault fired"),
    (Event.VRAM_LIMIT, _C, "limit:int total:int context:int context_source:str paged_reserve:int fraction:num "
     "accounted:int", "the emulated card's cap"),
    (Event.BOOTSTRAP_TRAINER, _C, "trainer:str args_class:str attempt:int world_size:int knobs:list "
     "not_applied:list auto_find_batch_size_forced_off:bool output_dir:str|None callbacks:str lora:list "
     "skip:list ...", "the bootstrap patched a Trainer"),
    (Event.BOOTSTRAP_LORA, _C, "config:str via:str ...", "the bootstrap set LoRA knobs on a config"),
    (Event.BOOTSTRAP_RESUME, _C, "code_value:any used:any via:str", "the checkpoint train() resumes from"),
    (Event.AUTO_FIND_BATCH_SIZE_OFF, _C, "trainer:str detail:str", "auto_find_batch_size was turned off"),
    (Event.RECIPE_OBSERVED, _C, "attempt:int stage:str knobs:dict fields:dict effective_batch?:int|None "
     "world_size:int output_dir:str|None trainer:str|None args_class:str|None lr_scheduler_type?:str|None "
     "optim?:str|None lora:any ...", "the recipe in the child (stage built / in_force)"),
    (Event.RECIPE_UNREADABLE, _C, "stage:str error:str", "the recipe could not be observed"),
    (Event.LR_OVERRIDE, _C, f"attempt:int {_STEP} ordered:num before:num after:num|None ratio:num groups:list",
     "an ordered learning rate replaced the restored one"),
    (Event.RESUME_CPU_FIRST, _C, "checkpoint:str detail:str", "optimizer state loaded to CPU first"),
    (Event.SCALER_DROPPED, _C, "checkpoint:str copy:str detail:str", "fp16 scaler state left out"),
    (Event.LORA_RANK_CUT, _C, "checkpoint:str copy:str lora_r:list lora_alpha:list total_relative_error:num "
     "per_layer:dict optimizer:any", "the adapter was cut to a new rank"),
    (Event.EFFECTIVE_BATCH_CHANGED, _C, f"checkpoint:str {_STEP} ...", "the resume position was translated"),
    (Event.RESUME_POSITION_INEXACT, _C, f"checkpoint:str {_STEP_OR_NONE} max_length:list packing:bool "
     "reason:str detail:str", "the resume position could not be kept exact"),
    (Event.RESUME_POSITION_UNKNOWN, _C, f"checkpoint:str {_STEP_OR_NONE} effective_batch:list detail:str",
     "the ledger could not place the resume"),
    (Event.PACKED_POSITION_REINDEXED, _C, f"checkpoint:str {_STEP} ...", "packed rows re-indexed on resume"),
    (Event.LR_NOTE, _S, "attempt:int learning_rate:num lora:bool note:str",
     "the requested learning rate is outside its recipe class's usual range (said once, never acted on)"),
    (Event.REWARM, _C, f"attempt:int {_STEP} steps:int factor:num lr:list scheduled:list",
     "the attempt re-entered warm-up after a NaN rollback: the optimizer's rate on its first step"),
    (Event.CULPRIT_SPLIT, _C, f"attempt:int {_STEP} factor:int micro_batches:int chunks:int rows:int "
     "max_chunk_tokens:int",
     "a culprit optimizer step trained as smaller micro-batches, same rows (step = the step trained)"),
    (Event.CULPRIT_UNSPLITTABLE, _C, f"attempt:int {_STEP} factor:int why:str",
     "a culprit step whose micro-batches cannot be split (one row, or padding-free rows): trained whole"),
    (Event.ROWS_QUARANTINED, _C, f"attempt:int {_STEP} rows:list",
     "quarantined rows the sampler handed out, skipped (not trained) in this step"),
    (Event.GUARD_STACK, _C, "attempt:int versions:dict tested:bool outside:list missing:list degraded:list",
     "the child's training stack against oomguard's tested range (rank 0, once per attempt)"),
    (Event.GUARD_DEGRADED, _C, "part:str error:str consequence:str",
     "a part of the guard failed or is missing on this stack; the run goes on without it"),
)

CATALOGUE: Mapping[Event, EventSpec] = {e: EventSpec(src, Payload.parse(p), about) for e, src, p, about in _TABLE}
_ENVELOPE = Payload.parse("time:num event:str source:str rank?:int")


def _field_problems(obj: Mapping[str, Any], payload: Payload, where: str) -> list[str]:
    problems = []
    for f in payload.fields:
        if f.name not in obj:
            if f.required:
                problems.append(f"{where}: missing field {f.name!r} ({'|'.join(f.types)})")
        elif not f.accepts(obj[f.name]):
            problems.append(f"{where}: field {f.name!r} is {type(obj[f.name]).__name__} {obj[f.name]!r:.80}, "
                            f"expected {'|'.join(f.types)}")
    return problems


def check_event(obj: Mapping[str, Any]) -> list[str]:
    """What ``obj`` (one ``events.jsonl`` line) breaks in the catalogue; [] when it conforms."""
    name = obj.get("event")
    try:
        event = Event(name)
    except ValueError:
        return [f"unknown event {name!r}: add it to oomguard/protocol/events.py (Event and _TABLE) "
                "with its source and payload, or emit a catalogued name"]
    spec = CATALOGUE[event]
    where = f"event {event.value!r}"
    problems = _field_problems(obj, _ENVELOPE, where) + _field_problems(obj, spec.payload, where)
    if obj.get("source") not in (None, spec.source.value):
        problems.append(f"{where}: source {obj.get('source')!r}, the catalogue says {spec.source.value!r}")
    if not spec.payload.open:
        known = {f.name for f in _ENVELOPE.fields + spec.payload.fields}
        extra = sorted(set(obj) - known)
        if extra:
            problems.append(f"{where}: fields {extra} are not in its payload: add them to the catalogue "
                            "(oomguard/protocol/events.py) or leave them out")
    return problems


_CLEAN_SHAPES: set[tuple] = set()


def event_record(event: str, **fields: Any) -> dict[str, Any]:
    """One ``events.jsonl`` line: ``time``, ``event``, the fields, and ``source`` by the catalogue's default.
    A line that breaks the catalogue is returned anyway (and logged); with ``OOMGUARD_STRICT_EVENTS=1`` it
    raises ``ValueError`` instead, so tests catch the drift."""
    name = getattr(event, "value", event)
    spec = CATALOGUE.get(Event(name)) if name in Event._value2member_map_ else None
    record = {"time": time.time(), "event": name, **fields}
    if spec is not None:
        record.setdefault("source", spec.source.value)
    # check_event's verdict depends on the names, the value types and the source only: a shape found clean
    # once is clean again (the child writes a step event per optimizer step; issue 17)
    shape = (name, record.get("source"), tuple(record), tuple(map(type, record.values())))
    if shape in _CLEAN_SHAPES:
        return record
    problems = check_event(record)
    if not problems and len(_CLEAN_SHAPES) < 1024:
        _CLEAN_SHAPES.add(shape)
    if problems:
        if os.environ.get(ENV_STRICT_EVENTS) == "1":
            raise ValueError(f"{ENV_STRICT_EVENTS}=1: " + "; ".join(problems))
        log.debug("oomguard: event off the catalogue: %s", "; ".join(problems))
    return record


def emit_event(run_dir: str | os.PathLike[str], event: str, **fields: Any) -> None:
    """Append an :func:`event_record` to ``<run_dir>/events.jsonl`` (used by both sides; the child's
    per-step writer keeps the file open instead: ``guard.writer.EventWriter``)."""
    append_jsonl(os.path.join(run_dir, EVENTS_JSONL), event_record(event, **fields))
