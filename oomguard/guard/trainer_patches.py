"""Every private internal of transformers / trl / peft / accelerate / torch that oomguard patches, calls
or reads — the one file to audit on an upgrade.

The guard and the bootstrap reach these names only through this module: :data:`INTERNALS` lists
each with what oomguard does to it and why, :data:`TESTED_RANGE` the versions it is tested
in, and :func:`missing` tells which are absent from the installed packages (a unit test
asserts none is). Public methods oomguard wraps (``train``, ``training_step``, ...) are listed
too: wrapping changes behaviour even where the name is public.

Importing this module imports only the standard library; the accessors import what they touch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import inspect
import re
from typing import Any, Callable, Iterator

__all__ = ["FLOOR", "INNER_TRAINING_LOOP", "INTERNALS", "Internal", "SAVE_CHECKPOINT", "TESTED_RANGE", "Use",
           "set_train_batch_size",
           "allow_numpy_rng_state", "gradient_accumulation_divisor", "inf_norms", "keep_args_batch_size",
           "keep_train_sampler_over", "keep_trainable_dtypes", "loss_scaled_for_ga", "load_optimizer_on_cpu",
           "minor_version", "missing", "missing_loaded",
           "pack_dataset", "prepare_sft_dataset", "save_checkpoint", "train_batch_size", "wrap_instance_method"]

# The range the test suite exercises every internal below in (CI: the current stack and an older pinned one,
# tests/compat; GPU: transformers 5.17). (low, high) by major.minor, both ends tested.
TESTED_RANGE = {"transformers": ("4.57", "5.24"), "trl": ("0.24", "1.16"), "peft": ("0.17", "0.21"),
                "accelerate": ("1.11", "1.16"), "datasets": ("4.0", "5.2"), "torch": ("2.11", "2.13")}
# Below these the guard still installs but says the run is unsupported (checked by hand once, issue 16:
# transformers 4.46 / trl 0.12 / peft 0.13 / accelerate 1.0 / datasets 3.1 on torch 2.13).
FLOOR = {"transformers": "4.46", "trl": "0.12", "peft": "0.13", "accelerate": "1.0"}


class Use(str, enum.Enum):
    WRAPS = "wraps"  # replaced on the instance or class by a function that calls the original
    CALLS = "calls"  # called directly
    READS = "reads"  # an attribute read
    SETS = "sets"  # an attribute written
    NAMES = "names"  # matched by name (a stack frame)


@dataclasses.dataclass(frozen=True)
class Internal:
    owner: str  # "module:Class" or "module"
    name: str
    use: Use
    params: tuple[str, ...] | None  # the parameter names oomguard relies on (None: an attribute)
    where: str  # the oomguard module that uses it
    why: str


_T, _TRL = "transformers.trainer:Trainer", "trl:SFTTrainer"
INTERNALS: tuple[Internal, ...] = (
    Internal(_T, "__init__", Use.WRAPS, ("self", "model", "args", "data_collator", "train_dataset"),
             "bootstrap.trainer", "knobs onto args, the guard's callbacks, the raw dataset captured"),
    Internal(_T, "train", Use.WRAPS, ("self", "resume_from_checkpoint"), "bootstrap.trainer",
             "the supervisor's checkpoint; the run under guarded_train"),
    Internal(_T, "evaluate", Use.WRAPS, ("self",), "guard.train", "phase eval for the error record"),
    Internal(_T, "training_step", Use.WRAPS, ("self", "model", "inputs"), "guard.train, guard.resume.ledger",
             "the micro-batch loss for the NaN guard; rows consumed for the ledger"),
    Internal(_T, "get_train_dataloader", Use.WRAPS, ("self",), "guard.resume.ledger",
             "the sampler wrapped to record the indices handed out"),
    Internal(_T, "_save_checkpoint", Use.WRAPS, ("self", "model", "trial"), "guard.train",
             "phase save; called directly for the emergency checkpoint"),
    Internal(_T, "_load_from_checkpoint", Use.WRAPS, ("self", "resume_from_checkpoint", "model"),
             "guard.resume.prepare", "trainable parameters keep their dtype across PEFT's adapter load"),
    Internal(_T, "_load_optimizer_and_scheduler", Use.WRAPS, ("self", "checkpoint"), "guard.resume.prepare",
             "resume mode optimizer_on_cpu: every torch.load inside maps to CPU"),
    Internal(_T, "_load_rng_state", Use.WRAPS, ("self", "checkpoint"), "guard.resume.prepare",
             "transformers < 4.47 loads rng_state.pth with torch's weights_only default, which torch >= 2.6 "
             "refuses for its numpy state: the resume runs under the allowlist later transformers use"),
    Internal(_T, "_get_train_sampler", Use.WRAPS, ("self",), "guard.resume.packed",
             "after a packed re-index the sampler stays over the re-packed rows only"),
    Internal(_T, "_train_batch_size", Use.READS, None, "guard.resume.ledger",
             "rows of a micro-batch whose tensors cannot tell (padding-free packing)"),
    Internal(_T, "_train_batch_size", Use.SETS, None, "guard.probe",
             "the probe trains each configuration by the Trainer's own train(): transformers 5.x reads the batch "
             "into _train_batch_size once, in __init__"),
    Internal(_T, "model_accepts_loss_kwargs", Use.READS, None, "guard.culprit",
             "a split culprit step copies training_step's rule: is the loss normalised by num_items_in_batch"),
    Internal(_T, "current_gradient_accumulation_steps", Use.WRAPS, None, "guard.culprit",
             "a split culprit step with a mean loss: each chunk's divisor set to GA / its share of label tokens, "
             "restored after the chunk (the step's gradient unchanged)"),
    Internal(_T, "_inner_training_loop", Use.NAMES, ("self", "batch_size", "args", "resume_from_checkpoint"),
             "guard.callbacks.in_force", "the Trainer class, found from a callback by its frame"),
    Internal(_T, "_inner_training_loop", Use.WRAPS, ("self", "batch_size"), "guard.resume.prepare",
             "a resume trains at args' batch: transformers < 5.2 takes the checkpoint's train_batch_size instead, "
             "so the batch rung would silently not apply"),
    Internal("transformers.modeling_utils:PreTrainedModel", "__init__", Use.WRAPS, None, "bootstrap.injection",
             "the VRAM cap and allocator defaults before the first model's weights load"),
    Internal(_TRL, "_prepare_dataset", Use.CALLS,
             ("self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
             "guard.resume.packed", "the raw dataset tokenized as TRL does, to map packed rows to examples"),
    Internal(_TRL, "padding_free", Use.READS, None, "guard.resume.ledger", "a batch's rows are one sequence"),
    Internal("trl.data_utils", "pack_dataset", Use.CALLS, ("dataset", "seq_length", "strategy", "map_kwargs"),
             "guard.resume.packed", "replays TRL's packing on example ids"),
    Internal("peft.config:PeftConfigMixin", "from_peft_type", Use.WRAPS, None, "bootstrap.lora",
             "configs loaded from a checkpoint are told from configs the child builds"),
    Internal("peft.tuners.lora.config:LoraConfig", "__post_init__", Use.WRAPS, ("self",), "bootstrap.lora",
             "the ordered lora_r / lora_alpha on every LoraConfig the child builds"),
    Internal("accelerate.data_loader:BatchSamplerShard", "batch_sampler", Use.READS, None, "guard.resume.ledger",
             "the sampler found under accelerate's nested batch samplers"),
    Internal("transformers.integrations:WandbCallback", "_wandb", Use.READS, None, "guard.callbacks.trackers",
             "the W&B run id an attempt writes (the next attempt continues it)"),
    Internal("transformers.integrations:WandbCallback", "_initialized", Use.READS, None, "guard.callbacks.trackers",
             "whether the W&B run exists yet"),
    Internal("transformers.integrations:MLflowCallback", "_ml_flow", Use.READS, None, "guard.callbacks.trackers",
             "the MLflow run id an attempt writes (the next attempt continues it)"),
    Internal("transformers.integrations:TensorBoardCallback", "logging_dir", Use.READS, None,
             "guard.callbacks.trackers", "the TensorBoard run dir an attempt writes (the next one reuses it)"),
    Internal("torch", "_foreach_norm", Use.CALLS, None, "guard.callbacks.nan", "one fused finiteness check"),
    Internal("torch", "load", Use.WRAPS, None, "guard.resume.prepare", "mapped to CPU in optimizer_on_cpu"),
)

INNER_TRAINING_LOOP = "_inner_training_loop"  # a frame name
SAVE_CHECKPOINT = "_save_checkpoint"  # wrapped by name (wrap_instance_method)


def minor_version(version: str) -> tuple[int, ...]:
    """``"4.57.6+cu124"`` -> ``(4, 57)``, ``"2.6.0.dev2024"`` -> ``(2, 6)``: major.minor by leading digits. Pure."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = re.match(r"\d*", piece).group()
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _resolve(owner: str) -> Any:
    module, _, cls = owner.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, cls) if cls else obj


