"""The raw training dataset of each Trainer: the ``train_dataset`` its constructor was given.

TRL's ``SFTTrainer`` tokenizes and packs ``train_dataset`` inside its constructor, so after a packed
``max_length`` change the rows the ledger recorded cannot be mapped back to examples from the
trainer alone. The bootstrap captures the dataset when any Trainer is built
(:func:`oomguard.bootstrap.trainer.patch_trainer`), so every wrapped TRL script resumes
sample-exactly; a script that uses the guard's API directly calls :func:`remember_raw_dataset`.

Held in a weak-keyed map, not on the trainer: nothing is added to the user's object, and the
dataset lives no longer than its trainer.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["raw_dataset", "remember_raw_dataset"]

_raw: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def remember_raw_dataset(trainer: Any, dataset: Any) -> None:
    """Keep ``dataset`` as ``trainer``'s raw training data (the first one given wins; None is ignored)."""
    if dataset is None:
        return
    try:
        _raw.setdefault(trainer, dataset)
    except TypeError:
        pass  # not weak-referenceable: the packed resume then says it cannot map the examples


def raw_dataset(trainer: Any) -> Any:
    """The raw training dataset remembered for ``trainer``, or None."""
    try:
        return _raw.get(trainer)
    except TypeError:
        return None
