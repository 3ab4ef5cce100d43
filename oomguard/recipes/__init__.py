"""Built-in recipes: the QLoRA SFT trainer (``oomguard.recipes.sft``) and the embedded
tiny default model and dataset (``oomguard.recipes.default``). Importing this package
does not import torch; the recipe modules do when they run."""

from oomguard.recipes.default import default_dataset_path, ensure_default_model

__all__ = ["default_dataset_path", "ensure_default_model"]
