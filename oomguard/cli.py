"""The ``oomguard`` command. Parses once into a spec; maps OomguardError to exit codes."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import ExitCode, OomguardError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # every command and group; inherited by subcommands
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=HELP_OPTIONS,
                  help="oomguard: carries LLM fine-tuning runs through CUDA OOM, NaN, host OOM and hangs.")
policy_app = typer.Typer(no_args_is_help=True, context_settings=HELP_OPTIONS,
                         help="Validate, show and export policy files.")
app.add_typer(policy_app, name="policy")
# The wrapped command's own arguments pass through untouched. Option parsing stops at the first
# argument that is not oomguard's option (or at ``--``): what follows is the command's, its -h included.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
RUN_ARGS = {**PASSTHROUGH, "allow_interspersed_args": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"oomguard {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print `oomguard <version>` and exit.")) -> None:
    """oomguard: carries LLM fine-tuning runs through CUDA OOM, NaN, host OOM and hangs."""


def _fail(exc: OomguardError) -> None:
    typer.echo(f"oomguard: error: {exc}", err=True)
    raise typer.Exit(int(exc.exit_code))


def _default_run_dir() -> Path:
    return Path("oomguard-runs") / time.strftime("run-%Y%m%d-%H%M%S")


def _command_for(run_dir: Path, given: list[str]) -> list[str]:
    """The command to run in ``run_dir``: a new run's, or the recorded one of a run to continue.
    A different command for an existing run is refused: it would run the old command (from
    scratch) into the new command's output dir."""
    from .errors import RunDirError
    from .protocol import redact_argv
    from .supervisor.journal import check_not_in_use, command_text, load_record, masked_secrets, remember_command
    from .supervisor.spec import check_run_dir

    check_run_dir(run_dir)  # a file, or a dir below one, is named as such, not as "not a run dir"
    check_not_in_use(run_dir)
    record = load_record(run_dir)
    if record is None:
        remember_command(run_dir, given)
        return given
    if given and redact_argv(given) != redact_argv(record.command):
        raise RunDirError(f"{run_dir}: this run dir holds a run of `{command_text(record.command)}`, not "
                          f"`{command_text(given)}`; continue it with `oomguard run --run-dir {run_dir}` "
                          "(no command), or pass a new --run-dir for the new command")
    if not given and masked_secrets(record.command):
        raise RunDirError(f"{run_dir}: the run's command held secret values, which are not saved "
                          f"(`{command_text(record.command)}`); continue it with the same command: "
                          f"`oomguard run --run-dir {run_dir} -- <command>`")
    command = given or list(record.command)
    remember_command(run_dir, command)
    return command


def _print_summary(run_dir: Path) -> None:
    from .report import render_text, summarize

    try:
        typer.echo("\n" + render_text(summarize(run_dir)), err=True)
    except OomguardError as exc:  # the run's own outcome stands; say why there is no summary
        typer.echo(f"oomguard: no summary: {exc}", err=True)


