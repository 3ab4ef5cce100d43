"""The built-in QLoRA SFT recipe: ``python -m oomguard.recipes.sft [flags]``.

4-bit NF4 base with double quantization, LoRA on q/k/v/o (or ``all-linear``),
activation checkpointing, paged AdamW 32-bit, ``max_grad_norm`` 0.3, TRL
``SFTTrainer``. Every knob is a flag; under ``oomguard run`` the supervisor's
``OOMGUARD_KNOBS`` / ``OOMGUARD_CHECKPOINT_DIR`` / ``OOMGUARD_RESUME_FROM`` override
them (see :mod:`oomguard.recipes.options`).

The recipe is guarded exactly like a user's script: it builds a plain ``SFTTrainer`` and calls
``trainer.train()``; the bootstrap (``oomguard.bootstrap``) patches ``Trainer`` and does the rest
(callbacks, error record, emergency checkpoint, VRAM cap, the raw dataset for a packed resume).
Under ``oomguard run`` the bootstrap is already installed by ``sitecustomize``; started by hand with
``OOMGUARD_RUN_DIR`` set, the recipe installs the same hooks itself. Outside oomguard nothing is patched.

Checkpoints are written every ``--save_steps`` and none are deleted unless ``--save_total_limit`` is
given: the supervisor rolls back past a NaN to an older checkpoint.

Without CUDA the same 4-bit path runs on CPU (bitsandbytes supports NF4 there);
what fell back (optimizer, precision) is printed on one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings

from oomguard import protocol
from oomguard.errors import OomguardError, UsageError
from oomguard.recipes.options import RecipeOptions, resolve_options

__all__ = ["build_trainer", "main", "sft_config", "train", "warmup_steps"]


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; returns the process exit code (the guard may exit 1 itself on failure)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: models and data are local
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet fork warnings with dataloader workers
    # our fallback line says this once; bitsandbytes would repeat it for every parameter group
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    try:
        options = resolve_options(argv)
        return train(options)
    except OomguardError as exc:  # bad knobs, data or paths: say so without a traceback
        print(f"oomguard sft: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)


def train(options: RecipeOptions) -> int:
    """Load, train (guarded by the bootstrap under oomguard), save the final adapter; 0 on success."""
    _under_bootstrap(options)
    from oomguard.guard.device.allocator import apply_allocator_defaults

    apply_allocator_defaults()  # before torch touches CUDA (the bootstrap does it too; a default either way)
    trainer, resume = build_trainer(options)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(trainer.args.output_dir)  # the final adapter beside the checkpoints
    return 0


def _under_bootstrap(options: RecipeOptions) -> None:
    """The bootstrap's hooks, as any wrapped script has them (a no-op outside oomguard or when in place).

    ``--no_guard`` keeps the guard's callbacks and train wrapper off (``OOMGUARD_BOOTSTRAP_SKIP`` gains
    ``callbacks``); knobs, LoRA and the supervisor's checkpoint still reach the recipe.
    """
    if options.no_guard:
        skip = os.environ.get(protocol.ENV_BOOTSTRAP_SKIP, "")
        os.environ[protocol.ENV_BOOTSTRAP_SKIP] = ",".join(filter(None, (skip, "callbacks")))
    try:
        from oomguard.bootstrap.injection import install
    except ImportError as exc:
        print(f"oomguard sft: WARNING: the bootstrap failed to import ({exc}); training unguarded", file=sys.stderr)
        return
    install()


def build_trainer(options: RecipeOptions):
    """The ready ``SFTTrainer`` and the checkpoint to resume from (or None)."""
    from trl import SFTTrainer

    from oomguard.recipes import default
    from oomguard.recipes import model as qlora
    from oomguard.recipes.dataset import load_sft_dataset

    dataset = load_sft_dataset(options.dataset or default.default_dataset_path())  # bad data fails before loading
    device = qlora.pick_device(options)
    from transformers import set_seed

    set_seed(options.seed)  # issue 5: the LoRA init draws from the global RNG; seeded, two runs compare
    model_path = _model_path(options)
    tokenizer = qlora.load_tokenizer(model_path)
    model = qlora.attach_lora(qlora.load_base_model(model_path, options, device, tokenizer), options)
    _print_banner(options, device, model_path, qlora.count_4bit_layers(model))
    trainer = SFTTrainer(model=model, args=sft_config(options, device), train_dataset=dataset,
                         processing_class=tokenizer)
    qlora.trainable_to_fp32(trainer.model)  # after the trainer: it may have re-cast the model
    return trainer, _resume_target(options)


def _model_path(options: RecipeOptions) -> str:
    """--model as a local directory, or the embedded default (never a hub download)."""
    from oomguard.recipes import default

    if options.model is None:
        return str(default.ensure_default_model())
    if not os.path.isdir(options.model):
        raise UsageError(f"--model {options.model!r} is not a local directory; downloads are off, so pass "
                         "the folder holding config.json and the weights (or omit --model for the tiny default)")
    return options.model


def warmup_steps(options: RecipeOptions) -> int | float:
    """Steps of warmup: ``warmup_ratio`` left transformers 5, so convert it here.

    Without ``max_steps`` the length is unknown until the dataloader exists; a float
    below 1 is then passed through, which transformers reads as a ratio.
    """
    if options.max_steps > 0:
        return math.ceil(options.max_steps * options.warmup_ratio)
    return options.warmup_ratio


def sft_config(options: RecipeOptions, device):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=options.output_dir,
        max_length=options.max_seq_length,
        dataset_text_field="text",
        packing=options.packing,
        per_device_train_batch_size=options.per_device_train_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        auto_find_batch_size=False,  # the supervisor owns batch changes; two adapters fight (DESIGN §5)
        learning_rate=options.learning_rate,
        max_grad_norm=options.max_grad_norm,
        lr_scheduler_type=options.lr_scheduler_type,
        warmup_steps=warmup_steps(options),
        max_steps=options.max_steps,
        num_train_epochs=options.num_train_epochs,
        optim=device.optim,
        bf16=device.precision == "bf16",
        fp16=device.precision == "fp16",
        **_checkpointing_kwarg(SFTConfig, options.activation_checkpointing),
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        logging_steps=options.logging_steps,
        seed=options.seed,
        dataloader_num_workers=options.dataloader_num_workers,
        dataloader_pin_memory=options.dataloader_pin_memory and not device.use_cpu,
        use_cpu=device.use_cpu,
        report_to="none",
    )


def _checkpointing_kwarg(config_class, enabled: bool) -> dict[str, bool]:
    """transformers 5.23 renamed ``gradient_checkpointing`` to ``activation_checkpointing``
    (the old name warns); older 5.x (e.g. 5.17 on the GPU image) knows only the old one."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _resume_target(options: RecipeOptions) -> str | None:
    """The checkpoint to resume from; ``last`` picks the newest in ``output_dir``."""
    target = options.resume_from_checkpoint
    if target != "last":
        return target
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(options.output_dir) if os.path.isdir(options.output_dir) else None


def _print_banner(options: RecipeOptions, device, model_path: str, n_4bit: int) -> None:
    if device.fallbacks:
        print(f"oomguard sft: no CUDA: {'; '.join(device.fallbacks)}", flush=True)
    knobs = {**options.knobs(), "precision": device.precision}
    print(
        f"oomguard sft: model={model_path} 4bit={'yes' if n_4bit else 'no'} ({n_4bit} Linear4bit) "
        f"device={device.name} optim={device.optim} resume={options.resume_from_checkpoint or 'no'} knobs={knobs}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
