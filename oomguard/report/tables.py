"""The HTML report's text parts: the head (status, root cause, recoveries), the attempts (timeline and
table with restart cost) and the requested → final table with each change's verification.

Every number comes from the ``oomguard.report/1`` document (``export.build_document``) or the journal;
nothing here reads files. Stdlib only.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from .plot import Bar, timeline_chart
from .summary import grow_line, next_step_time, plain_steps, plural, where_text

__all__ = ["attempts_section", "first_step_times", "header_section", "knobs_section"]

HEAD = {"succeeded": "finished", "gave_up": "gave up", "failed": "failed", "interrupted": "was interrupted",
        "running": "is still running (or its supervisor died)"}
MARKS = {"verified": ("✓ verified", "verified"), "not_applied": ("✗ not applied", "not_applied"),
         "unverified": ("? not verified in the child", "unverified")}
ROOT_CAUSE_CHARS = 200  # the head line; the whole text is its tooltip (and in run.json)
TIMELINE = {"gap": "#bdbdbd", "startup": "#90a4ae", "ok": "#2e7d32", "failed": "#c62828", "stopped": "#ef6c00"}


def _e(value: Any) -> str:
    return escape("-" if value is None else str(value))


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def _cost(cost: dict[str, Any] | None) -> str:
    cost = cost or {}
    parts = []
    if cost.get("steps_redone") is not None:
        parts.append(plural(cost["steps_redone"], "step") + " redone")
    if cost.get("seconds_to_next_step") is not None:
        parts.append(f"{cost['seconds_to_next_step']:.1f} s to the next step")
    return ", ".join(parts) or "-"


def header_section(doc: dict[str, Any], run: dict[str, Any], run_dir: str) -> str:
    status = str(doc["status"])
    line = (f"Run {HEAD.get(status, status)} after {plural(len(doc['attempts']), 'attempt')}, "
            f"{plural(len(doc['recoveries']), 'recovery', 'recoveries')}, {doc['wall_s']:.0f} s; last step "
            f"{doc['final_step'] if doc['final_step'] is not None else '-'}; exit code {_e(doc['exit_code'])}")
    out = [f'<section><h1>oomguard report <span class="status {escape(status)}">{escape(status)}</span></h1>',
           f"<p><b>{escape(line)}</b></p>"]
    if doc["root_cause"]:
        text = doc["root_cause"]["text"]
        short = text if len(text) <= ROOT_CAUSE_CHARS else text[:ROOT_CAUSE_CHARS - 1].rstrip() + "…"
        out.append(f'<p>Root cause: <b title="{escape(text)}">{escape(short)}</b></p>')
    if doc["recoveries"]:
        items = "".join(f"<li>after attempt {r['attempt']}: {escape(r['reason'])} "
                        f'<span class="muted">[cost: {escape(_cost(r["cost"]))}]</span></li>'
                        for r in doc["recoveries"])
        out.append(f"<p>Recoveries:</p><ul>{items}</ul>")
    if doc.get("grow_backs"):  # issue 18 item 5: the text summary's lines
        items = "".join(f"<li>{escape(grow_line(g['attempt'], g['reason'], g['verified'], g['why']))}</li>"
                        for g in doc["grow_backs"])
        out.append(f"<p>Grow-backs:</p><ul>{items}</ul>")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["started"])) if doc["started"] else "-"
    command = " ".join(str(c) for c in run.get("command") or [])
    out.append(f'<p class="small muted">run dir <code>{_e(run_dir)}</code> · policy <code>{_e(doc["policy"])}'
               f"</code> · started {escape(started)} · world size {doc['world_size']}</p>"
               f'<p class="small muted">command <code>{escape(command)}</code></p>')
    extra = [f"skipped incomplete checkpoint (kept on disk): {p}" for p in doc["skipped_checkpoints"]]
    extra += [f"problem: {p}" for p in doc["problems"]]
    if extra:
        out.append("<ul class=\"small\">" + "".join(f"<li>{escape(x)}</li>" for x in extra) + "</ul>")
    out.append("</section>")
    return "".join(out)


def first_step_times(run: dict[str, Any], events: list[dict[str, Any]]) -> dict[int, float]:
    """attempt n -> time of its first completed optimizer step (its first ``step`` event), as the text
    summary measures a recovery's cost."""
    out: dict[int, float] = {}
    for a in run.get("attempts", []):
        if isinstance(a, dict) and isinstance(a.get("n"), int) and isinstance(a.get("started"), (int, float)):
            at = next_step_time(events, a, a["started"])
            if at is not None:
                out[a["n"]] = at
    return out


def _outcome(a: dict[str, Any]) -> tuple[str, str]:
    """(text, timeline colour key) of how an attempt ended."""
    f = a.get("failure")
    if f:
        return f"{f['kind']} {where_text(f.get('step'))}", "failed"
    if a.get("interrupted"):
        return f"stopped ({a['interrupted']})", "stopped"
    if a.get("ended") is None:
        return "running (or its supervisor died)", "stopped"
    return f"exit {a.get('exit_code')}", "ok" if a.get("exit_code") == 0 else "failed"


def _bars(doc: dict[str, Any], first: dict[int, float], now: float) -> list[Bar]:
    t0, bars, prev_end = doc["started"] or 0.0, [], None
    for row, a in enumerate(doc["attempts"]):
        start, end = a["started"] or t0, a["ended"] or now
        text, key = _outcome(a)
        if prev_end is not None and start > prev_end:
            bars.append(Bar(row, prev_end - t0, start - t0, TIMELINE["gap"], kind="gap",
                            title=f"attempt {a['n']}: {start - prev_end:.1f} s between attempts (decision, backoff, "
                                  "GPU release)"))
        step_t = first.get(a["n"])
        if step_t is not None and start <= step_t <= end:
            bars.append(Bar(row, start - t0, step_t - t0, TIMELINE["startup"], kind="startup",
                            title=f"attempt {a['n']}: {step_t - start:.1f} s from launch to the first optimizer step"))
            start = step_t
        bars.append(Bar(row, start - t0, end - t0, TIMELINE[key], text=text,
                        title=f"attempt {a['n']}: {text}; ran {end - (a['started'] or t0):.1f} s"))
        prev_end = end
    return bars