@app.command(context_settings=RUN_ARGS, options_metavar="[OPTIONS] -- COMMAND...")
def run(ctx: typer.Context,
        policy: Optional[str] = typer.Option(None, help="Shipped policy name or a policy file; "
                                             "default: chosen for this GPU."),
        run_dir: Optional[Path] = typer.Option(None, help="Run directory (new, empty, or an earlier run to continue)."),
        vram_limit: Optional[str] = typer.Option(None, help="Emulate a smaller card, e.g. 24GiB."),
        inject: Optional[str] = typer.Option(None, help="Faults for the child, e.g. 'cuda_oom@step=5;nan@step=9'; "
                                             "data-dependent: 'cuda_oom@tokens=N' (any micro-batch over N tokens), "
                                             "'nan@row=R' (any micro-batch holding row R)."),
        checkpoint_dir: Optional[Path] = typer.Option(None, help="Where the child writes checkpoint-N "
                                                      "(default: its --output_dir)."),
        start_from_policy: bool = typer.Option(False, help="Attempt 1 takes the policy's knobs where the command sets "
                                               "no flag (default: the command as written)."),
        dry_run: bool = typer.Option(False, help="Print policy, knobs and the first command line; start nothing."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not echo the child's output (it is still "
                                   "logged); oomguard's own lines stay."),
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="Show everything the child prints, its tracebacks whole."),
        notify: Optional[str] = typer.Option(None, metavar="URL", help="POST a JSON message (Slack/Discord/ntfy-"
                                             "compatible) here when the run ends; the only network oomguard does."),
        notify_on: str = typer.Option("end", metavar="end|recovery",
                                      help="With --notify: 'recovery' also posts after each recovery."),
        on_end: Optional[str] = typer.Option(None, metavar="CMD", help="Run this shell command when the run ends, "
                                             "the `report --json` document on its stdin."),
        on_end_timeout: float = typer.Option(300.0, metavar="SECONDS", help="Stop the --on-end command after this."),
        warm_spare: Optional[bool] = typer.Option(None, "--warm-spare/--no-warm-spare",
                                                  help="On by default (OOMGUARD_WARM_SPARE=0 turns the default "
                                                  "off): keep one pre-imported interpreter (host memory only, no "
                                                  "CUDA) that becomes the next attempt's child, or the launcher "
                                                  "whose single-process worker forks from it (accelerate, trl). "
                                                  "Never attempt 1 (docs/BENCHMARKS.md)."),
        # --- issue 20 (N): several nodes, one supervisor per node (docs/DISTRIBUTED.md) -------------------
        node_rank: Optional[int] = typer.Option(None, help="This node's rank in a job of several nodes (default: "
                                                "the command's --node-rank/--machine_rank, PET_NODE_RANK, "
                                                "SLURM_NODEID)."),
        nnodes: Optional[int] = typer.Option(None, help="The job's node count (default: the command's "
                                             "--nnodes/--num_machines, else torchrun's PET_NNODES)."),
        node_timeout: float = typer.Option(300.0, metavar="SECONDS", help="Several nodes: how long to wait for "
                                           "another node's supervisor before ending with exit 7."),
        # --- end issue 20 (N) ------------------------------------------------------------------------------
        ) -> None:
    """Run COMMAND (after --) under the supervisor.

    Options go before COMMAND; everything from COMMAND on (after --) is the command's own, its
    -h/--help included. The end-of-run summary goes to stderr (the child's stdout may be piped).
    """
    from .supervisor import build_spec, supervise

    try:
        told = _notify_spec(notify, notify_on, on_end, on_end_timeout)
        rd = run_dir or _default_run_dir()
        # --- issue 20 (N): one node of several runs in <run-dir>/node-K (the shared dir is the job's) ---
        from .supervisor.nodes import node_role

        node = node_role(rd, list(ctx.args), node_rank=node_rank, nnodes=nnodes, explicit_dir=run_dir is not None)
        rd = node.run_dir if node else rd
        # --- end issue 20 (N) ---
        notifier = _notifier(told, rd)
        command = _command_for(rd, list(ctx.args))
        spec = build_spec(command, policy_arg=policy, run_dir=rd, checkpoint_dir=checkpoint_dir,
                          vram_limit=vram_limit, inject=inject, echo=not quiet, start_from_policy=start_from_policy,
                          on_recovery=notifier.recovery if notifier and told.on_recovery else None, verbose=verbose,
                          warm_spare=warm_spare, node=node, node_timeout_s=node_timeout)
        if dry_run:
            _print_dry_run(spec)
            return
        typer.echo(f"[oomguard] run dir: {spec.run_dir} · policy {spec.policy.name}", err=True)
        code = supervise(spec)
    except OomguardError as exc:
        _fail(exc)
    _print_summary(spec.run_dir)
    _tell_end(told, notifier, spec.run_dir, int(code))
    raise typer.Exit(int(code))


def _print_dry_run(spec) -> None:
    from .supervisor import build_command
    from .supervisor.spec import policy_knobs

    built = build_command(spec.command, spec.orders, spec.extra_flags)
    typer.echo(f"policy: {spec.policy.name} ({getattr(spec.policy, 'source', '')})")
    typer.echo(f"gpu: {spec.gpu.name if spec.gpu else 'none detected'}")
    typer.echo(f"policy knobs: {json.dumps(policy_knobs(spec.policy))}")
    typer.echo(f"knobs the command states as flags: {json.dumps(spec.requested)} "
               "(the rest is read in the child when its Trainer is built)")
    typer.echo(f"attempt 1 orders (set in the child): {json.dumps(spec.orders)}"
               + ("  [the policy's, --start-from-policy]" if spec.orders else ""))
    typer.echo(f"run dir: {spec.run_dir}   checkpoints: {spec.checkpoint_dir or 'where the Trainer saves'}")
    typer.echo(f"command: {shlex.join(built.argv)}")


