"""The knob registry: one table of every knob oomguard may observe or change. Stdlib only.

Both sides read it: the supervisor's command editor (CLI spellings), the in-child bootstrap
(argument-class fields, the PEFT field), ``decide()`` (what a rung needs the child to have) and
the report. Nothing else lists knob names.

A knob the policy declares that is not in the table (``warmup_steps``, ``weight_decay``...)
gets :func:`spec` 's generic entry: the flag ``--<name>`` and the argument field ``<name>``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

__all__ = ["ACTIVATION_OFFLOAD", "ALLOC_CONF_ENVS", "alloc_conf_in", "BATCH", "coerce", "CORE", "Delivery",
           "effective_batch",
           "ENV_KNOBS", "EVAL_BATCH", "EXPANDABLE_SEGMENTS", "flag_spellings", "GRAD_ACCUM", "GRADIENT_CHECKPOINTING",
           "KnobSpec", "LEARNING_RATE", "LORA_ALPHA", "LORA_R", "MAX_GRAD_NORM", "MAX_SEQ_LENGTH", "needs",
           "NUM_WORKERS", "OPTIM", "OPTIMIZER_NAMES", "OUTPUT_DIR_FLAGS", "PRECISION", "PRECISION_BOOL_FIELDS",
           "precision_of", "PRECISIONS", "Resume", "RESUME_FLAGS", "spec", "value_problem"]

# Knob names (contract, DESIGN §3); protocol re-exports the core ones.
MAX_SEQ_LENGTH = "max_seq_length"
BATCH = "per_device_train_batch_size"
GRAD_ACCUM = "gradient_accumulation_steps"
LORA_R = "lora_r"
LORA_ALPHA = "lora_alpha"
PRECISION = "precision"
LEARNING_RATE = "learning_rate"
MAX_GRAD_NORM = "max_grad_norm"
EVAL_BATCH = "per_device_eval_batch_size"
NUM_WORKERS = "dataloader_num_workers"
# issue 18 item 6: rungs that free memory without changing what is trained (optim: nearly; see its entry)
GRADIENT_CHECKPOINTING = "gradient_checkpointing"
ACTIVATION_OFFLOAD = "activation_offload"  # checkpointed layers' saved inputs held in pinned host memory
OPTIM = "optim"
EXPANDABLE_SEGMENTS = "expandable_segments"
# torch >= 2.9 reads PYTORCH_ALLOC_CONF first, PYTORCH_CUDA_ALLOC_CONF when it is unset (c10 AllocatorConfig)
ALLOC_CONF_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def alloc_conf_in(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(the allocator variable torch reads, its value): the first of :data:`ALLOC_CONF_ENVS` that is set
    (``PYTORCH_ALLOC_CONF`` wins, torch >= 2.9); (None, "") when neither is. The supervisor (what to merge an
    ``expandable_segments`` order into) and the child (what it was started with) read it alike."""
    for name in ALLOC_CONF_ENVS:
        if environ.get(name) is not None:
            return name, environ[name]
    return None, ""

# transformers' ``OptimizerNames`` values (5.17-5.24); a unit test checks the list against the installed enum
# (the policy layer cannot import transformers).
OPTIMIZER_NAMES = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw")

CORE = (MAX_SEQ_LENGTH, BATCH, GRAD_ACCUM, LORA_R, LORA_ALPHA, PRECISION)
PRECISIONS = ("bf16", "fp16", "fp32")


class Delivery(str, enum.Enum):
    """How a knob change can reach the child."""

    FLAG = "flag"  # a flag the command already has, edited in its own style (never appended)
    PLACEHOLDER = "placeholder"  # a ``{knob}`` placeholder in the command
    IN_PROCESS = "in_process"  # the bootstrap sets it on the arguments / LoraConfig / optimizer the child built
    ENV = "env"  # the supervisor sets it in the child's environment (read before torch is imported)


class Resume(str, enum.Enum):
    """How a change of the knob affects resuming (DESIGN §5); values = policy ResumeClass."""

    SAFE = "safe"
    REINDEX = "reindex"
    TRANSFORM = "transform"
    NUMERIC = "numeric"


