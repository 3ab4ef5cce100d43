"""Patch ``transformers.Trainer`` (every subclass inherits it) so an unchanged script runs guarded.

- ``__new__`` sees the caller's arguments before any subclass ``__init__`` body runs (TRL's
  ``SFTTrainer`` tokenizes with ``args.max_length`` before it calls ``Trainer.__init__``):
  knobs, ``auto_find_batch_size`` off and the checkpoint dir go onto ``args`` there, and the raw
  ``train_dataset`` is remembered (a packed resume maps its examples, :mod:`oomguard.guard.resume.packed`);
- ``__init__`` does the same for an arguments object a subclass built itself, then adds the
  guard's callbacks and writes one ``bootstrap_trainer`` event;
- ``train`` resumes from the supervisor's checkpoint and runs under ``guarded_train``
  (error record, emergency checkpoint, exit 1), calling the original method inside — unless the
  trainer already runs inside ``guarded_train`` (a script that calls it itself): never guarded twice.

The private internals these patches rely on are listed in :mod:`oomguard.guard.trainer_patches`.
"""

from __future__ import annotations

import functools
import inspect
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

from oomguard import protocol
from oomguard.bootstrap.failsafe import failsafe
from oomguard.bootstrap.knobs import Via
from oomguard.bootstrap.switches import Part
from oomguard.tune.record import ENV_PROBE  # issue 18 probe

if TYPE_CHECKING:  # context imports oomguard.guard, which must wait until the child's code runs
    from oomguard.bootstrap.context import ArgsRecord, Context

__all__ = ["choose_resume", "guarded", "patch_trainer", "raw_train_dataset", "trainer_built"]

PATCHED = "_oomguard_patched"
_NOT_PREPARED = "oomguard's orders may not be on this Trainer's arguments (the supervisor checks each in the child)"


