"""Resuming a checkpoint under changed knobs: the sample ledger, the data position, the adapter cut.

- :mod:`prepare`: :func:`prepare_resume`, the entry point (precision check, resume mode, the copy);
- :mod:`ledger`: which rows each optimizer step consumed, per rank;
- :mod:`position`: the exact next sample after an effective-batch change;
- :mod:`packed`: the exact next examples after a packed ``max_length`` change;
- :mod:`raw_data`: each Trainer's raw training dataset (captured by the bootstrap);
- :mod:`adapter` (math in :mod:`lora_cut`): a checkpoint's LoRA adapter cut to a new rank.
"""

from oomguard.guard.resume.lora_cut import LoraCutError
from oomguard.guard.resume.prepare import PrecisionError, bf16_refusal, check_precision, prepare_resume
from oomguard.guard.resume.raw_data import raw_dataset, remember_raw_dataset

__all__ = ["LoraCutError", "PrecisionError", "bf16_refusal", "check_precision", "prepare_resume", "raw_dataset",
           "remember_raw_dataset"]
