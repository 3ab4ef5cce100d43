"""scripts/bench_memory.py: the trace replay and the frame classification, on hand-made traces."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_memory as bm  # noqa: E402

SITE = "/usr/lib/python3/site-packages"
V = 128256  # Llama-3's vocabulary
ROW = 2 * V  # bytes of one bf16 logits row


def frame(path: str, name: str = "forward", line: int = 1) -> dict:
    return {"filename": f"{SITE}/{path}", "name": name, "line": line}


def alloc(addr: int, size: int, *frames) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def free(addr: int, size: int) -> dict:
    return {"action": "free_completed", "addr": addr, "size": size, "frames": []}


LORA = frame("peft/tuners/lora/bnb.py")
LOSS = frame("transformers/loss/loss_utils.py", "fixed_cross_entropy")
ADAM = frame("bitsandbytes/optim/optimizer.py", "step")
RECOMPUTE = [frame("torch/utils/checkpoint.py", "recompute_fn"), frame("torch/utils/checkpoint.py", "unpack_hook")]


def test_replay_finds_the_peak_and_the_blocks_live_then():
    events = [
        alloc(1, 100, LORA),
        {"action": "free_requested", "addr": 1, "size": 100, "frames": []},  # not yet free
        alloc(2, 300, LOSS),
        {"action": "segment_alloc", "addr": 0, "size": 1 << 20, "frames": []},  # reserved, not allocated
        free(2, 300),
        free(1, 100),
        alloc(3, 50, ADAM),
    ]
    peak = bm.replay_peak(events)
    assert peak["index"] == 2 and peak["net_bytes"] == 400 and peak["baseline_freed"] == 0
    assert sorted(b["addr"] for b in peak["blocks"]) == [1, 2]


def test_freeing_baseline_memory_lowers_the_net_and_is_reported():
    # block 9 was allocated before recording started (part of the baseline)
    events = [free(9, 1000), alloc(1, 600, LORA), alloc(2, 300, LOSS), free(2, 300)]
    peak = bm.replay_peak(events)
    assert peak["net_bytes"] == 0 and peak["index"] == -1 and peak["blocks"] == []
    events = [alloc(1, 600, LORA), free(9, 1000), alloc(2, 1100, LOSS)]
    peak = bm.replay_peak(events)
    assert (peak["index"], peak["net_bytes"], peak["baseline_freed"]) == (2, 700, 1000)
    assert sorted(b["addr"] for b in peak["blocks"]) == [1, 2]


def test_a_reused_address_without_its_free_is_not_counted_twice():
    peak = bm.replay_peak([alloc(1, 40, LORA), alloc(1, 100, LORA)])
    assert peak["net_bytes"] == 100 and [b["size"] for b in peak["blocks"]] == [100]


@pytest.mark.parametrize("frames, size, expected", [
    ([frame("torch/optim/adamw.py", "_multi_tensor_adamw"), ADAM], 64, ("optimizer", "optimizer")),
    ([frame("torch/nn/utils/clip_grad.py", "clip_grad_norm_")], 64, ("optimizer", "optimizer")),
    ([frame("torch/nn/functional.py", "cross_entropy"), LOSS], 64, ("forward", bm.LOGITS)),
    ([frame("trl/kernels/chunked_logprob.py", "backward")], 64, ("backward", bm.FUSED)),
    ([frame("trl/kernels/chunked_logprob.py", "forward")], 64, ("forward", bm.FUSED)),
    ([frame("torch/nn/functional.py", "linear"), LORA, *RECOMPUTE], 64, ("recompute", "checkpoint recompute")),
    ([frame("torch/nn/functional.py", "dropout"), LORA, frame("torch/utils/checkpoint.py", "checkpoint")], 64,
     ("forward", "LoRA")),
    ([frame("bitsandbytes/functional.py", "dequantize_4bit"), frame("bitsandbytes/autograd/_functions.py",
                                                                    "backward")], 64,
     ("backward", "4-bit base layers (bitsandbytes)")),
    # reentrant checkpointing: the inner backward is a backward, not a recompute
    ([frame("torch/autograd/__init__.py", "backward"), frame("torch/utils/checkpoint.py", "backward")], 64,
     ("backward", bm.AUTOGRAD)),
    ([frame("torch/autograd/function.py", "apply"), frame("bitsandbytes/nn/modules.py")], 64,
     ("forward", "4-bit base layers (bitsandbytes)")),
    ([], 4 * 1024 * ROW, ("backward", bm.LOGITS)),  # fp32 logits gradient from the autograd thread
    ([], 2 * 512 * 4096 * 2, ("backward", bm.AUTOGRAD)),  # a hidden-state gradient
    ([frame("accelerate/accelerator.py", "backward")], 4 * ROW, ("backward", bm.LOGITS)),  # CPU: framed
    ([frame("accelerate/utils/operations.py", "_convert_to_fp32"),
      frame("accelerate/utils/operations.py", "recursively_apply")], 64, ("forward", bm.LOGITS)),
    ([frame("accelerate/data_loader.py", "__iter__")], 64, ("forward", "other")),
])
def test_classify(frames, size, expected):
    assert bm.classify(frames, size, bm.COMPONENT_RULES, ROW) == expected


def test_line_span_rules_pick_the_innermost_model_frame():
    modeling = f"{SITE}/transformers/models/llama/modeling_llama.py"
    rules = bm.COMPONENT_RULES + ((bm.LOGITS, modeling, None, (400, 460)), ("MLP", modeling, None, (100, 120)))
    lm_head = [frame("torch/nn/modules/linear.py"), {"filename": modeling, "name": "forward", "line": 430}]
    mlp = [frame("torch/nn/functional.py", "silu"), {"filename": modeling, "name": "forward", "line": 110},
           {"filename": modeling, "name": "forward", "line": 300}, lm_head[1]]
    assert bm.classify(lm_head, 64, rules, ROW) == ("forward", bm.LOGITS)
    assert bm.classify(mlp, 64, rules, ROW) == ("forward", "MLP")


def test_model_regions_cover_each_forward():
    class Attention:
        def forward(self):
            return 1

    class Layer:
        self_attn, mlp, input_layernorm = Attention(), None, None

        def forward(self):
            return 2

    class Body:
        layers = [Layer()]

        def forward(self):
            return 3

    class LM:
        base_model_prefix = "model"
        model = Body()

        def forward(self):
            return 4

    rules = bm.model_regions(LM())[len(bm.COMPONENT_RULES):]
    assert [r[0] for r in rules] == [bm.LOGITS, "model body (rotary, mask)", "layer outputs (residual adds)",
                                     "attention"]
    line = Attention.forward.__code__.co_firstlineno + 1
    attention = {"filename": __file__, "name": "forward", "line": line}
    assert bm.first_match([attention], rules) == "attention"


def test_analyze_snapshot_adds_the_baseline_and_ranks_sites():
    trace = [alloc(1, 3 * 2**30, LOSS), alloc(2, 2**30, LORA), alloc(3, 2**30, LORA), free(1, 3 * 2**30)]
    out = bm.analyze_snapshot({"device_traces": [trace]}, 0, 2 * 2**30, bm.COMPONENT_RULES, ROW, max_entries=10)
    assert out["replayed_peak_gib"] == 7.0 and out["new_live_at_peak_gib"] == 5.0 and not out["truncated"]
    assert out["buckets_gib"] == {bm.LOGITS: 3.0, "LoRA": 2.0}
    assert out["phases_gib"] == {"forward": 5.0}
    assert out["top_sites"][0] == {"site": "transformers/loss/loss_utils.py:1 fixed_cross_entropy", "gib": 3.0,
                                   "blocks": 1}
    assert out["top_sites"][1]["blocks"] == 2


def test_site_skips_torch_frames():
    assert bm.site([frame("torch/nn/functional.py", "linear", 9), LORA]) == "peft/tuners/lora/bnb.py:1 forward"
    assert bm.site([]) == "<no Python frame>"


def test_stage_deltas_and_baseline_split():
    stages = {"start": 0, "weights": 5, "prepared": 7, "lora": 8, "trainer": 8, "optimizer_before": 9,
              "optimizer_after": 10}
    deltas = bm.stage_deltas(stages)
    assert deltas == {"weights": 5, "upcast": 2, "lora": 1, "trainer_init": 0, "optimizer_state": 1}
    split = bm.baseline_split(12 * 2**30, {k: v * 2**30 for k, v in deltas.items()})
    assert split["other"] == 3.0 and split["upcast"] == 2.0
    assert bm.stage_deltas({k: None for k in stages})["weights"] is None
    assert bm.baseline_split(None, deltas) is None


def test_loss_match_and_compare():
    assert bm.loss_match([11.8, 11.7], [11.81, 11.6], 0.05) == {
        "abs_diff": [0.01, 0.1], "max_abs_diff": 0.1, "tol": 0.05, "within_tol": False}
    assert bm.loss_match([1.0], [1.0, 2.0], 0.05) is None and bm.loss_match(None, [1.0], 0.05) is None
    row = {"losses": [11.8], "batches": [[2, 40, 7]]}
    paths = {"seed": {"shapes": {"2x512": row}}, "recipe": {"shapes": {"2x512": {**row, "losses": [11.79]}}},
             "plain_loss": {"shapes": {"2x512": {"ok": False}}}}
    out = bm.compare(paths, 0.05)["2x512"]
    assert out["seed_vs_recipe"]["within_tol"] and out["seed_vs_plain_loss"] is None and out["same_batches"]


def test_parse_shapes():
    assert bm.parse_shapes("2x512, 2x2048,") == [(2, 512), (2, 2048)]
    assert bm.label((2, 512)) == "2x512"


def test_table_shows_each_run_its_snapshot_and_errors():
    snap = {"step": 2, "baseline_gib": 7.3, "buckets_gib": {bm.LOGITS: 1.5, "LoRA": 0.1}}
    row = {"batches": [[2, 300, 1], [2, 512, 1]], "peak_allocated_gib": 9.96, "losses": [11.8, 11.7],
           "stage_deltas_gib": {"weights": 5.32, "upcast": 2.0}, "snapshot": snap}
    text = bm.table({"paths": {"seed": {"shapes": {"2x512": row}},
                               "recipe": {"shapes": {"2x512": {"error": "CUDA out of memory"}}}}})
    lines = text.splitlines()
    assert lines[2].split()[:5] == ["seed", "2x512", "512", "9.960", "-"]
    assert "baseline 7.3 + logits/loss 1.5, LoRA 0.1 GiB" in lines[3]
    assert lines[4].startswith("recipe") and "error: CUDA out of memory" in lines[5]
