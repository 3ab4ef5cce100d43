"""The bootstrap's Trainer patch on a stand-in Trainer class: the raw train_dataset captured when the
Trainer is built, and no second guard around a trainer already inside guarded_train (no stack walk)."""

import dataclasses
import types

import pytest

from oomguard import protocol
from oomguard.bootstrap.context import Context
from oomguard.bootstrap.trainer import patch_trainer, raw_train_dataset
from oomguard.guard import train as guard_train
from oomguard.guard.resume.raw_data import raw_dataset, remember_raw_dataset


@dataclasses.dataclass
class Args:
    output_dir: str = "out"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1


def fake_module():
    class Trainer:
        def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None):
            self.args, self.train_dataset, self.calls = args or Args(), train_dataset, []
            self.callback_handler = types.SimpleNamespace(callbacks=[])

        def add_callback(self, callback):
            self.callback_handler.callbacks.append(callback)

        def train(self, resume_from_checkpoint=None, trial=None):
            self.calls.append(resume_from_checkpoint)
            return "trained"

    class SFTLike(Trainer):  # tokenizes its dataset before Trainer.__init__, as TRL's SFTTrainer does
        def __init__(self, model, args=None, data_collator=None, train_dataset=None, peft_config=None):
            super().__init__(model, args, data_collator, [f"tok:{row}" for row in train_dataset or []])

    module = types.ModuleType("fake_transformers_trainer")
    module.Trainer, module.SFTLike = Trainer, SFTLike
    return module


@pytest.fixture
def patched(tmp_path):
    env = {protocol.ENV_RUN_DIR: str(tmp_path), protocol.ENV_ATTEMPT: "1"}
    ctx = Context(env)
    module = fake_module()
    patch_trainer(module, lambda: ctx)
    return module


def test_raw_train_dataset_by_keyword_or_position():
    def init(self, model=None, args=None, data_collator=None, train_dataset=None):
        pass

    assert raw_train_dataset(init, (), {"train_dataset": "raw"}) == "raw"
    assert raw_train_dataset(init, ("m", "a", None, "raw"), {}) == "raw"
    assert raw_train_dataset(init, ("m",), {}) is None
    assert raw_train_dataset(init, ("m", "a", None, "raw", "extra", "more"), {}) is None  # unbindable: unknown


def test_the_raw_dataset_is_the_one_the_constructor_was_given(patched):
    raw = ["a", "b"]
    trainer = patched.SFTLike("model", Args(), None, raw)
    assert trainer.train_dataset == ["tok:a", "tok:b"]  # the subclass prepared it
    assert raw_dataset(trainer) is raw
    by_keyword = patched.Trainer(model="m", train_dataset=raw)
    assert raw_dataset(by_keyword) is raw


def test_remember_keeps_the_first_and_ignores_none():
    class T:
        pass

    t = T()
    remember_raw_dataset(t, None)
    assert raw_dataset(t) is None
    remember_raw_dataset(t, "first")
    remember_raw_dataset(t, "second")
    assert raw_dataset(t) == "first"


def test_train_inside_guarded_train_is_not_guarded_again(patched, monkeypatch):
    trainer = patched.Trainer(model="m", train_dataset=[1])
    called = []
    monkeypatch.setattr(guard_train, "guarded_train", lambda *a, **k: called.append(k) or "guarded")
    assert trainer.train() == "guarded" and len(called) == 1  # a plain call: under the guard
    with guard_train._guarding(trainer):
        assert guard_train.is_guarded(trainer)
        assert trainer.train("ckpt") == "trained"  # straight to the original, resume argument untouched
    assert not guard_train.is_guarded(trainer)
    assert trainer.calls == ["ckpt"] and len(called) == 1