@dataclasses.dataclass(frozen=True)
class KnobSpec:
    """One knob: where it lives in commands, argument objects and PEFT configs.

    ``flags``: CLI spellings, newest/most common first, without the dash variants
    (:func:`flag_spellings` adds ``--a-b`` for ``--a_b``); ``fields``: argument-class fields
    (HF ``TrainingArguments``, TRL ``SFTConfig``, other trainers' configs), newest first;
    ``peft_field``: the ``peft.LoraConfig`` field; ``value``: ``int`` | ``float`` | ``precision`` | ``bool`` |
    ``choice`` (one of ``choices``); ``env``: the child's environment variables that carry it (an env knob
    has no flag and no field: the supervisor delivers it, ``supervisor/alloc_env.py``).
    """

    name: str
    flags: tuple[str, ...]
    fields: tuple[str, ...]
    value: str
    resume: Resume
    peft_field: str | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()
    env: tuple[str, ...] = ()

    @property
    def deliveries(self) -> tuple[Delivery, ...]:
        if self.env:
            return (Delivery.ENV,)
        return tuple(d for d in Delivery if d is not Delivery.ENV)


_LENGTH_NAMES = ("max_seq_length", "max_length", "max_seq_len", "block_size", "cutoff_len", "sequence_len",
                 "seq_len", "seq_length", "model_max_length", "context_length")

REGISTRY: dict[str, KnobSpec] = {k.name: k for k in (
    KnobSpec(MAX_SEQ_LENGTH, tuple(f"--{n}" for n in _LENGTH_NAMES), _LENGTH_NAMES, "int", Resume.REINDEX,
             doc="tokens per row: TRL >= 0.20 max_length, older max_seq_length, run_clm block_size, "
                 "LLaMA-Factory cutoff_len, axolotl sequence_len, torchtune max_seq_len"),
    KnobSpec(BATCH, ("--per_device_train_batch_size", "--micro_batch_size", "--per_device_batch_size"),
             ("per_device_train_batch_size", "micro_batch_size"), "int", Resume.SAFE),
    KnobSpec(GRAD_ACCUM, ("--gradient_accumulation_steps", "--gradient_accumulation", "--grad_accum_steps",
                          "--grad_accum", "--accumulate_grad_batches"),
             ("gradient_accumulation_steps", "gradient_accumulation", "grad_accum_steps"), "int", Resume.SAFE),
    KnobSpec(LORA_R, ("--lora_r", "--lora_rank"), ("lora_r", "lora_rank"), "int", Resume.TRANSFORM,
             peft_field="r"),
    KnobSpec(LORA_ALPHA, ("--lora_alpha",), ("lora_alpha",), "float", Resume.TRANSFORM, peft_field="lora_alpha"),
    KnobSpec(PRECISION, ("--precision",), ("bf16", "fp16"), "precision", Resume.NUMERIC,
             doc="the pair bf16/fp16 (bool flags --bf16/--fp16 in any style), or --precision bf16|fp16|fp32"),
    KnobSpec(LEARNING_RATE, ("--learning_rate", "--lr"), ("learning_rate",), "float", Resume.NUMERIC),
    KnobSpec(MAX_GRAD_NORM, ("--max_grad_norm",), ("max_grad_norm",), "float", Resume.NUMERIC),
    KnobSpec(EVAL_BATCH, ("--per_device_eval_batch_size",), ("per_device_eval_batch_size",), "int", Resume.SAFE),
    KnobSpec(NUM_WORKERS, ("--dataloader_num_workers",), ("dataloader_num_workers",), "int", Resume.SAFE),
    # recompute instead of keep: the same math (RNG state is replayed), slower; transformers >= 5.23 names it
    # activation_checkpointing and keeps gradient_checkpointing as a mirrored alias: both are set
    KnobSpec(GRADIENT_CHECKPOINTING, ("--activation_checkpointing", "--gradient_checkpointing"),
             ("activation_checkpointing", "gradient_checkpointing"), "bool", Resume.SAFE,
             doc="bool; verified on the live model (a layer with gradient_checkpointing on)"),
    KnobSpec(ACTIVATION_OFFLOAD, (), ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"), "bool",
             Resume.SAFE, doc="the 'offload' key of the checkpointing kwargs (transformers >= 5.24 only); needs "
                              "gradient_checkpointing on; set in-process"),
    # 8-bit optimizer states are quantized, and moments cannot cross optimizer classes: numeric
    KnobSpec(OPTIM, ("--optim",), ("optim",), "choice", Resume.NUMERIC, choices=OPTIMIZER_NAMES,
             doc="transformers' OptimizerNames; a state saved by another optimizer is reset at resume (said)"),
    KnobSpec(EXPANDABLE_SEGMENTS, (), (), "bool", Resume.SAFE, env=ALLOC_CONF_ENVS,
             doc="expandable_segments in the allocator config; only the supervisor can deliver it"),
)}
# Knobs that reach the child through its environment only (never a flag, never a field).
ENV_KNOBS = tuple(k.name for k in REGISTRY.values() if k.env)