def _notify_spec(url: Optional[str], on: str, on_end: Optional[str], timeout_s: float):
    """--notify/--notify-on/--on-end checked before anything starts (UsageError: exit 2)."""
    from .errors import UsageError
    from .supervisor.notify import NOTIFY_ON, NotifySpec, check_url

    if on not in NOTIFY_ON:
        raise UsageError(f"--notify-on {on!r}: expected one of {', '.join(NOTIFY_ON)}")
    if on != "end" and not url:
        raise UsageError(f"--notify-on {on} needs --notify URL")
    if timeout_s <= 0:
        raise UsageError(f"--on-end-timeout {timeout_s:g}: must be a positive number of seconds")
    if on_end is not None and not on_end.strip():
        raise UsageError("--on-end: empty command")
    return NotifySpec(url=check_url(url) if url else None, on_recovery=on == "recovery", on_end=on_end,
                      on_end_timeout_s=timeout_s)


def _notifier(told, run_dir: Path):
    from .supervisor.notify import Notifier

    return Notifier(told, str(run_dir)) if told.active else None


def _tell_end(told, notifier, run_dir: Path, code: int) -> None:
    """--notify / --on-end after the summary; neither changes the exit code."""
    if notifier is None:
        return
    from .report import report_document
    from .supervisor.notify import tell_end

    try:
        doc, why = report_document(run_dir), ""
    except OomguardError as exc:
        doc, why = None, str(exc)
    try:
        tell_end(told, str(run_dir), code, doc, why_no_doc=why, notifier=notifier)
    except Exception as exc:  # noqa: BLE001 - telling about the run never changes its outcome
        typer.echo(f"[oomguard] notification failed: {type(exc).__name__}: {exc}", err=True)


@app.command()
def report(run_dir: Optional[Path] = typer.Argument(None, help="A run directory."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema oomguard.report/1)."),
           json_schema: bool = typer.Option(False, "--json-schema",
                                            help="Print the JSON Schema (draft 2020-12) of --json's document; no DIR."),
           html: Optional[Path] = typer.Option(None, "--html", metavar="FILE",
                                               help="Also write one self-contained HTML page (plots, timeline, "
                                                    "requested → final) to FILE; '-': to stdout instead."),
           ) -> None:
    """Print the summary of a run (finished, interrupted or dead) to stdout."""
    from .report import render_text, report_document, summarize
    from .report.schema import REPORT_JSON_SCHEMA

    if json_schema:
        typer.echo(json.dumps(REPORT_JSON_SCHEMA, indent=2))
        return
    if run_dir is None:
        typer.echo("oomguard: error: pass a run directory: oomguard report DIR [--json] [--html FILE]", err=True)
        raise typer.Exit(int(ExitCode.USAGE))
    if not (run_dir / "run.json").exists():
        typer.echo(f"oomguard: error: {run_dir}: no run.json; pass a run directory", err=True)
        raise typer.Exit(int(ExitCode.USAGE))
    try:
        if html is not None and _write_html(run_dir, html):
            return
        text = json.dumps(report_document(run_dir), indent=2) if as_json else render_text(summarize(run_dir))
    except OomguardError as exc:
        _fail(exc)
    typer.echo(text)


