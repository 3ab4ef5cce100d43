"""NaN/inf detection on a small real nn.Module's gradients."""

import math
import signal
from types import SimpleNamespace

import pytest
import torch

from oomguard.guard.callbacks.nan import NanGuardCallback, NonFiniteLossError, all_finite, trainable_grads


def model_with_grads(poison: float | None = None, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(dtype)
    model[0].weight.requires_grad_(False)  # frozen, like a base model under LoRA
    x = torch.randn(3, 4, dtype=dtype)
    loss = model(x).sum()
    if poison is not None:
        loss = loss * poison
    loss.backward()
    return model


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_grads_detected(poison):
    assert not all_finite(trainable_grads(model_with_grads(poison).parameters()))


def test_finite_grads_pass_and_big_bf16_does_not_overflow():
    assert all_finite(trainable_grads(model_with_grads().parameters()))
    big = [torch.full((1000,), 1e38, dtype=torch.bfloat16)]  # the 2-norm would overflow even in fp32
    assert all_finite(big)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_fused_check_leaves_every_gradient_bit_for_bit(dtype):
    """The GradScaler kernel writes its input back: with an inv_scale of 1.0 nothing may change."""
    big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}[dtype]
    grads = [torch.tensor([big, -big, -0.0, 1e-30, 1.5], dtype=dtype), torch.tensor([math.inf, 2.0], dtype=dtype)]
    before = [g.clone() for g in grads]
    assert not all_finite(grads)
    assert all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32)) for a, b in zip(before, grads))
    assert all_finite(grads[:1])  # large but finite passes; a mixed-dtype list is checked per dtype
    assert not all_finite([grads[0].float(), grads[1]]) and all_finite([grads[0].float(), torch.ones(2, dtype=dtype)])


def test_non_finite_loss_with_finite_grads_detected():
    grads = trainable_grads(model_with_grads().parameters())
    assert not all_finite(grads, torch.tensor(float("nan")))


def state(step):
    return SimpleNamespace(global_step=step)


def test_guard_drops_grads_and_stops_when_budget_spent():
    guard = NanGuardCallback(skip_steps=0)
    model = model_with_grads()
    guard.on_pre_optimizer_step(None, state(4), None, model=model)
    assert guard.last_finite_step == 5
    model = model_with_grads(math.nan)
    with pytest.raises(NonFiniteLossError) as info:
        guard.on_pre_optimizer_step(None, state(5), None, model=model)
    assert info.value.step == 5 and info.value.last_finite_step == 5
    assert all(p.grad is None for p in model.parameters())


def test_guard_skips_within_budget_then_stops():
    guard = NanGuardCallback(skip_steps=1)
    model = model_with_grads(math.inf)
    guard.on_pre_optimizer_step(None, state(0), None, model=model)  # skipped, training goes on
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NonFiniteLossError):
        guard.on_pre_optimizer_step(None, state(1), None, model=model_with_grads(math.nan))


def test_skipped_update_leaves_weights_unchanged():
    guard = NanGuardCallback(skip_steps=5)
    model = model_with_grads(math.nan)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- the verdict queued by training_step's hand-over (issue 17 item 3) ----------------------------
def trained_pair(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(dtype)
    model[0].weight.requires_grad_(False)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)


def micro_batch(model, poison: float | None = None) -> torch.Tensor:
    """One forward/backward (gradients accumulate); the loss training_step would return."""
    loss = model(torch.randn(3, 4, dtype=next(model.parameters()).dtype)).sum()
    if poison is not None:
        loss = loss * poison
    loss.backward()
    return loss.detach()


def begun(guard: NanGuardCallback, optimizer, step: int = 0, fp16: bool = False) -> NanGuardCallback:
    guard.on_train_begin(SimpleNamespace(fp16=fp16), state(step), None, optimizer=optimizer)
    return guard


def test_handed_over_verdict_judges_the_step_before_its_update():
    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=0), opt, step=4)
    guard.observe_loss(micro_batch(model))
    guard.on_pre_optimizer_step(None, state(4), None, model=model)
    assert guard.last_finite_step == 5 and guard.checks == 1 and guard.pending is None
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    guard.observe_loss(micro_batch(model, math.nan))
    with pytest.raises(NonFiniteLossError) as info:
        guard.on_pre_optimizer_step(None, state(5), None, model=model)
    assert (info.value.step, info.value.last_finite_step) == (5, 5) and guard.checks == 2
    opt.step()  # what the Trainer does next if the error were caught: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert guard.ready_at_check == 2  # on CPU the verdict is computed when handed over


@pytest.mark.parametrize("fp16", [False, True])
def test_a_non_finite_earlier_micro_batch_is_caught_after_the_last(fp16):
    """Accumulation: the first micro-batch's loss is NaN, the second's finite. The gradients stay
    non-finite (absorbing); under fp16 only the losses count and the step's every loss is checked."""
    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=1), opt, step=0, fp16=fp16)
    guard.observe_loss(micro_batch(model, math.nan))
    guard.observe_loss(micro_batch(model))
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    assert guard.skipped == 1 and guard.last_finite_step == 0
    assert all(p.grad is None for p in model.parameters())  # the update is dropped


