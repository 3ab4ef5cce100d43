"""observe(): the recipe read back from live objects; apply_lr_order / RecipeCallback: an ordered LR in force."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from oomguard.guard.callbacks.in_force import RecipeCallback, apply_lr_order
from oomguard.guard.env import GuardEnv
from oomguard.guard.observe import base_lr, observe
from oomguard.protocol import EVENT_RECIPE_OBSERVED, STAGE_BUILT, STAGE_IN_FORCE


@pytest.fixture
def hf_args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=3,
                             gradient_accumulation_steps=4, learning_rate=1e-3, max_grad_norm=0.5, report_to=[],
                             lr_scheduler_type="constant")


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _step(opt, sched, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(sched.get_last_lr()[0])  # what HF logs: read before the scheduler step
        opt.step()
        sched.step()
    return lrs


# --- fields per argument class ------------------------------------------------------------
def test_training_arguments_fields(hf_args, tmp_path):
    obs = observe(args=hf_args, stage=STAGE_BUILT)
    k, f = obs["knobs"], obs["fields"]
    assert obs["stage"] == STAGE_BUILT
    assert "max_seq_length" not in k  # HF TrainingArguments has no length field
    assert k["per_device_train_batch_size"] == 3 and f["per_device_train_batch_size"] == "per_device_train_batch_size"
    assert k["gradient_accumulation_steps"] == 4
    assert k["learning_rate"] == 1e-3 and f["learning_rate"] == "learning_rate"
    assert k["max_grad_norm"] == 0.5
    assert k["precision"] == "fp32"
    assert "lora_r" not in k and obs["lora"] is False
    assert obs["effective_batch"] == 12 and obs["world_size"] == 1
    assert obs["output_dir"] == str((tmp_path / "out").resolve())
    assert obs["args_class"] == "TrainingArguments"
    assert obs["lr_scheduler_type"] == "constant"
    assert isinstance(obs["optim"], str)
    json.dumps(obs)  # a journal payload


def test_sft_config_length_field(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, max_length=333, per_device_train_batch_size=2,
                         gradient_accumulation_steps=8, report_to=[])
    obs = observe(args=args, stage=STAGE_BUILT)
    assert obs["knobs"]["max_seq_length"] == 333 and obs["fields"]["max_seq_length"] == "max_length"
    assert obs["args_class"] == "SFTConfig"
    assert obs["effective_batch"] == 16


def test_first_registry_field_wins_and_bools_are_not_numbers():
    args = SimpleNamespace(max_seq_length=None, max_length=True, block_size=512, cutoff_len=1024,
                           micro_batch_size=2, gradient_accumulation_steps=3, bf16=True, fp16=False,
                           world_size=4, output_dir="rel")
    obs = observe(args=args, stage=STAGE_BUILT)
    assert obs["knobs"]["max_seq_length"] == 512 and obs["fields"]["max_seq_length"] == "block_size"
    assert obs["fields"]["per_device_train_batch_size"] == "micro_batch_size"
    assert obs["knobs"]["precision"] == "bf16"
    assert obs["world_size"] == 4 and obs["effective_batch"] == 2 * 3 * 4


def test_precision_needs_both_fields():
    assert "precision" not in observe(args=SimpleNamespace(bf16=True), stage=STAGE_BUILT)["knobs"]
    assert observe(args=SimpleNamespace(bf16=False, fp16=True), stage=STAGE_BUILT)["knobs"]["precision"] == "fp16"


def test_extra_knobs_generic_field():
    args = SimpleNamespace(warmup_steps=7, weight_decay=0.01, note="x")
    obs = observe(args=args, stage=STAGE_BUILT, extra_knobs=("warmup_steps", "weight_decay", "note", "absent"))
    assert obs["knobs"]["warmup_steps"] == 7 and obs["fields"]["warmup_steps"] == "warmup_steps"
    assert obs["knobs"]["weight_decay"] == 0.01
    assert "note" not in obs["knobs"] and "absent" not in obs["knobs"]


def test_effective_batch_unknown_without_accumulation():
    obs = observe(args=SimpleNamespace(per_device_train_batch_size=4), stage=STAGE_BUILT)
    assert obs["effective_batch"] is None


# --- stage in_force -----------------------------------------------------------------------
def test_in_force_reads_scheduler_optimizer_and_dataloader(hf_args):
    opt = _optimizer(2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25)
    dl = torch.utils.data.DataLoader(list(range(20)), batch_size=5)
    obs = observe(args=hf_args, optimizer=opt, lr_scheduler=sched, train_dataloader=dl, stage=STAGE_IN_FORCE)
    k, f = obs["knobs"], obs["fields"]
    assert k["learning_rate"] == 2e-3 and f["learning_rate"] == "optimizer"  # base_lrs, not args' 1e-3
    assert obs["current_lr"] == pytest.approx(5e-4)
    assert k["per_device_train_batch_size"] == 5 and f["per_device_train_batch_size"] == "dataloader"
    assert obs["effective_batch"] == 5 * 4
    assert k["max_grad_norm"] == 0.5 and f["max_grad_norm"] == "max_grad_norm"


def test_in_force_optimizer_only_and_batch_sampler(hf_args):
    opt = _optimizer(3e-3)
    opt.param_groups[0]["initial_lr"] = 4e-3
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(9)), batch_size=7, drop_last=False)
    dl = torch.utils.data.DataLoader(list(range(9)), batch_sampler=sampler)
    assert dl.batch_size is None
    obs = observe(args=hf_args, optimizer=opt, train_dataloader=dl, stage=STAGE_IN_FORCE)
    assert obs["knobs"]["learning_rate"] == 4e-3 and obs["current_lr"] == 3e-3
    assert obs["knobs"]["per_device_train_batch_size"] == 7


def test_in_force_accelerate_dataloader_keeps_batch_size():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.data_loader import prepare_data_loader

    accelerate.PartialState(cpu=True)
    dl = prepare_data_loader(torch.utils.data.DataLoader(list(range(12)), batch_size=6), device=torch.device("cpu"))
    assert type(dl).__name__ == "DataLoaderShard"
    obs = observe(args=SimpleNamespace(), train_dataloader=dl, stage=STAGE_IN_FORCE)
    assert obs["knobs"]["per_device_train_batch_size"] == 6


def test_in_force_falls_back_to_args_without_objects(hf_args):
    obs = observe(args=hf_args, stage=STAGE_IN_FORCE)
    assert obs["knobs"]["learning_rate"] == 1e-3 and obs["fields"]["learning_rate"] == "learning_rate"
    assert obs["fields"]["per_device_train_batch_size"] == "per_device_train_batch_size"
    assert obs["current_lr"] is None


def test_trainer_supplies_missing_objects(hf_args):
    opt = _optimizer(1e-4)
    trainer = SimpleNamespace(args=hf_args, model=None, optimizer=opt, lr_scheduler=None,
                              callback_handler=SimpleNamespace(train_dataloader=None))
    obs = observe(trainer, stage=STAGE_IN_FORCE)
    assert obs["knobs"]["learning_rate"] == 1e-4 and obs["trainer"] == "SimpleNamespace"


# --- LoRA -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_model():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_lora_from_config_and_live_weights(lora_model):
    built = observe(model=lora_model, stage=STAGE_BUILT)
    assert built["lora"] is True
    assert built["knobs"]["lora_r"] == 4 and built["fields"]["lora_r"] == "peft:r"
    assert built["knobs"]["lora_alpha"] == 8 and built["fields"]["lora_alpha"] == "peft:lora_alpha"
    # a rank cut is proven by the tensors: the config says 4, the live weights say 2
    cfg = lora_model.peft_config["default"]
    for _, module in lora_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            module.lora_A["default"].weight = torch.nn.Parameter(module.lora_A["default"].weight[:2].clone())
            break
    try:
        assert observe(model=lora_model, stage=STAGE_BUILT)["knobs"]["lora_r"] == cfg.r == 4
        assert observe(model=lora_model, stage=STAGE_IN_FORCE)["knobs"]["lora_r"] == 2
        wrapped = SimpleNamespace(module=lora_model)  # DDP-style wrapper
        assert observe(model=wrapped, stage=STAGE_IN_FORCE)["knobs"]["lora_r"] == 2
    finally:
        for _, module in lora_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                w = module.lora_A["default"].weight
                if w.shape[0] == 2:
                    module.lora_A["default"].weight = torch.nn.Parameter(torch.zeros(4, w.shape[1]))


def test_plain_model_has_no_lora():
    obs = observe(model=torch.nn.Linear(2, 2), stage=STAGE_IN_FORCE)
    assert obs["lora"] is False and "lora_r" not in obs["knobs"]


# --- robustness -----------------------------------------------------------------------------
class _Exploding:
    def __getattr__(self, name):
        raise RuntimeError(f"boom: {name}")


class _OddOptimizer:
    param_groups = "not a list"


class _OddScheduler:
    base_lrs = ["x"]

    @property
    def _last_lr(self):
        raise RuntimeError("boom")


@pytest.mark.parametrize("stage", [STAGE_BUILT, STAGE_IN_FORCE])
def test_odd_objects_never_raise(stage):
    odd = _Exploding()
    obs = observe(odd, args=odd, model=odd, optimizer=_OddOptimizer(), lr_scheduler=_OddScheduler(),
                  train_dataloader=odd, stage=stage, extra_knobs=("weird",))
    assert obs["knobs"] == {} and obs["lora"] is False and obs["world_size"] == 1
    assert obs["output_dir"] is None and obs["effective_batch"] is None
    obs = observe(args=SimpleNamespace(per_device_train_batch_size=float("nan"), learning_rate="1e-3",
                                       world_size=0, output_dir=object(), lr_scheduler_type=None), stage=stage)
    assert "per_device_train_batch_size" not in obs["knobs"] and "learning_rate" not in obs["knobs"]
    assert obs["world_size"] == 1
    assert observe(stage=stage)["knobs"] == {}


def test_apply_lr_order_ignores_unusable():
    opt = _optimizer(1e-3)
    assert apply_lr_order("fast", opt) is None
    assert apply_lr_order(-1.0, opt) is None
    assert apply_lr_order(1e-3, opt) is None  # ratio 1: nothing to do
    assert apply_lr_order(5e-4, None) is None
    zero = _optimizer(0.0)
    assert apply_lr_order(5e-4, zero) is None and zero.param_groups[0]["lr"] == 0.0
    assert opt.param_groups[0]["lr"] == 1e-3


# --- the LR rescale math --------------------------------------------------------------------
def test_rescale_constant_schedule():
    opt = _optimizer(1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _step(opt, sched, 2)
    change = apply_lr_order(5e-4, opt, sched)
    assert change == {"ordered": 5e-4, "before": 1e-3, "after": 5e-4, "ratio": 0.5, "groups": [5e-4]}
    assert sched.base_lrs == [5e-4] and sched.get_last_lr() == [5e-4]
    assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[0]["initial_lr"] == 5e-4
    assert _step(opt, sched, 3) == [5e-4] * 3


def test_rescale_keeps_warmup_and_decay_shape():
    def linear(step, warmup=3, total=10):
        return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))

    ref_opt = _optimizer(1e-3)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, linear)
    reference = _step(ref_opt, ref, 8)

    opt = _optimizer(1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear)
    first = _step(opt, sched, 2)  # resume point: mid-warmup
    apply_lr_order(2.5e-4, opt, sched)
    assert sched.get_last_lr()[0] == pytest.approx(reference[2] * 0.25)  # logged at the next step
    rest = _step(opt, sched, 6)
    assert first == reference[:2]
    assert rest == pytest.approx([v * 0.25 for v in reference[2:]])


def test_rescale_two_groups_keep_their_ratio():
    opt = _optimizer(1e-3, 4e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5])
    _step(opt, sched, 1)
    change = apply_lr_order(2e-3, opt, sched)  # ratio from group 0's base: x2
    assert change["ratio"] == 2.0
    assert sched.base_lrs == [2e-3, 8e-3]
    assert sched.get_last_lr() == [2e-3, 4e-3]  # _last_lr updated (HF logs get_last_lr())
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 4e-3]
    assert [g["initial_lr"] for g in opt.param_groups] == [2e-3, 8e-3]
    _step(opt, sched, 1)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 4e-3]


def test_rescale_optimizer_without_scheduler():
    opt = _optimizer(1e-3, 3e-3)
    change = apply_lr_order(1e-4, opt)
    assert change["before"] == 1e-3 and change["after"] == pytest.approx(1e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 3e-4])
    assert "initial_lr" not in opt.param_groups[0]
    assert base_lr(opt) == pytest.approx(1e-4)


def test_rescale_sequential_lr_children():
    opt = _optimizer(1e-3)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    const = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, const], milestones=[2])
    _step(opt, seq, 1)
    apply_lr_order(5e-4, opt, seq)
    assert warm.base_lrs == [5e-4] and const.base_lrs == [5e-4]  # SequentialLR itself has none
    assert seq.get_last_lr() == pytest.approx([0.75e-3 * 0.5])
    lrs = _step(opt, seq, 4)
    assert all(math.isfinite(v) and v <= 5e-4 + 1e-12 for v in lrs) and lrs[-1] == pytest.approx(5e-4)


# --- the callback ---------------------------------------------------------------------------
def _events(run_dir) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_callback_applies_order_and_journals(tmp_path, hf_args):
    env = GuardEnv(run_dir=tmp_path, attempt=2, knobs={"learning_rate": 5e-4, "max_grad_norm": 0.5}, rank=0)
    opt = _optimizer(1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dl = torch.utils.data.DataLoader(list(range(8)), batch_size=2)
    RecipeCallback(env).on_train_begin(hf_args, TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2),
                                       optimizer=opt, lr_scheduler=sched, train_dataloader=dl)
    assert sched.get_last_lr() == [5e-4] and opt.param_groups[0]["lr"] == 5e-4
    events = _events(tmp_path)
    assert [e["event"] for e in events] == ["lr_override", EVENT_RECIPE_OBSERVED]
    override, observed = events
    assert override["ordered"] == 5e-4 and override["before"] == 1e-3 and override["after"] == 5e-4
    assert override["attempt"] == 2 and override["rank"] == 0
    assert observed["stage"] == STAGE_IN_FORCE and observed["attempt"] == 2
    assert observed["knobs"]["learning_rate"] == 5e-4 and observed["current_lr"] == 5e-4
    assert observed["knobs"]["max_grad_norm"] == 0.5  # reported from args (set in-process elsewhere)
    assert observed["knobs"]["per_device_train_batch_size"] == 2


def test_callback_without_order_only_observes(tmp_path, hf_args):
    env = GuardEnv(run_dir=tmp_path, attempt=1, knobs={})
    opt = _optimizer(1e-3)
    RecipeCallback(env).on_train_begin(hf_args, TrainerState(), TrainerControl(), optimizer=opt)
    assert opt.param_groups[0]["lr"] == 1e-3
    assert [e["event"] for e in _events(tmp_path)] == [EVENT_RECIPE_OBSERVED]


def test_callback_outside_oomguard_is_silent_but_applies_order(tmp_path, hf_args):
    env = GuardEnv(knobs={"learning_rate": 2e-3})
    opt = _optimizer(1e-3)
    cb = RecipeCallback(env)
    cb.on_train_begin(hf_args, TrainerState(), TrainerControl(), optimizer=opt, lr_scheduler=None)
    assert opt.param_groups[0]["lr"] == 2e-3
    assert cb.last_observed["knobs"]["learning_rate"] == 2e-3
    assert not list(tmp_path.iterdir())
    # no optimizer (odd trainer): no exception
    RecipeCallback(env).on_train_begin(hf_args, TrainerState(), TrainerControl())


def test_callback_reports_extra_knobs(tmp_path, hf_args):
    hf_args.warmup_steps = 5
    env = GuardEnv(run_dir=tmp_path)
    if hasattr(env, "observe"):  # policy-declared knobs travel in the env (OOMGUARD_OBSERVE)
        env = GuardEnv(run_dir=tmp_path, observe=("warmup_steps",))
        cb = RecipeCallback(env)
    else:
        cb = RecipeCallback(env, extra_knobs=("warmup_steps",))
    cb.on_train_begin(hf_args, TrainerState(), TrainerControl())
    assert _events(tmp_path)[-1]["knobs"]["warmup_steps"] == 5


def test_callback_is_in_guard_callbacks():
    from oomguard.guard.callbacks.shutdown import ShutdownCallback
    from oomguard.guard.train import GUARD_TYPES, guard_callbacks

    cbs = guard_callbacks(GuardEnv())
    kinds = [type(cb) for cb in cbs]
    assert RecipeCallback in kinds and RecipeCallback in GUARD_TYPES
    assert kinds.index(RecipeCallback) < kinds.index(ShutdownCallback)
