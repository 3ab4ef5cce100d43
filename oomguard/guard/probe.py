"""The probe (issue 18, docs/TUNING.md): instead of training, measure the worst batch at a few configurations.

Run when ``OOMGUARD_PROBE`` holds a :class:`~oomguard.tune.record.ProbeSpec` and the user's script calls
``Trainer.train()`` under the bootstrap; the script loaded the model once. For each (per-device batch b,
length L) the Trainer's own ``train()`` runs a few optimizer steps on b copies of the longest training row
cut to L (the worst batch: with dynamic padding the peak follows the longest row), so the user's collator,
``compute_loss``, autocast, checkpointing and optimizer are the path measured. Peaks are reset between
configurations; a CUDA OOM is "did not fit", freed outside the ``except`` block (DESIGN §6). ``probe.json``
goes into the run dir, then the process exits 0: no checkpoint, no adapter. Not probed (fixed once the model
is built): the LoRA rank, precision, quantization.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time
from typing import Any, Callable

import torch

from oomguard import protocol
from oomguard.guard.callbacks.faults import FaultInjectionCallback
from oomguard.guard.callbacks.heartbeat import heartbeat_path
from oomguard.guard.callbacks.profile import is_packed, length_profile, sample_indices
from oomguard.guard.trainer_patches import set_train_batch_size
from oomguard.tune.record import ENV_PROBE, PROBE_JSON, ProbePoint, ProbeRecord, ProbeSpec

__all__ = ["cut_row", "probe_and_exit", "probe_grid", "run_probe", "worst_row"]

_SEQ_KEYS_SKIP = ("seq_lengths",)


def probe_grid(spec: ProbeSpec, batch: int, accumulation: int, worst: int) -> list[tuple[int, int]]:
    """(per-device batch, length) pairs, longest length first, batches rising. Pure."""
    effective = max(1, batch * accumulation)
    if spec.batches is not None:
        batches = sorted(set(spec.batches))
    else:
        batches = sorted({b for b in (2 ** i for i in range(12)) if b <= min(effective, spec.max_batch)
                          and effective % b == 0} | {batch})
    lengths = sorted({max(1, int(worst * share)) for share in spec.lengths}, reverse=True)
    return [(b, n) for n in lengths for b in batches]


def _row_len(row: Any) -> int | None:
    ids = row.get("input_ids") if isinstance(row, dict) else None
    try:
        return len(ids) if ids is not None else None
    except TypeError:
        return None


def worst_row(dataset: Any) -> tuple[int, list[int], int]:
    """(index of the longest row, the read rows' ``input_ids`` lengths, rows) among up to 100,000 read rows."""
    n = len(dataset)
    idx = sample_indices(n)
    if hasattr(dataset, "column_names") and "input_ids" in (dataset.column_names or ()):
        rows = dataset.select(idx) if len(idx) < n else dataset
        lengths = [len(x) for x in rows["input_ids"]]
    else:
        lengths = [_row_len(dataset[i]) or 0 for i in idx]
    if not lengths or max(lengths) == 0:
        raise ValueError("the training set's rows carry no input_ids: the probe cannot find the longest row; "
                         "tokenize the data before the Trainer is built")
    best = max(range(len(lengths)), key=lengths.__getitem__)
    return idx[best], lengths, n


def cut_row(row: dict, length: int) -> dict:
    """``row`` with every per-token field cut to ``length`` tokens (packed ``seq_lengths`` too). Pure."""
    full = _row_len(row)
    out = {}
    for key, value in row.items():
        if key in _SEQ_KEYS_SKIP:
            out[key] = _cut_seq_lengths(value, length)
        elif full is not None and hasattr(value, "__len__") and not isinstance(value, str) \
                and getattr(value, "ndim", 1) >= 1 and len(value) == full:
            out[key] = value[:length]
        else:
            out[key] = value
    return out


def _cut_seq_lengths(lengths: Any, length: int) -> list[int]:
    out, left = [], length
    for n in list(lengths):
        if left <= 0:
            break
        out.append(min(int(n), left))
        left -= out[-1]
    return out


def _probe_dataset(dataset: Any, index: int, length: int, count: int) -> Any:
    row = cut_row(dict(dataset[index]), length)
    rows = [dict(row) for _ in range(count)]
    if hasattr(type(dataset), "from_list"):  # datasets.Dataset: the Trainer removes unused columns as usual
        return type(dataset).from_list(rows)
    return rows


class _Timer:
    """Times the Trainer's optimizer steps and counts the tokens its micro-batches hold."""

    def __init__(self, run_dir: Any, rank: int):
        from transformers import TrainerCallback

        timer = self

        class ProbeCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.begin()

            def on_step_end(self, args, state, control, **kwargs):
                timer.end()

        self.callback = ProbeCallback()
        self.beat = heartbeat_path(run_dir, rank) if run_dir else None
        self.reset()

    def reset(self) -> None:
        self.t0, self.step_s, self.step_tokens, self.tokens, self.max_tokens = 0.0, None, 0, 0, None

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def begin(self) -> None:
        self._sync()
        self.t0, self.tokens = time.perf_counter(), 0

    def end(self) -> None:
        self._sync()
        self.step_s, self.step_tokens = time.perf_counter() - self.t0, self.tokens
        if self.beat is not None:
            try:
                protocol.touch(self.beat)
            except OSError:
                pass

    def saw(self, inputs: Any) -> None:
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if isinstance(ids, torch.Tensor):
            self.tokens += int(ids.numel())
            self.max_tokens = max(self.max_tokens or 0, int(ids.numel()))


def _on_cuda(trainer: Any) -> bool:
    device = getattr(getattr(trainer, "args", None), "device", None)
    return torch.cuda.is_available() and getattr(device, "type", None) == "cuda"


def _set_probe_args(args: Any, batch: int, spec: ProbeSpec) -> None:
    args.per_device_train_batch_size = batch
    args.gradient_accumulation_steps = spec.accumulation
    args.max_steps = spec.steps
    for name in ("save_strategy", "eval_strategy", "logging_strategy"):
        if hasattr(args, name):
            setattr(args, name, "no")
    args.load_best_model_at_end = False


def _free(trainer: Any, cuda: bool) -> None:
    trainer.optimizer, trainer.lr_scheduler = None, None
    try:
        trainer.model.zero_grad(set_to_none=True)
        trainer.accelerator.free_memory()
    except Exception:  # noqa: BLE001 - freeing is best effort; the next peak is reset anyway
        pass
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _measure(trainer: Any, train: Callable[[], Any], timer: _Timer, batch: int, length: int,
             cuda: bool) -> ProbePoint:
    """One configuration; an OOM is "did not fit" and is freed after the ``except`` block."""
    _free(trainer, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer.reset()
    error = None
    try:
        train()
    except torch.OutOfMemoryError as exc:
        error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "torch.OutOfMemoryError"
    peak_a = torch.cuda.max_memory_allocated() if cuda else None
    peak_r = torch.cuda.max_memory_reserved() if cuda else None
    _free(trainer, cuda)  # outside the except block: the exception and its frames are gone
    tps = timer.step_tokens / timer.step_s if error is None and timer.step_s else None
    return ProbePoint(batch=batch, length=length, fits=error is None, tokens=timer.max_tokens,
                      peak_allocated=peak_a, peak_reserved=peak_r, step_s=None if error else timer.step_s,
                      tokens_per_s=tps, error=error)


def _implied(done: list[ProbePoint], batch: int, length: int) -> bool:
    return any(not p.fits and batch >= p.batch and length >= p.length for p in done)


def _requested(trainer: Any, env: Any) -> dict[str, Any]:
    from oomguard.guard.observe import observe

    seen = observe(trainer, stage=protocol.STAGE_BUILT)
    knobs = seen.get("knobs", {})
    return {"per_device_train_batch_size": int(knobs.get("per_device_train_batch_size", 1)),
            "gradient_accumulation_steps": int(knobs.get("gradient_accumulation_steps", 1)),
            "max_seq_length": knobs.get("max_seq_length"), "world_size": env.world_size,
            "lora_r": knobs.get("lora_r"), "precision": knobs.get("precision")}


def _instrument(trainer: Any, timer: _Timer) -> _Timer:
    """Only the timer and the test faults stay on (no saving, logging, guard journaling); the trainer's own
    ``compute_loss`` runs, with each micro-batch's tokens counted."""
    trainer.callback_handler.callbacks = [cb for cb in trainer.callback_handler.callbacks
                                          if isinstance(cb, FaultInjectionCallback)] + [timer.callback]
    own_loss = trainer.compute_loss

    def counted_loss(model, inputs, *args, **kwargs):
        timer.saw(inputs)
        return own_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted_loss
    return timer


def run_probe(trainer: Any, original_train: Callable[..., Any], spec: ProbeSpec, env: Any) -> ProbeRecord:
    """Probe every configuration of the grid on ``trainer``; the record (not yet written)."""
    started = time.perf_counter()
    requested = _requested(trainer, env)
    dataset = trainer.train_dataset
    index, lengths, rows = worst_row(dataset)
    worst = max(lengths)
    cuda = _on_cuda(trainer)
    timer = _instrument(trainer, _Timer(env.run_dir, env.rank))
    _free(trainer, cuda)
    base = torch.cuda.memory_allocated() if cuda else None
    points: list[ProbePoint] = []
    grid = probe_grid(spec, requested["per_device_train_batch_size"], requested["gradient_accumulation_steps"], worst)
    for batch, length in grid:
        if _implied(points, batch, length):
            points.append(ProbePoint(batch=batch, length=length, fits=False, implied=True,
                                     error="not run: a smaller batch at this length or shorter did not fit"))
            continue
        trainer.train_dataset = _probe_dataset(dataset, index, length, batch * spec.accumulation * spec.steps)
        _set_probe_args(trainer.args, batch, spec)
        set_train_batch_size(trainer, trainer.args.train_batch_size)
        points.append(_measure(trainer, lambda: original_train(trainer, resume_from_checkpoint=None),
                               timer, batch, length, cuda))
    return ProbeRecord(device=_device_name(cuda), cuda=cuda, vram_limit=env.vram_limit,
                       total_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else None,
                       capacity=_capacity(cuda),
                       requested=requested, worst_row=worst, rows=rows, packed=is_packed(dataset),
                       profile=length_profile(lengths, count=rows),
                       points=tuple(points), base_allocated=base, wall_s=round(time.perf_counter() - started, 2),
                       date=datetime.date.today().isoformat(), versions=_versions(), notes=_notes(cuda, env))


def _capacity(cuda: bool) -> int | None:
    """The allocator's cap (the emulated card's fraction × total; DESIGN §6), when torch tells it."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if not cuda or getter is None:
        return None
    try:
        fraction = float(getter(0))
    except Exception:  # noqa: BLE001 - an older torch: the choice falls back to the card size less the context
        return None
    return int(fraction * torch.cuda.get_device_properties(0).total_memory) if fraction < 1 else None


def _device_name(cuda: bool) -> str:
    return torch.cuda.get_device_name(0) if cuda else "cpu"


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "trl", "bitsandbytes"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def _notes(cuda: bool, env: Any) -> tuple[str, ...]:
    notes = ["not probed (fixed once the model is built): lora_r, precision, quantization, optimizer type"]
    if not cuda:
        notes.append("no CUDA device: memory unknown, steps timed on CPU")
    if env.vram_limit:
        notes.append("emulated card: the allocator is capped; bandwidth and compute are the host GPU's")
    return tuple(notes)


def probe_and_exit(ctx: Any, trainer: Any, original_train: Callable[..., Any]) -> None:
    """Probe, write ``probe.json`` into the run dir, exit 0 (the user's script never trains)."""
    env = ctx.env
    if env.world_size > 1:
        print(f"oomguard probe: {env.world_size} processes; the probe measures one. Run `oomguard plan` on the "
              "single-process command (same per-device batch).", file=sys.stderr)
        sys.exit(2)
    spec = ProbeSpec.from_json(os.environ.get(ENV_PROBE, ""))
    record = run_probe(trainer, original_train, spec, env)
    path = env.run_dir / PROBE_JSON
    protocol.atomic_write_json(path, record.to_dict())
    ctx.journal.emit(protocol.Event.PROBE_WRITTEN, path=str(path), points=len(record.points), wall_s=record.wall_s)
    print(f"oomguard probe: {len(record.points)} configurations in {record.wall_s:.1f} s -> {path}", file=sys.stderr)
    sys.stdout.flush()
    sys.exit(0)