def _args_of(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("args", args[1] if len(args) > 1 else None)  # Trainer(model, args, ...)


def raw_train_dataset(init: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The ``train_dataset`` a Trainer constructor call passes (by keyword or position), or None. Pure."""
    if "train_dataset" in kwargs:
        return kwargs["train_dataset"]
    try:
        bound = inspect.signature(init).bind_partial(None, *args, **kwargs)
    except (TypeError, ValueError):
        return None  # a subclass signature we cannot bind: the packed resume then says it cannot map
    return bound.arguments.get("train_dataset")


def patch_trainer(module: ModuleType, context: Callable[[], "Context"]) -> None:
    """Patch ``module.Trainer``; ``context()`` is called at construction time, not now."""
    cls = getattr(module, "Trainer", None)
    if cls is None or cls.__dict__.get(PATCHED):
        return
    original_init, original_train = cls.__init__, cls.train

    def __new__(klass, *args, **kwargs):
        ctx = context()
        trainer = object.__new__(klass)
        with failsafe("the bootstrap's Trainer preparation", _NOT_PREPARED):
            _prepare(ctx, _args_of(args, kwargs), kwargs.get("peft_config"))
            if ctx.switches.patching:
                from oomguard.guard.resume.raw_data import remember_raw_dataset

                remember_raw_dataset(trainer, raw_train_dataset(klass.__init__, args, kwargs))
        return trainer

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        with failsafe("the bootstrap's Trainer preparation", _NOT_PREPARED):
            _prepare(context(), _args_of(args, kwargs), None)
        original_init(self, *args, **kwargs)
        with failsafe("the bootstrap's guard installation", "this Trainer trains without oomguard's callbacks"):
            trainer_built(context(), self)

    @functools.wraps(original_train)
    def train(self, *args, **kwargs):
        return guarded(context(), self, original_train, args, kwargs)

    cls.__new__, cls.__init__, cls.train = __new__, __init__, train
    setattr(cls, PATCHED, True)


def _prepare(ctx: "Context", args: Any, peft_config: Any) -> None:
    if args is not None and not isinstance(args, dict):
        ctx.prepare_args(args)
    if peft_config is not None and ctx.on(Part.LORA):
        from oomguard.bootstrap.injection import lora_built

        lora_built(ctx, peft_config)  # a config built before oomguard's patch, or not by peft


def trainer_built(ctx: "Context", trainer: Any) -> None:
    """Guard callbacks onto ``trainer`` and the ``bootstrap_trainer`` event."""
    record = ctx.prepare_args(trainer.args)  # Trainer(args=None) builds its own
    callbacks = "skipped"
    if ctx.on(Part.CALLBACKS):
        from oomguard.guard.train import GUARD_TYPES, guard_callbacks

        present = any(isinstance(cb, GUARD_TYPES) for cb in trainer.callback_handler.callbacks)
        if not present:
            for cb in guard_callbacks(ctx.env):
                trainer.add_callback(cb)
        callbacks = "present" if present else "added"
        _say_stack(ctx)
    _journal_trainer(ctx, trainer, record, callbacks)


_stack_said = False


def _say_stack(ctx: "Context") -> None:
    """The stack against oomguard's tested range: once a process (the first Trainer built)."""
    global _stack_said
    if not _stack_said:
        _stack_said = True
        from oomguard.guard.stack import journal_stack

        journal_stack(ctx.journal, ctx.env.attempt, ctx.env.rank)


def _journal_trainer(ctx: "Context", trainer: Any, record: "ArgsRecord", callbacks: str) -> None:
    journal = ctx.journal
    if record.auto_find_forced_off:
        journal.emit("auto_find_batch_size_off", trainer=type(trainer).__name__,
                     detail="the script set auto_find_batch_size=True; oomguard turned it off because the "
                            "supervisor owns batch-size changes and two adapters fight (DESIGN §5). "
                            f"To keep it, set {protocol.ENV_BOOTSTRAP_SKIP}=knobs.")
    ctx.rank_journal.emit(  # every rank: the banner that shows all ranks run the same knobs
        protocol.EVENT_BOOTSTRAP_TRAINER, trainer=type(trainer).__name__, args_class=type(trainer.args).__name__,
        attempt=ctx.env.attempt, world_size=ctx.env.world_size,
        knobs=[c.to_dict() for c in record.changes], not_applied=[s.to_dict() for s in record.skipped],
        auto_find_batch_size_forced_off=record.auto_find_forced_off, output_dir=record.output_dir,
        callbacks=callbacks, lora=list(ctx.lora), skip=sorted(p.value for p in ctx.switches.skip))
    _observe_built(ctx, trainer)


def _observe_built(ctx: "Context", trainer: Any) -> None:
    """``recipe_observed`` (stage built): the recipe this Trainer will run, read from the objects the
    child built, after oomguard's orders. On attempt 1 it is the run's ``requested``."""
    from oomguard.guard.observe import observe

    try:
        seen = observe(trainer, stage=protocol.STAGE_BUILT, extra_knobs=ctx.env.observe)
    except Exception as exc:  # an odd trainer must not die of being watched; the supervisor says unverified
        ctx.journal.emit("recipe_unreadable", stage=protocol.STAGE_BUILT, error=f"{type(exc).__name__}: {exc}")
        return
    ctx.rank_journal.emit(protocol.EVENT_RECIPE_OBSERVED, attempt=ctx.env.attempt, **seen)


def choose_resume(code_value: Any, supervisor: str | None, attempt: int) -> tuple[Any, Via | None]:
    """The checkpoint to resume from and how it got there. Pure.

    The supervisor's choice wins; on a later attempt without one it chose a fresh start
    (``False``: the script's own ``resume_from_checkpoint=True`` would find a checkpoint the
    supervisor rejected). On attempt 1 with no choice the script's value stands.
    """
    if supervisor:
        return supervisor, (Via.FLAG if str(code_value) == supervisor else Via.IN_PROCESS)
    if attempt > 1:
        return False, (Via.IN_PROCESS if code_value not in (None, False) else None)
    return code_value, None


def guarded(ctx: "Context", trainer: Any, original_train, args: tuple, kwargs: dict):
    """``Trainer.train`` under oomguard: the supervisor's checkpoint, the guard's error handling."""
    from oomguard.guard.train import guarded_train, is_guarded

    if ctx.switches.patching and os.environ.get(ENV_PROBE, "").strip():  # issue 18 probe: measure, never train
        from oomguard.guard.probe import probe_and_exit

        probe_and_exit(ctx, trainer, original_train)
    if is_guarded(trainer) or not ctx.switches.patching:
        return original_train(trainer, *args, **kwargs)  # already inside guarded_train, or nothing to do
    code_value = kwargs.pop("resume_from_checkpoint", args[0] if args else None)
    rest = args[1:]
    resume = code_value
    if ctx.on(Part.RESUME):
        resume, how = choose_resume(code_value, ctx.env.resume_from, ctx.env.attempt)
        if how is not None:
            ctx.journal.emit("bootstrap_resume", code_value=code_value, used=resume, via=how.value)
    if not ctx.on(Part.CALLBACKS):
        return original_train(trainer, resume, *rest, **kwargs)

    def call(resume_from_checkpoint=None):
        try:
            return original_train(trainer, resume_from_checkpoint, *rest, **kwargs)
        except Exception as exc:  # the failed step's rows, for the culprit evidence (issue 19); then as before
            from oomguard.guard.culprit import record_failure

            record_failure(trainer, exc)
            raise

    # False, not None: guarded_train reads None as "the supervisor's checkpoint"
    return guarded_train(trainer, env=ctx.env, resume_from_checkpoint=False if resume is None else resume,
                         train_fn=call)