def _problem(item: Internal) -> str | None:
    try:
        owner = _resolve(item.owner)
    except (ImportError, AttributeError) as exc:
        return f"{item.owner}: {exc}"
    if item.params is None:  # an attribute, possibly set per instance: the class must mention it
        found = hasattr(owner, item.name) or _mentions(owner, item.name)
        return None if found else f"{item.owner}.{item.name} is gone"
    target = getattr(owner, item.name, None)
    if target is None:
        return f"{item.owner}.{item.name} is gone"
    names = list(inspect.signature(target).parameters)
    lacking = [p for p in item.params if p not in names]
    return f"{item.owner}.{item.name}{inspect.signature(target)} lacks {lacking}" if lacking else None


def _mentions(owner: Any, name: str) -> bool:
    """``name`` appears in the source of ``owner`` or a base class (a class made at run time, like Unsloth's
    SFTTrainer, has no source of its own; trl's is in its bases)."""
    for klass in getattr(owner, "__mro__", (owner,)):
        try:
            if name in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            continue
    return False


def missing(internals: tuple[Internal, ...] = INTERNALS) -> list[str]:
    """What of ``internals`` the installed packages lack (name or parameters); [] when all is there."""
    return [p for p in map(_problem, internals) if p is not None]


def missing_loaded(internals: tuple[Internal, ...] = INTERNALS) -> list[tuple[Internal, str]]:
    """Like :func:`missing`, for the packages this process already imported only (it imports nothing new:
    a plain HF script is not made to import trl), each with the internal it concerns."""
    import sys

    loaded = [i for i in internals if i.owner.partition(":")[0].split(".")[0] in sys.modules]
    return [(i, p) for i in loaded if (p := _problem(i)) is not None]