# The bool flags that carry ``precision`` (field -> the precision it turns on).
PRECISION_BOOL_FIELDS = {"bf16": "bf16", "fp16": "fp16"}
RESUME_FLAGS = ("--resume_from_checkpoint", "--resume-from-checkpoint")
OUTPUT_DIR_FLAGS = ("--output_dir", "--output-dir")


def spec(name: str, extra_flags: tuple[str, ...] = ()) -> KnobSpec:
    """The registry entry of ``name`` (a generic one for a policy-declared knob), with the
    policy's own extra spellings (``flags.<knob>.names``) first."""
    base = REGISTRY.get(name) or KnobSpec(name, (f"--{name}",), (name,), "float", Resume.NUMERIC)
    if not extra_flags:
        return base
    return dataclasses.replace(base, flags=tuple(dict.fromkeys((*extra_flags, *base.flags))))


def flag_spellings(flags: tuple[str, ...]) -> tuple[str, ...]:
    """Each flag as written and with ``_`` <-> ``-`` swapped after the leading dashes."""
    out: list[str] = []
    for f in flags:
        body = f.lstrip("-")
        dashes = f[: len(f) - len(body)]
        out += [f, dashes + body.replace("_", "-"), dashes + body.replace("-", "_")]
    return tuple(dict.fromkeys(out))


def precision_of(bf16: Any, fp16: Any) -> str:
    """The precision a pair of bf16/fp16 values means."""
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def effective_batch(knobs: Mapping[str, Any], world_size: int = 1) -> int | None:
    """Samples per optimizer step (per-device batch x accumulation x ranks); None when unknown.
    The one definition: a missing accumulation is unknown, not 1."""
    b, g = knobs.get(BATCH), knobs.get(GRAD_ACCUM)
    if not _is_int(b) or not _is_int(g):
        return None
    return int(b) * int(g) * int(world_size)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TRUE, _FALSE = ("true", "1", "yes", "on", "t", "y"), ("false", "0", "no", "off", "f", "n")


def coerce(name: str, value: Any) -> Any:
    """``value`` as knob ``name``'s type (text from a command line or a journal)."""
    kind = spec(name).value
    if kind == "bool" and isinstance(value, str):
        low = value.strip().lower()
        return True if low in _TRUE else False if low in _FALSE else value
    if kind in ("precision", "choice", "bool") or value is None or isinstance(value, bool):
        return value
    try:
        if kind == "int":
            f = float(value)
            return int(f) if f.is_integer() else f
        return float(value)
    except (TypeError, ValueError):
        return value


def value_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid value of registry knob ``name`` (None: it is, or the knob has no rule)."""
    entry = REGISTRY.get(name)
    if entry is None:
        return None
    if entry.value == "bool" and not isinstance(value, bool):
        return f"{name} is true or false (got {type(value).__name__} {value!r})"
    if entry.value == "choice" and value not in entry.choices:
        near = [c for c in entry.choices if str(value).lower() in c or c in str(value).lower()][:4]
        return (f"{value!r} is not a {name} transformers knows (expected one of OptimizerNames"
                f"{', e.g. ' + ', '.join(near) if near else ', e.g. adamw_torch, paged_adamw_8bit'})")
    return None


def needs(rung_knob: str, op: str) -> tuple[str, ...]:
    """The knobs a rung must be able to change in the child: halve_batch moves the batch and
    the accumulation together (else the effective batch would change)."""
    return (BATCH, GRAD_ACCUM) if op == "halve_batch" else (rung_knob,)