def _write_html(run_dir: Path, out: Path) -> bool:
    """Write the HTML report; True when it went to stdout (``-``: nothing else is printed)."""
    from .report.html import render_run_html, write_html

    if str(out) == "-":
        typer.echo(render_run_html(run_dir), nl=False)
        return True
    try:
        written = write_html(run_dir, out)
    except OSError as exc:
        typer.echo(f"oomguard: error: --html {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(int(ExitCode.USAGE))
    typer.echo(f"oomguard: HTML report written to {written}", err=True)
    return False


def _require_training_stack(command: str) -> None:
    """``train`` / ``demo`` run the built-in recipe: without its stack, say which command installs it."""
    from .recipes import TRAIN_EXTRA, missing_training_stack

    missing = missing_training_stack()
    if missing:
        typer.echo(f"oomguard {command}: the built-in recipe needs the training stack, and this Python "
                   f"({sys.executable}) lacks {', '.join(missing)}; install it with: {TRAIN_EXTRA}", err=True)
        raise typer.Exit(int(ExitCode.USAGE))


@app.command(context_settings=PASSTHROUGH)
def train(ctx: typer.Context) -> None:
    """The built-in QLoRA SFT recipe (flags as in `python -m oomguard.recipes.sft --help`)."""
    _require_training_stack("train")
    from .recipes.sft import main as sft_main

    raise typer.Exit(sft_main(list(ctx.args)))


@app.command()
def demo(run_dir: Optional[Path] = typer.Option(None, help="Run directory (default: a new one under oomguard-runs/)."),
         max_steps: int = typer.Option(24, help="Optimizer steps of the demo run."),
         ) -> None:
    """The whole story on the embedded tiny model: OOM → rung → resume → NaN → rollback → done."""
    _require_training_stack("demo")
    from .demo import run_demo

    try:
        code = run_demo(run_dir or _default_run_dir(), max_steps=max_steps)
    except OomguardError as exc:
        _fail(exc)
    raise typer.Exit(int(code))


# --- issue 18 (T): plan and tune, from a short probe of the command (docs/TUNING.md) ----------------------
_PROBE_OPTS = {"batches": "Per-device batches to probe, e.g. 1,2,4,8 (default: 1, 2, 4 … dividing the "
               "effective batch, and the command's).", "steps": "Optimizer steps per configuration (the last timed)."}


def _probe(ctx: typer.Context, kind: str, gpu: Optional[str], vram: Optional[str], policy: Optional[str],
           run_dir: Optional[Path], batches: Optional[str], steps: int, inject: Optional[str], verbose: bool):
    from .errors import UsageError
    from .tune.record import ProbeSpec
    from .tune.session import default_run_dir, policy_for, run_probe_child

    if not 0 <= ctx.params.get("margin", 0.1) < 1:
        raise UsageError(f"--margin {ctx.params['margin']}: give the share of the card to keep free, in [0, 1)")
    try:
        spec = ProbeSpec(batches=tuple(int(b) for b in batches.split(",")) if batches else None, steps=steps)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    rd = run_dir or default_run_dir(kind)
    typer.echo(f"[oomguard] {kind}: probing the command (no training, no checkpoints); run dir {rd}", err=True)
    return run_probe_child(list(ctx.args), run_dir=rd, vram=vram, policy=policy_for(gpu, vram), policy_arg=policy,
                           probe=spec, inject=inject, echo=verbose)


@app.command(context_settings=RUN_ARGS, options_metavar="[OPTIONS] -- COMMAND...")
def plan(ctx: typer.Context,
         gpu: Optional[str] = typer.Option(None, help="Ask the ladder of the shipped policy for this card name, "
                                           "e.g. 'NVIDIA L4' (its size: --vram; default: this machine's card)."),
         vram: Optional[str] = typer.Option(None, help="Emulate a card of this size, e.g. 24GiB."),
         policy: Optional[str] = typer.Option(None, help="Policy whose ladder is asked (default: by GPU)."),
         margin: float = typer.Option(0.10, help="Share of the card a fitting configuration leaves free."),
         run_dir: Optional[Path] = typer.Option(None, help="Where the probe child writes (default: a new dir)."),
         batches: Optional[str] = typer.Option(None, help=_PROBE_OPTS["batches"]),
         steps: int = typer.Option(2, help=_PROBE_OPTS["steps"]),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the probe child's output."),
         inject: Optional[str] = typer.Option(None, hidden=True, help="Faults for the probe child (tests)."),
         ) -> None:
    """Will COMMAND fit, at its worst batch? The fastest configuration that does; the ladder's first move.

    Runs the command once under the supervisor with the probe on: its Trainer measures a few
    configurations instead of training (minutes), writes probe.json and exits; nothing is trained.
    """
    from .tune.choice import make_plan
    from .tune.render import render_plan

    try:
        done = _probe(ctx, "plan", gpu, vram, policy, run_dir, batches, steps, inject, verbose)
        answer = make_plan(done.record, done.policy, margin=margin)
    except OomguardError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({"plan": answer.to_dict(), "probe": str(done.run_dir / "probe.json"),
                               "policy": done.policy.name, "wall_s": round(done.wall_s, 1)}, indent=2))
    else:
        typer.echo(render_plan(answer) + f"\nprobe: {done.run_dir / 'probe.json'} ({done.wall_s:.0f} s, "
                   f"policy {done.policy.name})")


