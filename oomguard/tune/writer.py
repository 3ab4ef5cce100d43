"""A tuned policy file from a probe (``oomguard tune``). Pure but for :func:`write_policy`.

The file starts from a base policy (the shipped one of the same name, else ``default``) and changes:
the match rule (the class's card size), the starting knobs (the fastest probed configuration that
fits with the safety margin, at the command's effective batch and length), and the ``cuda_oom``
ladder's order: the first rung of each probed knob (length, batch) sorted by the bytes it frees at
the tuned start's worst batch, each with its tokens/s cost as a comment; rungs the probe cannot
measure in one process (LoRA rank, precision, anything else) keep their order after them. The
measurements are comments (device, date, command); so is what emulation cannot show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from oomguard.errors import PolicyError
from oomguard.policy import Policy, apply_rung, parse_policy, truncation_share
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH
from oomguard.tune.choice import GIB, Plan, capacity_of, data_profile, peak_at
from oomguard.tune.record import ProbeRecord

__all__ = ["RungCost", "rung_costs", "tuned_policy_text", "write_policy"]

_PROBED = (KNOB_BATCH, KNOB_MAX_SEQ_LENGTH)
EMULATION = ("emulated card: the allocator was capped (set_per_process_memory_fraction); memory is the "
             "emulated card's, but bandwidth, compute, clocks and the speed ranking are the host GPU's; the "
             "CUDA context and bitsandbytes' paged (managed) buffers are outside the cap")


@dataclass(frozen=True)
class RungCost:
    index: int
    rung: dict[str, Any]
    saved: float | None  # bytes freed at the tuned start's worst batch (None: not measurable by the probe)
    speed: tuple[float | None, float | None] | None  # tokens/s before, after
    cut: float | None = None  # share of the training tokens a length rung cuts (the data profile)

    def comment(self) -> str:
        if self.saved is None:
            return "not measured by the probe (fixed once the model is built, or not a probed knob)"
        text = f"frees {self.saved / GIB:.2f} GiB at the start's worst batch"
        before, after = self.speed or (None, None)
        if before and after:
            text += f"; tokens/s {before:,.0f} -> {after:,.0f} ({after / before - 1:+.0%})"
        if self.cut is not None:
            text += f"; cuts {self.cut:.1%} of the training tokens"
            bound = self.rung.get("max_token_cut")
            if bound is not None and self.cut > bound:
                text += f" (> max_token_cut {bound:g}: passed over for this data)"
        return text


def _start_knobs(record: ProbeRecord, plan: Plan, base: Policy) -> dict[str, Any]:
    knobs = base.start_knobs()
    req = record.requested
    for name in ("lora_r", "precision"):
        if req.get(name) is not None:
            knobs[name] = req[name]
    if req.get(KNOB_MAX_SEQ_LENGTH):
        knobs[KNOB_MAX_SEQ_LENGTH] = int(req[KNOB_MAX_SEQ_LENGTH])
    start = plan.best or plan.command
    knobs[KNOB_BATCH], knobs[KNOB_GRAD_ACCUM] = start.batch, start.accumulation
    return knobs


def rung_costs(record: ProbeRecord, plan: Plan, base: Policy, knobs: dict[str, Any]) -> list[RungCost]:
    """Each ``cuda_oom`` rung of ``base`` applied once to the tuned start: bytes freed, tokens/s."""
    start = plan.best or plan.command
    before, _ = peak_at(record, plan.fit, start.batch, start.length)
    seen: set[str] = set()
    out = []
    for i, rung in enumerate(base.ladders.cuda_oom.rungs):
        floor = getattr(rung, "floor", None)
        if floor is not None and isinstance(knobs.get(rung.knob), (int, float)) and floor >= knobs[rung.knob]:
            continue  # at or below its floor from the start: it can never help (the policy checks refuse it)
        dump = rung.model_dump(mode="json", exclude_defaults=True)
        dump = {"op": rung.op.value, "knob": rung.knob, **dump}
        after = apply_rung(rung, knobs, data_profile(record)) if rung.knob in _PROBED else None
        if after is None or rung.knob in seen or before is None:
            out.append(RungCost(i, dump, None, None))
            continue
        seen.add(rung.knob)
        length = min(start.length, int(after.get(KNOB_MAX_SEQ_LENGTH) or start.length))
        peak, _ = peak_at(record, plan.fit, int(after[KNOB_BATCH]), length)
        profile = data_profile(record)
        cut = truncation_share(profile, length) if profile and rung.knob == KNOB_MAX_SEQ_LENGTH else None
        out.append(RungCost(i, dump, None if peak is None else before - peak,
                            (start.tokens_per_s, _speed(record, int(after[KNOB_BATCH]), length)), cut))
    return out


def _speed(record: ProbeRecord, batch: int, length: int) -> float | None:
    for p in record.points:
        if p.batch == batch and abs(p.length - length) <= max(1, length // 100) and p.fits:
            return p.tokens_per_s
    return None


def _ordered(costs: Sequence[RungCost]) -> list[RungCost]:
    measured = sorted((c for c in costs if c.saved is not None), key=lambda c: -(c.saved or 0.0))
    return measured + [c for c in costs if c.saved is None]


def _flow(data: Any) -> str:
    return yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=10_000).strip()


def _block(data: Any, indent: int) -> list[str]:
    text = yaml.safe_dump(data, default_flow_style=False, sort_keys=False, width=120)
    return [" " * indent + line for line in text.splitlines()]


def _header(record: ProbeRecord, plan: Plan, name: str, command: str, margin: float) -> list[str]:
    cap = capacity_of(record)
    lines = [f"# oomguard policy: {name}, tuned by `oomguard tune` on {record.date}",
             f"# device: {record.device}" + (f", emulated card {record.vram_limit / GIB:g} GiB" if record.vram_limit
                                             else ""),
             f"# command: {command}",
             f"# versions: {json.dumps(record.versions)}",
             f"# worst row {record.worst_row} tokens of {record.rows} rows; allocator capacity "
             + (f"{cap / GIB:.2f} GiB" if cap else "unknown") + f"; safety margin {margin:.0%}",
             "# probed at the worst batch (copies of the longest row), peak reserved / allocated GiB, tokens/s:"]
    for p in record.points:
        if p.fits:
            lines.append(f"#   {p.batch:>3} x {p.length:<6} {_g(p.peak_reserved)} / {_g(p.peak_allocated)}  "
                         f"{(p.tokens_per_s or 0):,.0f}")
        else:
            lines.append(f"#   {p.batch:>3} x {p.length:<6} did not fit" + (" (implied)" if p.implied else ""))
    if plan.fit is not None:
        f = plan.fit
        lines.append(f"# memory model: {f.form}; a={f.a / GIB:.3f} GiB b={f.b:.0f} B/token c={f.c:.4f} B/token^2; "
                     f"error max {f.max_rel_error:.1%} RMS {f.rms_rel_error:.1%}")
    if record.vram_limit:
        lines.append(f"# {EMULATION}.")
    lines += [f"# {n}" for n in record.notes if "emulated card" not in n]
    return lines


def _g(n: int | None) -> str:
    return f"{n / GIB:6.2f}" if n else "     ?"


def _match(base: Policy, record: ProbeRecord, name: str) -> dict[str, Any]:
    size = (record.vram_limit or record.total_bytes or 0) / GIB
    match = base.match.model_dump(mode="json", exclude_none=True) if base.match and base.name == name else {}
    if size:
        match["memory_gib"] = {"min": round(size * 0.95, 1), "max": round(size * 1.05, 1)}
    match.setdefault("priority", 20)
    return match


def tuned_policy_text(record: ProbeRecord, plan: Plan, base: Policy, *, name: str, command: str,
                      margin: float) -> str:
    """The tuned policy's YAML, comments included (not yet validated: :func:`write_policy` does)."""
    knobs = _start_knobs(record, plan, base)
    costs = _ordered(rung_costs(record, plan, base, knobs))
    body = json.loads(base.model_dump_json(exclude={"source"}, exclude_none=True))
    start = plan.best or plan.command
    lines = _header(record, plan, name, command, margin)
    lines.append(f"name: {name}")
    lines.append("description: " + json.dumps(f"tuned from a probe on {record.device} ({record.date}); start "
                                              f"{start.batch} x {start.accumulation} at {start.length} tokens"))
    lines += ["match:"] + _block(_match(base, record, name), 2)
    lines += ["capabilities:"] + _block(body["capabilities"], 2)
    lines += ["knobs:"] + _block(knobs, 2)
    lines.append(f"lr_rule: {body['lr_rule']}")
    lines += ["ladders:", "  cuda_oom:", "    # ordered by the bytes each rung frees at the tuned start (probe)",
              "    rungs:"]
    for c in costs:
        lines += [f"      # {c.comment()}", f"      - {_flow(c.rung)}"]
    if body["ladders"]["cuda_oom"].get("then"):
        lines.append(f"    then: {body['ladders']['cuda_oom']['then']}")
    rest = {k: v for k, v in body["ladders"].items() if k != "cuda_oom" and v is not None}
    lines += _block(rest, 2)
    lines += ["limits:"] + _block(body["limits"], 2)
    if body.get("flags"):
        lines += ["flags:"] + _block(body["flags"], 2)
    return "\n".join(lines) + "\n"


def write_policy(path: str | Path, text: str) -> Policy:
    """Validate ``text`` as a policy (every check ``oomguard policy validate`` runs), then write it."""
    path = Path(path)
    try:
        policy = parse_policy(yaml.safe_load(text), source=str(path))
    except PolicyError as exc:
        raise PolicyError([f"the tuned policy for {path} is not valid, nothing written (a bug in oomguard tune: "
                           "please report it with the probe.json)", *exc.problems]) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return policy