def test_a_finite_step_after_a_skip_is_judged_afresh():
    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=1), opt, step=0)
    guard.observe_loss(micro_batch(model, math.inf))
    guard.on_pre_optimizer_step(None, state(0), None, model=model)  # skipped
    guard.observe_loss(micro_batch(model))  # no NaN carried over from the skipped step
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    assert guard.skipped == 1 and guard.last_finite_step == 1


def test_a_real_trainer_hands_every_step_over_and_records_the_last_finite_step(tmp_path):
    """In-process tiny Llama, accumulation 2, NaN in step 3's first micro-batch: the guard stops
    before step 3's update, every verdict came from the hand-over, the error record says 2."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from oomguard import protocol
    from oomguard.guard import GuardEnv, guard_callbacks, guarded_train

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    rows = [{"input_ids": torch.arange(1, 9), "labels": torch.arange(1, 9)} for _ in range(32)]

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # step 3 starts
                hook = model.get_input_embeddings().register_forward_hook(
                    lambda m, i, out: (hook.remove(), out * math.nan)[1])

    env = GuardEnv(run_dir=tmp_path / "run", error_file=tmp_path / "run" / "error.json")
    env.run_dir.mkdir()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=1, learning_rate=1e-3, dataloader_num_workers=0)
    callbacks = guard_callbacks(env)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Poison(), *callbacks])
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    handlers = {s: signal.getsignal(s) for s in stops}  # the guard's shutdown callback takes them; a failed
    try:  # train never reaches its on_train_end, which would give them back: this worker keeps its own
        with pytest.raises(SystemExit) as info:
            guarded_train(trainer, env=env)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert info.value.code == 1 and trainer.state.global_step == 2
    [guard] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NanGuardCallback)]
    assert guard.checks == 3  # steps 1, 2, 3: none fell back to the synchronous check
    record = protocol.ErrorRecord.from_dict(__import__("json").loads(env.error_file.read_text()))
    assert record.kind is protocol.FailureKind.NAN_LOSS and record.last_finite_step == 2 and record.step == 2


def test_a_hand_over_that_fails_falls_back_to_the_synchronous_check(monkeypatch):
    """A gradient the fused check cannot take (a sharded type, say): the step is still judged, at once."""
    import oomguard.guard.callbacks.nan as nan

    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=0), opt, step=0)
    monkeypatch.setattr(nan, "PendingVerdict", lambda flag, slots=None: (_ for _ in ()).throw(TypeError("no fused norm")))
    guard.observe_loss(micro_batch(model, math.nan))
    assert guard.handover_failed == "TypeError: no fused norm" and guard.pending is None
    monkeypatch.undo()
    with pytest.raises(NonFiniteLossError):
        guard.on_pre_optimizer_step(None, state(0), None, model=model)
    assert guard.checks == 0  # judged by the synchronous check


def test_the_hand_over_keeps_one_flag_reads_a_loss_it_does_not_write_and_resets_after_a_skip():
    """No new tensor per step: one slot per device, its flag raised by a non-finite loss even where the
    gradients are finite, set back after that verdict; the loss the Trainer keeps is not written to."""
    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=3), opt, step=0)
    verdicts = []
    for step, poison in enumerate((None, math.nan, None, math.inf, None)):
        micro_batch(model)  # finite gradients
        loss = torch.tensor(1.5 if poison is None else poison)
        version = loss._version
        guard.observe_loss(loss)
        assert loss._version == version
        [slot] = guard._slots.values()
        flag = slot.found
        guard.on_pre_optimizer_step(None, state(step), None, model=model)
        verdicts.append(guard.skipped)
        assert slot.found is flag and slot.found.item() == 0.0
        opt.zero_grad()
    assert verdicts == [0, 1, 1, 2, 2] and guard.checks == 5 and guard.last_finite_step == 5


def test_a_loss_in_another_dtype_than_the_gradients_is_checked_in_its_own():
    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=1), opt, step=0)
    micro_batch(model)
    guard.observe_loss(torch.tensor(math.nan, dtype=torch.float64))
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    assert guard.skipped == 1
    micro_batch(model)
    guard.observe_loss(torch.tensor(1e300, dtype=torch.float64))  # finite in float64 (not in float32)
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    assert guard.skipped == 1 and guard.last_finite_step == 1


def test_gradients_the_fused_kernel_cannot_take_are_still_judged_in_the_hand_over(monkeypatch):
    """Where the GradScaler's kernel refuses a tensor type, the hand-over queues the max-abs norms instead."""
    import oomguard.guard.callbacks.nan as nan

    real = nan.raise_non_finite
    refused = []

    def picky(tensors, found):
        if len(tensors) > 1:  # the gradients' group (the loss copy alone passes)
            refused.append(len(tensors))
            raise NotImplementedError("no kernel for this tensor type")
        real(tensors, found)

    monkeypatch.setattr(nan, "raise_non_finite", picky)
    model, opt = trained_pair()
    guard = begun(NanGuardCallback(skip_steps=1), opt, step=0)
    micro_batch(model)
    guard.observe_loss(torch.tensor(2.0))
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    opt.zero_grad()
    micro_batch(model, math.nan)
    guard.observe_loss(torch.tensor(2.0))  # a finite loss, NaN gradients
    guard.on_pre_optimizer_step(None, state(1), None, model=model)
    assert refused and guard.handover_failed is None and guard.checks == 2
    assert guard.skipped == 1 and guard.last_finite_step == 1