# --- the accessors the guard uses ------------------------------------------------------------------
def wrap_instance_method(obj: Any, name: str, around: Callable[..., Any]) -> None:
    """``obj.name = around(original, *args, **kwargs)`` on this instance only (class untouched)."""
    original = getattr(obj, name)
    setattr(obj, name, functools.wraps(original)(functools.partial(around, original)))


def save_checkpoint(trainer: Any) -> None:
    """HF's own checkpoint save (``checkpoint-<global_step>`` in ``output_dir``), outside its save schedule."""
    trainer._save_checkpoint(trainer.model, trial=None)


def loss_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """``training_step``'s own rule: True when the loss comes back normalised by ``num_items_in_batch``
    (not divided by the gradient accumulation steps afterwards)."""
    fixed = getattr(trainer, "loss_is_scaled_for_ga", None)  # transformers >= 5.x: a subclass may say
    if fixed is not None:
        return bool(fixed)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


@contextlib.contextmanager
def gradient_accumulation_divisor(trainer: Any, divisor: float) -> Iterator[None]:
    """``training_step`` divides an unnormalised loss by ``divisor`` inside the block."""
    before = trainer.current_gradient_accumulation_steps
    trainer.current_gradient_accumulation_steps = divisor
    try:
        yield
    finally:
        trainer.current_gradient_accumulation_steps = before


def train_batch_size(trainer: Any) -> int:
    """The per-device batch the train dataloader was built with."""
    return int(trainer._train_batch_size)


def set_train_batch_size(trainer: Any, batch: int) -> None:
    """The per-device batch the next ``train()`` builds its dataloader with (the probe's configurations)."""
    trainer._train_batch_size = int(batch)


def keep_args_batch_size(trainer: Any) -> None:
    """A resume trains at ``args.train_batch_size``, not the checkpoint's ``train_batch_size``.

    transformers < 5.2 ``Trainer.train`` replaces the batch with ``trainer_state.json``'s on every
    resume (meant for ``auto_find_batch_size``; 5.2+ does so only with it on): a batch rung would load,
    be reported by the args, and train at the old batch (checked: 4.57). With ``auto_find_batch_size``
    on, the checkpoint's batch is HF's own choice and is kept."""
    original = trainer._inner_training_loop

    def loop(*args, batch_size=None, **kwargs):
        if not getattr(trainer.args, "auto_find_batch_size", False):
            batch_size = trainer.args.train_batch_size
        return original(*args, batch_size=batch_size, **kwargs)

    trainer._inner_training_loop = functools.wraps(original)(loop)


