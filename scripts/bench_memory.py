"""Where the memory of a QLoRA step goes: the seed recipe, the plain HF loss, and the built-in recipe.

    python scripts/bench_memory.py --model /tmp/llama3-8b-random --out memory.json --steps 4 --shapes 2x512,2x2048

Three paths, each in its own subprocess (this script re-invoked with ``--path NAME``) so peaks are clean;
inside one, the model is loaded afresh for every shape and freed in between:

- ``seed``: the classic QLoRA notebook ported to today's names (NF4 + double quant, compute bf16,
  ``prepare_model_for_kbit_training``, LoRA r=16 on q/k/v/o, TRL ``SFTTrainer``, paged AdamW 32-bit);
- ``plain_loss``: the same model under ``transformers.Trainer`` with the model's own ``labels`` loss
  (full logits), as the "9.96 GiB" measurement did;
- ``recipe``: ``oomguard.recipes.sft.build_trainer`` (embeddings and lm_head kept in bf16), its schedule
  aligned with the seed's (linear, no warmup, max_grad_norm 1.0) so the losses compare step by step.

Per path and shape: peak allocated/reserved, per-step losses, the batches seen (rows, length, id sum),
and staged memory (after the 4-bit load, after the k-bit preparation, after LoRA, the optimizer state
of the first step). At the snapshot shape one step (the 2nd) runs under
``torch.cuda.memory._record_memory_history``; its trace is replayed to the moment of peak live bytes
and the blocks live then are classified by their allocation frames (buckets in GiB, top allocation
sites). Memory allocated before recording started is the baseline, split by the staged numbers.
Without CUDA everything runs (a dry run) and memory numbers are null.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_common import sample_lengths, versions, write_dataset  # noqa: E402

PATHS = ("seed", "plain_loss", "recipe")
SEED = 42
LR = 2e-4
ROWS = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SNAPSHOT_STEP = 2  # steady state: the optimizer state exists from step 1 on
MAX_ENTRIES = 400_000  # trace events kept; one 8B step at 2x512 needs some 10^4
GIB = 2**30

# Innermost frame first: the first frame that matches a rule decides the phase.
# A rule is (label, filename substring, function names or None, (first, last) line or None).
PHASE_RULES = (
    ("optimizer", "/torch/optim/", None, None),
    ("optimizer", "/bitsandbytes/optim/", None, None),
    ("optimizer", "/accelerate/optimizer.py", None, None),
    ("optimizer", "/torch/nn/utils/clip_grad", None, None),
    ("backward", "/torch/autograd/", {"backward", "grad", "_engine_run_backward"}, None),
    ("backward", "/torch/_tensor.py", {"backward"}, None),
    ("recompute", "/torch/utils/checkpoint.py", {"backward", "unpack_hook", "recompute_fn"}, None),
    ("backward", "", {"backward"}, None),  # a custom autograd Function's backward (bitsandbytes, TRL)
)
FUSED = "lm_head tiles (TRL fused loss)"
LOGITS = "logits/loss"
# Innermost frame first, as above; the model's own classes are added by model_regions().
COMPONENT_RULES = (
    (FUSED, "/trl/kernels/", None, None),
    (FUSED, "/trl/trainer/utils.py", {"_fused_forward"}, None),
    (LOGITS, "/transformers/loss/", None, None),
    (LOGITS, "/torch/nn/functional.py", {"cross_entropy", "log_softmax", "nll_loss"}, None),
    (LOGITS, "/trl/trainer/sft_trainer.py", {"compute_loss"}, None),
    ("LoRA", "/peft/tuners/lora/", None, None),
    ("4-bit base layers (bitsandbytes)", "/bitsandbytes/", None, None),
    ("attention", "/transformers/integrations/sdpa_attention.py", None, None),
    ("attention", "/transformers/integrations/flash_attention.py", None, None),
    ("attention", "/modeling_", {"apply_rotary_pos_emb", "rotate_half", "repeat_kv", "eager_attention_forward"},
     None),
    ("embeddings", "/torch/nn/modules/sparse.py", None, None),
    # accelerate's mixed-precision wrapper copies the model's outputs (the logits) to fp32
    (LOGITS, "/accelerate/utils/operations.py", {"convert_to_fp32", "_convert_to_fp32"}, None),
    ("inputs", "/accelerate/utils/operations.py", {"send_to_device"}, None),
    ("inputs", "/transformers/trainer.py", {"_prepare_input", "_prepare_inputs"}, None),
)
AUTOGRAD = "backward (autograd engine: gradients)"


# ----------------------------------------------------------------------------- pure: trace replay


def frame_matches(frame: dict, rule: tuple) -> bool:
    _, part, names, lines = rule
    return (part in frame.get("filename", "") and (names is None or frame.get("name") in names)
            and (lines is None or lines[0] <= frame.get("line", -1) <= lines[1]))


def first_match(frames: list[dict], rules) -> str | None:
    """The label of the first rule matched by the innermost matching frame (frames innermost first)."""
    for frame in frames:
        for rule in rules:
            if frame_matches(frame, rule):
                return rule[0]
    return None


def classify(frames: list[dict], size: int, rules, row_bytes: int | None) -> tuple[str, str]:
    """(phase, bucket) of one allocation. On CUDA the autograd engine allocates gradients on its own
    thread, without Python frames; such a block that is a whole number of bf16 vocabulary rows
    (``row_bytes``) is a logits gradient."""
    phase = first_match(frames, PHASE_RULES) or ("backward" if not frames else "forward")
    component = first_match(frames, rules)
    if phase == "optimizer":
        return phase, "optimizer"
    if component in (LOGITS, FUSED):
        return phase, component
    if phase == "recompute":
        return phase, "checkpoint recompute"
    if component:
        return phase, component
    if phase == "backward":
        return phase, LOGITS if row_bytes and size % row_bytes == 0 else AUTOGRAD
    return phase, "other"


def replay_peak(events: list[dict]) -> dict:
    """Replay alloc / free_completed events to the moment the step's net live bytes peak.

    A free of a block allocated before recording started lowers the net (that memory was part of
    the baseline). Returns the event index of the peak (-1: never above the start), the net bytes
    then, the baseline bytes freed by then, and the alloc events of the blocks live then."""
    best, best_index, net, live = 0, -1, 0, {}
    for index, event in enumerate(events):
        net += _apply(event, live)[0]
        if net > best:
            best, best_index = net, index
    live, freed = {}, 0
    for event in events[: best_index + 1]:
        freed += _apply(event, live)[1]
    return {"index": best_index, "net_bytes": best, "baseline_freed": freed, "blocks": list(live.values())}


def _apply(event: dict, live: dict) -> tuple[int, int]:
    """Apply one event to ``live`` (addr -> alloc event); returns (net change, baseline bytes freed)."""
    action, addr = event.get("action"), event.get("addr")
    if action == "alloc":
        old = live.pop(addr, None)  # a lost free (trace truncated): the address is reused
        live[addr] = event
        return event["size"] - (old["size"] if old else 0), 0
    if action == "free_completed":
        if addr in live:
            return -live.pop(addr)["size"], 0
        return -event["size"], event["size"]
    return 0, 0


def site(frames: list[dict]) -> str:
    """The allocation site: the innermost frame outside torch itself, path shortened."""
    if not frames:
        return "<no Python frame>"
    frame = next((f for f in frames if "/torch/" not in f.get("filename", "")), frames[0])
    name = frame.get("filename", "?")
    for marker in ("site-packages/", "dist-packages/"):
        name = name.split(marker)[-1]
    return f"{name}:{frame.get('line', '?')} {frame.get('name', '?')}"


def breakdown(blocks: list[dict], rules, row_bytes: int | None, top: int = 10) -> dict:
    """Bytes by bucket and by phase, and the ``top`` allocation sites, of the live ``blocks``."""
    buckets: dict[str, int] = {}
    phases: dict[str, int] = {}
    sites: dict[str, list[int]] = {}
    for block in blocks:
        frames, size = block.get("frames") or [], block["size"]
        phase, bucket = classify(frames, size, rules, row_bytes)
        buckets[bucket] = buckets.get(bucket, 0) + size
        phases[phase] = phases.get(phase, 0) + size
        entry = sites.setdefault(site(frames), [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {"buckets_gib": _sorted_gib(buckets), "phases_gib": _sorted_gib(phases),
            "top_sites": [{"site": s, "gib": gib(b), "blocks": n} for s, (b, n) in ranked]}


def analyze_snapshot(snapshot: dict, device: int, baseline: int, rules, row_bytes: int | None,
                     max_entries: int = MAX_ENTRIES) -> dict:
    """The peak of one recorded step: baseline + net live bytes, and what the live blocks are."""
    events = snapshot["device_traces"][device]
    peak = replay_peak(events)
    return {
        "events": len(events),
        "truncated": len(events) >= max_entries,
        "peak_event_index": peak["index"],
        "baseline_bytes": baseline,
        "baseline_gib": gib(baseline),
        "baseline_freed_by_peak_gib": gib(peak["baseline_freed"]),
        "new_live_at_peak_gib": gib(peak["net_bytes"] + peak["baseline_freed"]),
        "replayed_peak_gib": gib(baseline + peak["net_bytes"]),
        **breakdown(peak["blocks"], rules, row_bytes),
    }


# ----------------------------------------------------------------------------- pure: numbers


def gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def _sorted_gib(table: dict[str, int]) -> dict[str, float]:
    return {k: gib(v) for k, v in sorted(table.items(), key=lambda kv: -kv[1])}


def stage_deltas(stages: dict) -> dict:
    """Bytes each stage added: weights, fp32 upcast, adapter, trainer set-up, first optimizer step."""
    order = (("weights", "start", "weights"), ("upcast", "weights", "prepared"), ("lora", "prepared", "lora"),
             ("trainer_init", "lora", "trainer"), ("optimizer_state", "optimizer_before", "optimizer_after"))
    out = {}
    for name, before, after in order:
        a, b = stages.get(before), stages.get(after)
        out[name] = None if a is None or b is None else b - a
    return out


def baseline_split(baseline: int | None, deltas: dict) -> dict | None:
    """The snapshot's baseline in GiB as the staged deltas, plus what they leave unexplained."""
    if baseline is None or any(v is None for v in deltas.values()):
        return None
    return {**{k: gib(v) for k, v in deltas.items()}, "other": gib(baseline - sum(deltas.values()))}