def attempts_section(doc: dict[str, Any], run: dict[str, Any], events: list[dict[str, Any]]) -> str:
    if not doc["attempts"]:
        return '<section><h2>Attempts</h2><p class="muted">No attempt started.</p></section>'
    first = first_step_times(run, events)
    now = doc["ended"] or max((e.get("time", 0) for e in events), default=doc["started"] or 0)
    chart = timeline_chart("timeline", _bars(doc, first, now), rows=[f"attempt {a['n']}" for a in doc["attempts"]])
    legend = ('<div class="legend">' + "".join(
        f'<span><i style="background:{c};height:8px"></i>{t}</span>' for t, c in
        (("between attempts", TIMELINE["gap"]), ("launch → first step", TIMELINE["startup"]),
         ("trained, then finished", TIMELINE["ok"]), ("trained, then failed", TIMELINE["failed"]),
         ("stopped", TIMELINE["stopped"]))) + "</div>")
    cost = {r["attempt"] + 1: r["cost"] for r in doc["recoveries"]}
    rows = []
    for a in doc["attempts"]:
        text, _ = _outcome(a)
        began = (a["started"] - doc["started"]) if a["started"] and doc["started"] else None
        dur = (a["ended"] - a["started"]) if a["ended"] and a["started"] else None
        start_step = a["resumed_from"].rpartition("-")[2] if a["resumed_from"] else "0"
        rung = f"{a['rung']['ladder']} rung {a['rung']['index']}" if a["rung"] else "-"
        to_first = (first[a["n"]] - a["started"]) if a["n"] in first and a["started"] else None
        rows.append(f'<tr><td>{a["n"]}</td><td class="num">+{_s(began)}</td><td class="num">{_s(dur)}</td>'
                    f'<td class="num">{_s(to_first)}</td><td>{escape(start_step)} → {_e(a["max_step"])}</td>'
                    f"<td>{escape(plain_steps(text))}</td><td>{escape(rung)}</td>"
                    f"<td>{escape(_cost(cost.get(a['n'])) if a['n'] in cost else '-')}</td></tr>")
    table = ("<table><tr><th>attempt</th><th>started</th><th>ran</th><th>to first step</th><th>steps</th>"
             "<th>ended</th><th>rung</th><th>restart cost</th></tr>" + "".join(rows) + "</table>")
    return f"<section><h2>Attempts</h2>{chart}{legend}{table}</section>"


def _mark(verification: str | None) -> str:
    if verification is None:
        return ""
    text, cls = MARKS.get(verification, (verification, "unverified"))
    return f'<span class="{cls}">{escape(text)}</span>'


def _checks_table(events: list[dict[str, Any]]) -> str:
    rows = [e for e in events if e.get("event") in ("change_verified", "change_not_applied")]
    if not rows:
        return '<p class="muted small">No change verification in the journal.</p>'
    body = "".join(f"<tr><td>{_e(e.get('attempt'))}</td><td>{_e(e.get('knob'))}</td><td>{_e(e.get('expected'))}</td>"
                   f"<td>{_e(e.get('observed'))}</td><td>"
                   f"{_mark('verified' if e['event'] == 'change_verified' else 'not_applied')}</td>"
                   f"<td>{_e(e.get('why') or '')}</td></tr>" for e in rows)
    return (f"<details{' open' if len(rows) <= 12 else ''}><summary>What the child showed, per attempt "
            f"({plural(len(rows), 'check')})</summary><table><tr><th>attempt</th><th>knob</th><th>ordered</th>"
            f"<th>observed</th><th>verdict</th><th>why</th></tr>{body}</table></details>")


def knobs_section(doc: dict[str, Any], events: list[dict[str, Any]]) -> str:
    source = "as the child ran it" if doc["requested_source"] == "observed" else "from the command's flags only"
    rows = "".join(f'<tr class="{"changed" if k["changed"] else ""}"><td>{escape(k["knob"])}</td>'
                   f'<td class="num">{_e(k["requested"])}</td><td class="num">{_e(k["final"])}</td>'
                   f'<td>{_mark(k["verification"])}</td></tr>' for k in doc["knobs"])
    eb = doc["effective_batch"]
    if eb["requested"] is not None:
        kept = "kept" if eb["kept"] else "CHANGED"
        rows += (f'<tr><td>effective batch</td><td class="num">{eb["requested"]}</td><td class="num">'
                 f'{_e(eb["final"])}</td><td>{kept} (world size {eb["world_size"]})</td></tr>')
    cut = doc["tokens_cut"]
    note = "" if cut["share"] is None else (f'<p class="small">Training tokens beyond the final max_seq_length: '
                                            f"<b>{cut['share'] * 100:.1f} %</b></p>")
    missed = "".join(f"<li>{escape(str(m['knob']))} → {_e(m['expected'])} (attempt {_e(m['attempt'])}): "
                     f"{escape(m['why'])}</li>" for m in doc["not_applied"])
    return (f"<section><h2>Requested ({escape(source)}) → final</h2><table><tr><th>knob</th><th>requested</th>"
            f"<th>final</th><th>change</th></tr>{rows}</table>{note}"
            + (f'<p class="not_applied">Changes not applied:</p><ul>{missed}</ul>' if missed else "")
            + f"{_checks_table(events)}</section>")