@app.command(context_settings=RUN_ARGS, options_metavar="[OPTIONS] -- COMMAND...")
def tune(ctx: typer.Context,
         gpu_class: str = typer.Option(..., help="Name of the policy to write, e.g. rtx-24gb (a shipped policy "
                                       "of that name gives the base and the match rule)."),
         output: Path = typer.Option(..., "-o", "--output", help="Policy file to write, e.g. policies/rtx-24gb.yaml."),
         vram: Optional[str] = typer.Option(None, help="Emulate the class's card size on this GPU, e.g. 24GiB."),
         margin: float = typer.Option(0.10, help="Share of the card the starting configuration leaves free."),
         run_dir: Optional[Path] = typer.Option(None, help="Where the probe child writes (default: a new dir)."),
         batches: Optional[str] = typer.Option(None, help=_PROBE_OPTS["batches"]),
         steps: int = typer.Option(2, help=_PROBE_OPTS["steps"]),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the probe child's output."),
         inject: Optional[str] = typer.Option(None, hidden=True, help="Faults for the probe child (tests)."),
         ) -> None:
    """Write a policy for a GPU class from a probe of COMMAND: starting knobs, ladder order, measurements."""
    from .policy import load_policy_arg, shipped_policy_paths
    from .protocol import redact_argv
    from .tune.choice import make_plan
    from .tune.render import render_plan
    from .tune.writer import tuned_policy_text, write_policy

    try:
        base = load_policy_arg(gpu_class if gpu_class in shipped_policy_paths() else "default")
        done = _probe(ctx, "tune", None, vram, base.source or None, run_dir, batches, steps, inject, verbose)
        answer = make_plan(done.record, base, margin=margin)
        text = tuned_policy_text(done.record, answer, base, name=gpu_class, margin=margin,
                                 command=shlex.join(redact_argv(list(ctx.args))))
        written = write_policy(output, text)
    except OomguardError as exc:
        _fail(exc)
    typer.echo(render_plan(answer))
    typer.echo(f"wrote {output} (policy {written.name}, valid) in {done.wall_s:.0f} s; probe: {done.run_dir}")
# --- end issue 18 (T) -------------------------------------------------------------------------------------


@policy_app.command("validate")
def policy_validate(files: List[Path] = typer.Argument(..., help="Policy files to check.")) -> None:
    """Check policy files; every problem is printed as FILE: key.path: problem."""
    from .errors import PolicyError
    from .policy import load_policy

    bad = 0
    for f in files:
        try:
            p = load_policy(f)
            typer.echo(f"{f}: ok ({p.name})")
        except PolicyError as exc:
            bad += 1
            typer.echo(str(exc), err=True)
    raise typer.Exit(int(ExitCode.USAGE) if bad else 0)


@policy_app.command("show")
def policy_show(gpu: Optional[str] = typer.Option(None, help="A GPU name, e.g. 'NVIDIA L4' (default: this machine's)."),
                vram: Optional[float] = typer.Option(None, help="Total memory in GiB (with --gpu, or to emulate "
                                                     "a card)."),
                policy: Optional[str] = typer.Option(None, help="Show this policy instead of matching."),
                ) -> None:
    """Which policy this machine (or a named card) resolves to, fully expanded."""
    import yaml

    from .policy import GpuInfo, load_all_shipped, load_policy_arg, select_policy
    from .supervisor.gpu import detect_gpu

    try:
        if policy:
            chosen, info = load_policy_arg(policy), None
        else:
            info = GpuInfo(name=gpu or "", total_gib=vram or 0.0, emulated=gpu is None and vram is not None) \
                if (gpu or vram) else detect_gpu()
            chosen = select_policy(load_all_shipped(), info)
    except OomguardError as exc:
        _fail(exc)
    size = f"({info.total_gib:g} GiB)" if info and info.total_gib else ""
    typer.echo(f"# gpu: {info.name if info else 'none'} {size}")
    typer.echo(f"# policy: {chosen.name} from {getattr(chosen, 'source', '?')}")
    typer.echo(yaml.safe_dump(json.loads(chosen.model_dump_json(exclude={'source'})), sort_keys=False))


@policy_app.command("schema")
def policy_schema(output: Optional[Path] = typer.Option(None, "-o", help="Write to a file instead of stdout.")) -> None:
    """JSON Schema of policy files (for editor completion)."""
    from .policy import policy_json_schema

    text = json.dumps(policy_json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
    else:
        typer.echo(text)


@policy_app.command("list")
def policy_list() -> None:
    """The shipped policies."""
    from .policy import shipped_policy_paths

    for name, path in sorted(shipped_policy_paths().items()):
        typer.echo(f"{name:<16} {path}")


def main() -> None:
    try:
        app()
    except OomguardError as exc:  # pragma: no cover - commands map their own
        typer.echo(f"oomguard: error: {exc}", err=True)
        sys.exit(int(exc.exit_code))


if __name__ == "__main__":
    main()
