"""``oomguard plan``'s answer as text. Pure."""

from __future__ import annotations

from oomguard.tune.choice import GIB, Config, Plan, Verdict

__all__ = ["render_plan"]

_SAY = {Verdict.FITS: "fits", Verdict.TIGHT: "fits, but inside the safety margin",
        Verdict.DOES_NOT_FIT: "does NOT fit", Verdict.UNKNOWN: "memory unknown (no CUDA device)"}


def _gib(n: float | None) -> str:
    if n is None:
        return "?"
    return "OOM" if n == float("inf") else f"{n / GIB:.2f} GiB"


def _config(c: Config) -> str:
    how = "measured" if c.measured else "predicted"
    speed = f", {c.tokens_per_s:,.0f} tokens/s" if c.tokens_per_s else ""
    return f"{c.batch} x {c.length} tokens, accumulation {c.accumulation}: peak {_gib(c.peak)} ({how}){speed}"


def render_plan(plan: Plan) -> str:
    lines = [f"device: {plan.device}" + (f", allocator capacity {_gib(plan.capacity)}" if plan.capacity else "")]
    c = plan.command
    lines.append(f"the command as written, at its worst batch ({c.batch} copies of the longest row): "
                 f"{_SAY[plan.verdict]}")
    lines.append(f"  {_config(c)}" + (f"; headroom {_gib(plan.headroom)}" if plan.headroom not in (None, float('-inf'))
                                      and c.peak != float("inf") else ""))
    if plan.typical_peak is not None:
        lines.append(f"  an average-length batch would need about {_gib(plan.typical_peak)}: "
                     "the worst batch, not the average, decides")
    margin = f"{plan.margin:.0%} of the card kept free"
    if plan.best is not None:
        lines.append(f"fastest configuration that fits ({margin}, same effective batch and length): "
                     f"{_config(plan.best)}")
    else:
        lines.append(f"no probed configuration fits with {margin} at the same effective batch and length")
    step = plan.ladder_first
    if step is not None:
        lines.append(f"what the ladder does first after an OOM: {step.reason}")
        if step.config is not None:
            lines.append(f"  then: {_config(step.config)} -> {_SAY[step.verdict]}")
    for fit in (plan.fit, plan.fit_allocated):
        if fit is not None:
            loo = f", leave-one-out max {fit.loo_max_rel_error:.1%}" if fit.loo_max_rel_error is not None else ""
            lines.append(f"memory model ({fit.metric}, {fit.points} points): {fit.form}; a={fit.a / GIB:.3f} GiB, "
                         f"b={fit.b:.0f} B/token, c={fit.c:.3f} B/token^2; error max {fit.max_rel_error:.1%}, "
                         f"RMS {fit.rms_rel_error:.1%}{loo}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
