"""Built-in recipes: the QLoRA SFT trainer (``oomguard.recipes.sft``) and the embedded
tiny default model and dataset (``oomguard.recipes.default``). Importing this package
does not import torch; the recipe modules do when they run."""

import importlib.util

from oomguard.recipes.default import default_dataset_path, ensure_default_model

__all__ = ["TRAIN_EXTRA", "TRAINING_STACK", "default_dataset_path", "ensure_default_model", "missing_training_stack"]

# what the built-in recipe imports (the ``train`` extra of the package: pyproject.toml)
TRAINING_STACK = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")
TRAIN_EXTRA = 'pip install "oomguard[train]"'


def missing_training_stack() -> list[str]:
    """The recipe's packages this interpreter cannot import (found without importing them)."""
    return [name for name in TRAINING_STACK if importlib.util.find_spec(name) is None]