def allow_numpy_rng_state(trainer: Any) -> bool:
    """Backport of transformers 4.47+'s ``safe_globals()`` around ``_load_rng_state``: on torch >= 2.6 with
    an older transformers, a resume crashes on the numpy RNG state HF itself saved (``Weights only load
    failed``). The allowlist is the one later transformers use (numpy arrays and dtypes, no code);
    ``weights_only`` stays on. True when the wrap was needed and installed."""
    import sys

    import torch

    hf = sys.modules.get("transformers.trainer")
    if hf is None or hasattr(hf, "safe_globals") or not hasattr(torch.serialization, "safe_globals"):
        return False
    if minor_version(torch.__version__) < (2, 6):
        return False
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allow = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    original = trainer._load_rng_state

    def load(checkpoint, *args, **kwargs):
        with torch.serialization.safe_globals(allow):
            return original(checkpoint, *args, **kwargs)

    trainer._load_rng_state = functools.wraps(original)(load)
    return True


def keep_train_sampler_over(trainer: Any, dataset: Any) -> None:
    """Every later train sampler is drawn over ``dataset`` whatever ``train_dataset`` became."""
    make_sampler = trainer._get_train_sampler
    if "train_dataset" in inspect.signature(make_sampler).parameters:
        trainer._get_train_sampler = lambda *a, **k: make_sampler(dataset)
        return

    def over_dataset(*args, **kwargs):  # older transformers (4.46): the sampler reads self.train_dataset
        current = trainer.train_dataset
        trainer.train_dataset = dataset
        try:
            return make_sampler()
        finally:
            trainer.train_dataset = current

    trainer._get_train_sampler = over_dataset


def prepare_sft_dataset(trainer: Any, dataset: Any, args: Any, name: str) -> Any:
    """``dataset`` tokenized as TRL's ``SFTTrainer`` does for ``args``, without packing or a formatting func."""
    return trainer._prepare_dataset(dataset, trainer.processing_class, args, False, None, name)


def inf_norms(tensors: list[Any]) -> list[Any]:
    """The max-abs norm of each tensor, in one fused kernel per device (``torch._foreach_norm``)."""
    import torch

    return list(torch._foreach_norm(tensors, float("inf")))


def pack_dataset(dataset: Any, max_length: int, strategy: str, num_proc: int | None) -> Any:
    from trl.data_utils import pack_dataset as trl_pack

    return trl_pack(dataset, max_length, strategy, {"num_proc": num_proc})


def load_optimizer_on_cpu(trainer: Any, before: Callable[[], None] = lambda: None) -> None:
    """Wrap ``trainer._load_optimizer_and_scheduler`` so every ``torch.load`` inside maps to CPU."""
    original = trainer._load_optimizer_and_scheduler

    def load(checkpoint):
        before()
        with _torch_load_on_cpu():
            return original(checkpoint)

    trainer._load_optimizer_and_scheduler = load


@contextlib.contextmanager
def _torch_load_on_cpu() -> Iterator[None]:
    import torch

    real = torch.load

    def on_cpu(f, map_location=None, *args, **kwargs):
        return real(f, "cpu", *args, **kwargs)

    torch.load = on_cpu
    try:
        yield
    finally:
        torch.load = real


def keep_trainable_dtypes(trainer: Any) -> None:
    """Wrap ``trainer._load_from_checkpoint`` so trainable parameters keep the dtype they had.

    PEFT's ``load_adapter`` upcasts a bf16/fp16 adapter to fp32 (``autocast_adapter_dtype``), so a
    resumed run would train in another dtype than the run it continues (checked: the recipe's
    bf16 adapter came back fp32 after a resume, peft 0.21).
    """
    original = trainer._load_from_checkpoint

    def load(checkpoint, *args, **kwargs):
        dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
        result = original(checkpoint, *args, **kwargs)
        for name, p in trainer.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
        return result

    trainer._load_from_checkpoint = load