def loss_match(a: list[float] | None, b: list[float] | None, tol: float) -> dict | None:
    """Per-step absolute loss differences of two runs over the same steps."""
    if not a or not b or len(a) != len(b):
        return None
    diffs = [round(abs(x - y), 5) for x, y in zip(a, b)]
    return {"abs_diff": diffs, "max_abs_diff": max(diffs), "tol": tol, "within_tol": max(diffs) <= tol}


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``"2x512,2x2048"`` -> [(2, 512), (2, 2048)]."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        batch, _, seq = part.partition("x")
        out.append((int(batch), int(seq)))
    return out


def label(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# ----------------------------------------------------------------------------- worker: one path


@dataclasses.dataclass
class Job:
    model: str
    data: str
    batch: int
    seq: int
    steps: int
    out_dir: str
    stages: dict


def allocated() -> int | None:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def seed_model(job: Job):
    """The notebook's model: NF4 4-bit, prepare_model_for_kbit_training, LoRA r=16 on q/k/v/o."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

    set_seed(SEED)  # where the recipe seeds: the LoRA init draws from the global RNG
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.bfloat16)
    place = 0 if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(job.model, quantization_config=bnb, device_map={"": place})
    job.stages["weights"] = allocated()
    model = prepare_model_for_kbit_training(model)  # fp32 embeddings, lm_head, norms; checkpointing on
    job.stages["prepared"] = allocated()
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    job.stages["lora"] = allocated()
    return model, tokenizer


def common_args(job: Job, config_class) -> dict:
    import torch

    from oomguard.recipes.sft import _checkpointing_kwarg

    return dict(output_dir=job.out_dir, per_device_train_batch_size=job.batch, gradient_accumulation_steps=1,
                learning_rate=LR, optim="paged_adamw_32bit", bf16=True, max_steps=job.steps, logging_steps=1,
                save_strategy="no", report_to="none", seed=SEED, use_cpu=not torch.cuda.is_available(),
                **_checkpointing_kwarg(config_class, True))


def build_seed(job: Job):
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = seed_model(job)
    config = SFTConfig(max_length=job.seq, dataset_text_field="text", **common_args(job, SFTConfig))
    data = load_dataset("json", data_files=job.data, split="train")
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)


def build_plain_loss(job: Job):
    """The same model under transformers.Trainer: the model's own loss over the full logits.
    Rows are tokenized as TRL does (text + EOS, kept from the start up to max_length)."""
    from datasets import load_dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tokenizer = seed_model(job)

    def tokenize(row):
        return {"input_ids": tokenizer(row["text"] + tokenizer.eos_token)["input_ids"][: job.seq]}

    data = load_dataset("json", data_files=job.data, split="train").map(tokenize, remove_columns=["text"])
    return Trainer(model=model, args=TrainingArguments(**common_args(job, TrainingArguments)), train_dataset=data,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer)


def build_recipe(job: Job):
    from oomguard.recipes import model as qlora
    from oomguard.recipes.options import resolve_options
    from oomguard.recipes.sft import build_trainer

    argv = ["--model", job.model, "--dataset", job.data, "--output_dir", job.out_dir, "--no_guard",
            "--max_steps", str(job.steps), "--per_device_train_batch_size", str(job.batch),
            "--gradient_accumulation_steps", "1", "--max_seq_length", str(job.seq), "--learning_rate", str(LR),
            "--seed", str(SEED), "--optim", "paged_adamw_32bit", "--logging_steps", "1", "--save_steps", "1000000",
            # the seed's schedule (SFTConfig defaults), so the losses compare step by step
            "--lr_scheduler_type", "linear", "--warmup_ratio", "0", "--max_grad_norm", "1.0"]
    prepare, attach = qlora.prepare_quantized, qlora.attach_lora

    def prepare_measured(model, **kwargs):
        job.stages["weights"] = allocated()
        prepare(model, **kwargs)
        job.stages["prepared"] = allocated()

    def attach_measured(model, options):
        model = attach(model, options)
        job.stages["lora"] = allocated()
        return model

    qlora.prepare_quantized, qlora.attach_lora = prepare_measured, attach_measured  # staged numbers, same code
    try:
        return build_trainer(resolve_options(argv, environ={}))[0]
    finally:
        qlora.prepare_quantized, qlora.attach_lora = prepare, attach


BUILDERS = {"seed": build_seed, "plain_loss": build_plain_loss, "recipe": build_recipe}


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_regions(model) -> tuple:
    """Component rules for the model's own classes: the line span of each forward."""
    body = getattr(model, model.base_model_prefix, None)
    layer = body.layers[0] if hasattr(body, "layers") else None
    owners = ((LOGITS, model), ("model body (rotary, mask)", body), ("layer outputs (residual adds)", layer),
              ("attention", getattr(layer, "self_attn", None)), ("MLP", getattr(layer, "mlp", None)),
              ("norms", getattr(layer, "input_layernorm", None)))
    rules = []
    for bucket, owner in owners:
        if owner is None:
            continue
        fn = inspect.unwrap(type(owner).forward)
        try:
            lines, first = inspect.getsourcelines(fn)
        except (OSError, TypeError):  # no source: its blocks fall to the generic rules
            continue
        rules.append((bucket, fn.__code__.co_filename, None, (first, first + len(lines) - 1)))
    return COMPONENT_RULES + tuple(rules)


def make_probe(snapshot_step: int | None, rules, row_bytes: int):
    """A callback that records the batches, the first optimizer step's memory, and one snapshot step."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class Probe(TrainerCallback):
        def __init__(self):
            self.batches, self.optimizer, self.snapshot = [], {}, None
            self.peaks, self.baseline = [None, None], None

        def record_batch(self, module, args):  # forward pre-hook on the input embeddings
            ids = args[0]
            self.batches.append([int(ids.shape[0]), int(ids.shape[-1]), int(ids.sum())])

        def fold_peaks(self) -> list[int | None]:
            """Overall peaks, kept across the reset before the snapshot step; None without CUDA."""
            if cuda:
                self.peaks = [max(self.peaks[0] or 0, torch.cuda.max_memory_allocated()),
                              max(self.peaks[1] or 0, torch.cuda.max_memory_reserved())]
            return self.peaks

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda and state.global_step + 1 == snapshot_step:
                self.fold_peaks()
                torch.cuda.reset_peak_memory_stats()
                self.baseline = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.optimizer["optimizer_before"] = allocated()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.optimizer["optimizer_after"] = allocated()

        def on_step_end(self, args, state, control, **kwargs):
            if self.baseline is None or state.global_step != snapshot_step:
                return
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot = analyze_snapshot(snap, torch.cuda.current_device(), self.baseline, rules, row_bytes)
            self.snapshot.update(step=snapshot_step, step_peak_allocated_gib=gib(torch.cuda.max_memory_allocated()))
            self.baseline = None

    return Probe()


def measure(path: str, model_dir: str, shape: tuple[int, int], data: str, steps: int, snapshot: bool,
            work: str) -> dict:
    """Build the path's trainer on a fresh model, train ``steps`` steps, report its memory and losses."""
    release()
    job = Job(model_dir, data, shape[0], shape[1], steps, os.path.join(work, f"{path}-{label(shape)}"),
              {"start": allocated()})
    started = time.time()
    trainer = BUILDERS[path](job)
    job.stages["trainer"] = allocated()
    model = causal_lm(trainer.model)
    probe = make_probe(min(SNAPSHOT_STEP, steps) if snapshot else None, model_regions(model),
                       2 * model.config.vocab_size)  # bytes of one bf16 logits row
    trainer.add_callback(probe)
    hook = model.get_input_embeddings().register_forward_pre_hook(probe.record_batch)
    result = {"shape": label(shape), "batch": shape[0], "seq": shape[1], "build_s": round(time.time() - started, 1)}
    print(f"bench_memory[{path} {label(shape)}]: built in {result['build_s']}s, training {steps} steps", flush=True)
    result.update(train(trainer))
    result.update(report(trainer, probe, {**job.stages, **probe.optimizer}))
    hook.remove()
    del trainer, model, probe
    release()
    result["allocated_after_cleanup_gib"] = gib(allocated())
    return result


def train(trainer) -> dict:
    import torch

    started = time.time()
    try:
        trainer.train()
        out = {"ok": True}
    except torch.OutOfMemoryError as exc:
        out = {"ok": False, "error": str(exc).splitlines()[0]}
    if torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(enabled=None)  # an OOM in the snapshot step left it on
    return {**out, "train_s": round(time.time() - started, 1)}


def report(trainer, probe, stages: dict) -> dict:
    peaks = probe.fold_peaks()
    deltas = stage_deltas(stages)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    if probe.snapshot is not None:
        probe.snapshot["baseline_split_gib"] = baseline_split(probe.snapshot["baseline_bytes"], deltas)
    return {"peak_allocated_gib": gib(peaks[0]), "peak_reserved_gib": gib(peaks[1]),
            "peak_allocated_bytes": peaks[0], "peak_reserved_bytes": peaks[1],
            "stages_gib": {k: gib(v) for k, v in stages.items()},
            "stage_deltas_gib": {k: gib(v) for k, v in deltas.items()},
            "losses": [h["loss"] for h in logged], "grad_norms": [h.get("grad_norm") for h in logged],
            "batches": probe.batches, "snapshot": probe.snapshot}


def worker(args) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    out = {"versions": versions(), "shapes": {}}
    for shape in parse_shapes(args.shapes):
        data = os.path.join(args.work, f"data-{shape[1]}.jsonl")
        try:
            row = measure(args.path, args.model, shape, data, args.steps, label(shape) == args.snapshot_shape,
                          args.work)
        except Exception as exc:  # noqa: BLE001 - record it and go on to the next shape
            row = {"shape": label(shape), "ok": False, "error": repr(exc)[:500],
                   "traceback": traceback.format_exc()[-3000:]}
        release()  # outside the except: a live exception keeps the failed step's tensors
        out["shapes"][label(shape)] = row
        Path(args.worker_out).write_text(json.dumps(out, indent=1))
        print(f"bench: memory {args.path} {label(shape)}: ok={row.get('ok')} peak allocated "
              f"{row.get('peak_allocated_gib')} GiB, reserved {row.get('peak_reserved_gib')} GiB, "
              f"losses {[round(x, 4) for x in row.get('losses') or []]}", flush=True)
    return 0


# ----------------------------------------------------------------------------- parent


def run_path(path: str, args, work: str) -> dict:
    """Run one path's worker; whatever it wrote survives a crash or a timeout."""
    out_file, err_file = os.path.join(work, f"{path}.json"), os.path.join(work, f"{path}.stderr")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--path", path, "--model", args.model, "--steps",
           str(args.steps), "--shapes", args.shapes, "--snapshot_shape", args.snapshot_shape, "--work", work,
           "--worker_out", out_file, "--out", args.out]
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
    started = time.time()
    print(f"bench_memory: [{path}] starting", flush=True)
    with open(err_file, "w") as err:
        try:
            rc = subprocess.run(cmd, env=env, stderr=err, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = json.loads(Path(out_file).read_text()) if os.path.exists(out_file) else {"shapes": {}}
    result.update(rc=rc, seconds=round(time.time() - started, 1))
    if rc != 0:
        result["stderr_tail"] = Path(err_file).read_text()[-3000:]
        print(f"bench_memory: [{path}] rc={rc}\n{result['stderr_tail']}", flush=True)
    return result


def compare(paths: dict, tol: float) -> dict:
    """Per shape: the seed's losses against the recipe's and the plain loss's, and whether every
    path saw the same batches."""
    out = {}
    shapes = {s for p in paths.values() for s in p.get("shapes", {})}
    for shape in sorted(shapes):
        rows = {name: p["shapes"].get(shape, {}) for name, p in paths.items()}
        seed = rows.get("seed", {})
        batches = [r.get("batches") for r in rows.values() if r.get("batches") is not None]
        out[shape] = {
            "seed_vs_recipe": loss_match(seed.get("losses"), rows.get("recipe", {}).get("losses"), tol),
            "seed_vs_plain_loss": loss_match(seed.get("losses"), rows.get("plain_loss", {}).get("losses"), tol),
            "same_batches": len(batches) > 1 and all(b == batches[0] for b in batches),
        }
    return out


def table(result: dict) -> str:
    head = (f"{'path':<11}{'shape':<8}{'max len':>8}{'peak alloc':>11}{'reserved':>10}{'weights':>9}{'+upcast':>9}"
            f"{'+lora':>7}{'optim':>7}{'loss 1st':>10}{'loss last':>10}{'train s':>9}")
    lines = [head, "-" * len(head)]
    for path, p in result["paths"].items():
        for shape, r in p.get("shapes", {}).items():
            d, losses = r.get("stage_deltas_gib") or {}, r.get("losses") or [None]
            longest = max((b[1] for b in r.get("batches") or []), default=None)  # padded tokens per row
            cells = [longest, r.get("peak_allocated_gib"), r.get("peak_reserved_gib"), d.get("weights"),
                     d.get("upcast"), d.get("lora"), d.get("optimizer_state"), losses[0], losses[-1], r.get("train_s")]
            widths = (8, 11, 10, 9, 9, 7, 7, 10, 10, 9)
            lines.append(f"{path:<11}{shape:<8}" + "".join(f"{_cell(c):>{w}}" for c, w in zip(cells, widths)))
            snap = r.get("snapshot")
            if snap:
                top = ", ".join(f"{k} {v}" for k, v in list(snap["buckets_gib"].items())[:5])
                lines.append(f"{'':<19}peak step {snap['step']}: baseline {snap['baseline_gib']} + {top} GiB")
            if r.get("error"):
                lines.append(f"{'':<19}error: {r['error'][:100]}")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def parent(args) -> int:
    result = {"versions": None, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "settings": {"steps": args.steps, "shapes": args.shapes, "rows": ROWS, "seed": SEED, "lr": LR,
                           "snapshot_shape": args.snapshot_shape,
                           "full_length": args.full_length, "snapshot_step": min(SNAPSHOT_STEP, args.steps),
                           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")},
              "paths": {}, "comparisons": {}}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
        for seq in sorted({s for _, s in parse_shapes(args.shapes)}):
            lengths = [seq] * ROWS if args.full_length else sample_lengths(ROWS, target=seq, seed=0)
            write_dataset(os.path.join(work, f"data-{seq}.jsonl"), lengths, seed=0)
        for path in args.paths.split(","):
            result["paths"][path] = run_path(path, args, work)
            result["versions"] = result["versions"] or result["paths"][path].pop("versions", None)
            result["paths"][path].pop("versions", None)
            result["comparisons"] = compare(result["paths"], args.loss_tol)
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result), flush=True)
    for shape, c in result["comparisons"].items():
        diffs = {k: (v or {}).get("max_abs_diff") for k, v in c.items() if k != "same_batches"}
        print(f"bench: memory {shape}: same batches {c['same_batches']}, max |loss diff| {diffs}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model folder (scripts/bench_common.py builds one)")
    ap.add_argument("--out", required=True, help="JSON result, rewritten after each path")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shapes", default="2x512,2x2048", help="comma list of BATCHxSEQ")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list out of {','.join(PATHS)}")
    ap.add_argument("--snapshot_shape", default="2x512", help="the shape whose step is snapshotted ('' = none)")
    ap.add_argument("--full_length", action="store_true",
                    help="every row fills the shape's length (default: log-normal lengths, median 0.55 x length)")
    ap.add_argument("--loss_tol", type=float, default=0.05, help="max abs loss difference still 'the same'")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per path's subprocess")
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return worker(args) if args.path else parent(args)


if __name__ == "__main__":
    sys.exit(main())
