"""The one list of private internals: all present in the installed stack, and used nowhere else."""

import re
from pathlib import Path

from oomguard.guard import trainer_patches as internals

ROOT = Path(__file__).resolve().parents[2] / "oomguard"
PRIVATE = re.compile(r"\._(save_checkpoint|load_from_checkpoint|get_train_sampler|load_optimizer_and_scheduler|"
                     r"prepare_dataset|train_batch_size|inner_training_loop|wrap_model|foreach_norm|load_rng_state)\b|"
                     r"[\"'](_inner_training_loop|_save_checkpoint)[\"']|\bpack_dataset\(")


def test_every_listed_internal_exists_with_the_parameters_relied_on():
    assert internals.missing() == []


def test_a_vanished_internal_is_reported():
    gone = internals.Internal("transformers.trainer:Trainer", "_no_such_method", internals.Use.WRAPS, ("self",),
                              "nowhere", "test")
    renamed = internals.Internal("transformers.trainer:Trainer", "train", internals.Use.WRAPS, ("self", "resume"),
                                 "nowhere", "test")
    assert [p.split(" ")[0] for p in internals.missing((gone, renamed))] == [
        "transformers.trainer:Trainer._no_such_method", "transformers.trainer:Trainer.train(self,"]


def test_no_other_guard_or_bootstrap_module_touches_them():
    offenders = []
    for path in [*ROOT.glob("guard/**/*.py"), *ROOT.glob("bootstrap/**/*.py")]:
        if path.name == "trainer_patches.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if PRIVATE.search(code) and "internals." not in code and "``" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "use oomguard.guard.trainer_patches:\n" + "\n".join(offenders)


def test_the_versions_checked_are_stated():
    assert {"transformers", "trl", "peft", "accelerate", "datasets", "torch"} <= set(internals.TESTED_RANGE)
    assert set(internals.FLOOR) <= set(internals.TESTED_RANGE)
    assert all(item.where and item.why for item in internals.INTERNALS)
