"""Loading the QLoRA model: 4-bit NF4 base, k-bit preparation, LoRA adapter.

One deliberate change from the classic recipe: ``prepare_model_for_kbit_training``
upcasts every non-quantized weight to fp32, including the frozen input embeddings
and ``lm_head`` (2 GiB on a 128k vocabulary, DESIGN §6). Frozen weights gain nothing
from fp32, so we keep those two in the compute dtype; ``--upcast_embeddings``
restores the old behaviour. Norms still go to fp32 for stability.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from oomguard.recipes.options import RecipeOptions

__all__ = ["attach_lora", "count_4bit_layers", "Device", "DTYPES", "load_base_model", "load_tokenizer", "lora_config",
           "pick_device", "prepare_quantized", "quantization_config", "trainable_to_fp32"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Device:
    """Where and how the recipe trains, after any fallback."""

    name: str  # "cuda" or "cpu"
    precision: str  # bf16 | fp16 | fp32
    optim: str  # the Trainer's optimizer name
    fallbacks: tuple[str, ...] = ()  # human-readable lines, one per fallback taken

    @property
    def use_cpu(self) -> bool:
        return self.name == "cpu"


def pick_device(options: RecipeOptions) -> Device:
    """CUDA with paged AdamW and bf16 where supported; otherwise CPU, with each fallback stated."""
    optim = options.optim or "paged_adamw_32bit"
    if torch.cuda.is_available():
        best = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Device("cuda", options.precision or best, optim)
    # bf16 autocast runs on CPU (checked: torch 2.13, NF4 compute in bf16), so the
    # CPU path keeps the GPU's default precision
    fallbacks = ["training on CPU (use_cpu=True)"]
    precision = options.precision or "bf16"
    if precision == "fp16":
        # fp16 mixed precision needs a CUDA grad scaler
        fallbacks.append("precision fp16 -> bf16 (fp16 mixed precision needs CUDA)")
        precision = "bf16"
    if optim.startswith("paged_"):
        # bitsandbytes pages optimizer state through CUDA managed memory; on CPU the
        # same optimizer runs unpaged (checked: bitsandbytes 0.50), same state format
        fallbacks.append(f"optimizer {optim} runs unpaged (paging needs CUDA)")
    return Device("cpu", precision, optim, tuple(fallbacks))


def quantization_config(precision: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[precision],
    )


def load_tokenizer(path: str):
    """The tokenizer, with Llama-3's missing pad token fixed (pad = eos, right padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training pads right; left is for generation
    return tokenizer


def load_base_model(path: str, options: RecipeOptions, device: Device, tokenizer):
    from transformers import AutoModelForCausalLM

    place = int(os.environ.get("LOCAL_RANK", "0") or 0) if device.name == "cuda" else "cpu"  # one GPU per rank
    kwargs = {"dtype": DTYPES[device.precision], "device_map": {"": place}}
    if options.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(device.precision)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    model.config.pad_token_id = tokenizer.pad_token_id
    if options.load_in_4bit:
        prepare_quantized(model, upcast_embeddings=options.upcast_embeddings)
    return model


def prepare_quantized(model, *, upcast_embeddings: bool) -> None:
    """``prepare_model_for_kbit_training`` without its checkpointing call (the Trainer
    enables checkpointing from ``activation_checkpointing``, without the deprecated
    ``gradient_checkpointing_enable``) and, by default, without upcasting embeddings."""
    if upcast_embeddings:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        keep = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
        for param in model.parameters():
            param.requires_grad = False
            low = param.dtype in (torch.float16, torch.bfloat16)
            if low and id(param) not in keep and param.__class__.__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
    # checkpointed blocks need an input that requires grad, or no gradient reaches the adapter
    model.enable_input_require_grads()


def lora_config(options: RecipeOptions):
    from peft import LoraConfig

    targets = options.target_modules.strip()
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, options: RecipeOptions):
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` alias itself: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config(options))


def trainable_to_fp32(model) -> int:
    """Keep the adapter (every trainable tensor) in fp32, as QLoRA does: fp16 AMP's GradScaler
    cannot unscale bf16/fp16 gradients, and low-precision master weights lose small updates.
    Seen on the GPU image (transformers 5.17, peft 0.21.0): LoRA weights came out bf16 under
    precision fp16 and the first optimizer step crashed. Returns how many tensors were cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            cast += 1
    return cast


def count_4bit_layers(model) -> int:
    """How many bitsandbytes ``Linear4bit`` layers the model holds (0 = not quantized)."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
