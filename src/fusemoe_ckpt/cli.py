"""The `fusemoe-ckpt` command: reads options, calls the library, prints the result."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, NoReturn

import click

from .batch import SHARD_BY
from .errors import UsageError, interrupted_by, one_line, printable
from .interrupts import signals_as_interrupts
from .plan.cast import OUTPUT_DTYPES

if TYPE_CHECKING:
    from .batch.runner import EntryResult
    from .commands.verify import VerifyResult

# Each command imports what it runs when it runs: `--version`, or a small convert, loads no more than it needs.

# Exit statuses, as README.md and --help state them; an interruption exits 128 + the signal.
EXIT_FAILED = 1
# click's own status for a usage error: fix the command line or the manifest, rerunning will not help.
EXIT_USAGE = 2
# click >= 8.2 raises this for a bare `fusemoe-ckpt` and shows the help; older click exits itself.
_HELP_SHOWN = tuple(
    getattr(click.exceptions, name) for name in ["NoArgsIsHelpError"] if hasattr(click.exceptions, name)
)


class _Group(click.Group):
    """Renders every error in one place: one line on stderr, a traceback only with --debug; exit 2
    for a usage error (click's own, a bad option value, a bad manifest), 128 + the signal for an
    interruption (130 for ^C, 143 for SIGTERM), else 1."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        # The group's own options are parsed here, outside invoke().
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _HELP_SHOWN:
            raise  # no command at all: click shows the help
        except click.ClickException as e:
            _fail(_click_message(e), e.exit_code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, *_HELP_SHOWN):
            raise
        except click.ClickException as e:
            _fail(_click_message(e), e.exit_code)
        except KeyboardInterrupt as e:
            detail = str(e) or "nothing was written to the destination"
            sig = interrupted_by(e)
            by = "" if sig == signal.SIGINT else f" by {sig.name}"
            _fail(f"interrupted{by}; {detail}", 128 + sig)  # 130 for ^C, 143 for SIGTERM, as a shell reports
        except Exception as e:  # noqa: BLE001 - the one place errors become a message
            if ctx.obj and ctx.obj.get("debug"):
                import traceback

                traceback.print_exc()
            _fail(one_line(e), EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED)


def _click_message(error: click.ClickException) -> str:
    """click's message in one line, where click would print the usage and a hint on lines of their own."""
    message = error.format_message()
    context = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and context is not None:
        message = f"{message.rstrip('.')}; see '{context.command_path} --help'"
    return printable(message)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {printable(message)}", err=True)
    sys.exit(code)


def _print_version(ctx: click.Context, value: bool) -> None:
    """--version: read the version only when asked for it."""
    if not value or ctx.resilient_parsing:
        return
    from .version import package_version

    click.echo(f"fusemoe-ckpt, version {package_version()}")
    ctx.exit()


@click.group(cls=_Group)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _print_version(ctx, value),
    help="Show the version and exit.",
)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert per-expert MoE checkpoints into the fused layout transformers 5 holds in memory.

    An error is one line on stderr, starting with "Error: " (--debug adds the traceback).

    \b
    Exit status:
      0    done
      1    failed (bad input, a full disk, a failed check or batch entry)
      2    usage error: a bad option or argument, a bad manifest
      130  interrupted by ^C (SIGINT); convert --resume continues
      143  interrupted by SIGTERM (scancel, a time limit, preemption)
    """
    ctx.obj = {"debug": debug}
    # SIGTERM (scancel, a job's time limit, preemption, a pod's deletion) stops a command as ^C does.
    ctx.with_resource(signals_as_interrupts())


@cli.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--revision", help="Branch, tag or commit of a Hub repo id SRC [default: main].")
@click.option("--family", help="Family rule to use instead of the one config.json names.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists and is not empty.")
@click.option(
    "--resume", is_flag=True, help="Keep the shards an interrupted convert into DST completed; redo the rest."
)
@click.option("--workers", type=int, default=None, help="Copy threads [default: min(4, usable CPUs)].")
@click.option("--no-fsync", is_flag=True, help="Skip flushing files to disk before the final rename.")
@click.option(
    "--dtype",
    type=click.Choice(sorted(OUTPUT_DTYPES)),
    help="Cast floating tensors to this dtype while converting (loads torch).",
)
@click.option(
    "--dequantize",
    is_flag=True,
    help="Write quantized weights (FP8, compressed-tensors) dequantized by their scales (to --dtype, else "
    "config.json's dtype): for CPUs, and needed for compressed-tensors.",
)
@click.option("--verify", "then_verify", is_flag=True, help="Run verify on DST right after converting.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary.")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Then push DST to this Hub repo, with a model card.")
@click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
@click.option(
    "--stream",
    is_flag=True,
    help="Hub SRC: fetch source shards one at a time beside DST, not into the HF cache, each deleted once "
    "used; with --push-to-hub, upload each output shard as it completes and keep only the small files.",
)
def convert(
    src: str,
    dst: str,
    revision: str | None,
    family: str | None,
    max_shard_size: str,
    overwrite: bool,
    resume: bool,
    workers: int | None,
    no_fsync: bool,
    dtype: str | None,
    dequantize: bool,
    then_verify: bool,
    quiet: bool,
    push_to: str | None,
    private: bool,
    stream: bool,
) -> None:
    """Fuse the per-expert tensors of checkpoint SRC into a new checkpoint at DST.

    SRC is a local directory or, when no such path exists, a Hub repo id (org/name).

    \b
    Exit status:
      0    converted
      1    an error: bad input, a full disk, a failed --verify or push
      2    a usage error
      130  interrupted by ^C (SIGINT)       the completed shards are kept:
      143  interrupted by SIGTERM           rerun with --resume to continue
    """
    if private and push_to is None:
        raise click.UsageError("--private applies to the repo --push-to-hub creates; pass --push-to-hub REPO_ID")
    if stream and then_verify:
        raise click.UsageError("--verify reads the source, which --stream deletes as it goes; verify a local convert")
    if hasattr(signal, "SIGXFSZ"):
        # Past a file size limit (ulimit -f) the write must fail with EFBIG, not kill the process.
        # CPython's startup ignores SIGXFSZ already; an embedding interpreter may not.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from .commands.convert import convert as convert_checkpoint

    with _ProgressBar("convert", quiet=quiet) as bar:
        result = convert_checkpoint(
            src,
            dst,
            family=family,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            resume=resume,
            workers=workers,
            durable=not no_fsync,
            dtype=dtype,
            dequantize=dequantize,
            progress=bar.update,
            revision=revision,
            download_progress=not quiet,
            stream=stream,
            push_to=push_to if stream else None,
            private=(private or None) if stream else None,
        )
    for warning in result.warnings:
        click.echo(f"Warning: {printable(warning)}", err=True)
    if not quiet:
        if result.nothing_to_fuse and not result.already_complete:
            name = result.plan.family.name
            click.echo(f"Nothing to fuse: no per-expert tensors for family {name}; copied through.")
        click.echo(result.summary())
    if then_verify:
        from .commands.verify import verify as verify_checkpoint

        checked = verify_checkpoint(result.source_dir, result.destination, family=result.plan.family.name, dtype=dtype)
        _report(checked, quiet=quiet)
    if push_to is not None and not stream:
        _push(dst, push_to, private=private or None, revision=None, commit_message=None, quiet=quiet)


@cli.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--family", help="Family rule to plan SRC with [default: the one DST's index records].")
@click.option(
    "--dtype",
    type=click.Choice(sorted(OUTPUT_DTYPES)),
    help="The --dtype DST was converted with [default: the one DST's index records].",
)
@click.option(
    "--load-check",
    is_flag=True,
    help="Also build the model from DST's config on the meta device and check keys and shapes (needs transformers).",
)
def verify(src: str, dst: str, family: str | None, dtype: str | None, load_check: bool) -> None:
    """Prove DST is SRC converted: keys, dtypes, shapes, headers and every byte."""
    from .commands.verify import verify as verify_checkpoint

    _report(verify_checkpoint(src, dst, family=family, dtype=dtype, load_check=load_check))


def _report(result: VerifyResult, *, quiet: bool = False) -> None:
    """One line per mismatching key, then the summary: on stdout when DST passes, as the error otherwise."""
    for line in result.lines():
        click.echo(printable(line))
    result.raise_if_failed()
    if not quiet:
        click.echo(result.summary())


@cli.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--family", help="Family rule to use instead of the one config.json names.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists and is not empty.")
@click.option("--workers", type=int, default=None, help="Copy threads [default: min(4, usable CPUs)].")
@click.option("--no-fsync", is_flag=True, help="Skip flushing files to disk before the final rename.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def unfuse(
    src: str,
    dst: str,
    family: str | None,
    max_shard_size: str,
    overwrite: bool,
    workers: int | None,
    no_fsync: bool,
    quiet: bool,
) -> None:
    """Split the fused experts of SRC back into per-expert tensors at DST."""
    from .commands.unfuse import unfuse as unfuse_checkpoint

    with _ProgressBar("unfuse", quiet=quiet) as bar:
        result = unfuse_checkpoint(
            src,
            dst,
            family=family,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            workers=workers,
            durable=not no_fsync,
            progress=bar.update,
        )
    for warning in result.warnings:
        click.echo(f"Warning: {printable(warning)}", err=True)
    if not quiet:
        click.echo(result.summary())


@cli.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema in README.md).")
@click.option("--family", help="Family rule to use instead of the one config.json names.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--dtype", type=click.Choice(sorted(OUTPUT_DTYPES)), help="Plan a cast to this dtype.")
@click.option("--workers", type=int, default=None, help="Workers convert would use [default: min(4, usable CPUs)].")
@click.option("--dequantize", is_flag=True, help="Plan quantized weights dequantized, as convert --dequantize does.")
def inspect(
    src: str,
    as_json: bool,
    family: str | None,
    max_shard_size: str,
    dtype: str | None,
    workers: int | None,
    dequantize: bool,
) -> None:
    """Show what convert would do to SRC, from its headers alone."""
    import json

    from .commands.inspect import inspect_checkpoint

    report = inspect_checkpoint(
        src, family=family, max_shard_size=max_shard_size, dtype=dtype, workers=workers, dequantize=dequantize
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo("\n".join(report.lines()))


@cli.command()
@click.argument("dst", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to, created if missing [default: main].")
@click.option("--commit-message", help="Message of the commit [default: names the source and the tool].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary.")
def push(dst: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None, quiet: bool) -> None:
    """Upload converted checkpoint DST to Hub repo REPO_ID, with a model card."""
    _push(dst, repo_id, private=private or None, revision=revision, commit_message=commit_message, quiet=quiet)


def _push(
    dst: str, repo_id: str, *, private: bool | None, revision: str | None, commit_message: str | None, quiet: bool
) -> None:
    from .hub.push import push_to_hub  # huggingface_hub is imported only when the Hub is used

    result = push_to_hub(
        dst, repo_id, private=private, revision=revision, commit_message=commit_message, progress=not quiet
    )
    if not quiet:
        click.echo(result.summary())


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Entries run at once.")
@click.option(
    "--shard",
    metavar="I/N",
    help="Run only shard I of N [default: from SLURM_ARRAY_TASK_ID/_COUNT, or JOB_COMPLETION_INDEX and "
    "FUSEMOE_SHARD_COUNT; else all].",
)
@click.option(
    "--shard-by",
    type=click.Choice(SHARD_BY),
    default="dst",
    show_default=True,
    help="dst: a hash of dst, stable when the manifest changes; index: position in the manifest, exactly balanced.",
)
@click.option("--report", type=click.Path(dir_okay=False), help="Also write the report as JSON to this file.")
@click.option(
    "--verify", "check_bytes", is_flag=True, help="Compare every byte: after each convert, and before each skip."
)
@click.option("--dry-run", is_flag=True, help="List the entries this shard would run, and run nothing.")
def batch(
    manifest: str, jobs: int, shard: str | None, shard_by: str, report: str | None, check_bytes: bool, dry_run: bool
) -> None:
    """Convert every entry of MANIFEST (JSON Lines), each in its own process.

    Finished entries are skipped and interrupted ones resumed, so rerunning does only what is left.
    A table of the entries (status, seconds, size, error) ends the output.

    \b
    Exit status:
      0    every entry converted or skipped
      1    an entry failed or was interrupted: worth running again
      2    a usage or manifest error: nothing ran; fix it, rerunning will not help
      130  interrupted by ^C (SIGINT)       running entries keep their completed
      143  interrupted by SIGTERM           shards; run again to resume them
           (scancel, a time limit, preemption, a pod's deletion)
    """
    from .batch.cluster import resolve_shard
    from .batch.runner import BatchInterrupted, plan_batch, run_batch

    chosen = resolve_shard(shard)
    if dry_run:
        entries, selected = plan_batch(manifest, shard=chosen, shard_by=shard_by)
        for entry in selected:
            click.echo(f"{entry.line:>5}  {entry.src}{' (Hub)' if entry.hub else ''} -> {entry.dst}")
        click.echo(f"{len(selected)} of {len(entries)} entries in shard {chosen} ({chosen.origin}, by {shard_by})")
        return

    def finished(outcome: EntryResult) -> None:
        detail = f": {outcome.error}" if outcome.error else ""
        click.echo(f"{outcome.status} {outcome.entry.dst_text} ({outcome.seconds:.1f} s){detail}", err=True)

    try:
        result = run_batch(
            manifest,
            jobs=jobs,
            shard=chosen,
            shard_by=shard_by,
            check_bytes=check_bytes,
            report=report,
            on_result=finished,
        )
    except BatchInterrupted as e:
        click.echo("\n".join(e.result.table()))  # what was done, interrupted and not started
        raise
    click.echo("\n".join(result.table()))
    result.raise_if_failed()


@cli.command()
def families() -> None:
    """List the family rules with their model types and per-expert key patterns."""
    from .rules.families import FAMILIES

    for family in FAMILIES:
        click.echo(f"{family.name}")
        click.echo(f"  model types: {', '.join(family.model_types)}")
        for converter in family.converters:
            operation = type(converter).__name__ + _under(converter)
            targets = getattr(converter, "targets", None) or (converter.target,)
            click.echo(f"  {operation}: {' + '.join(converter.sources)} -> {' + '.join(targets)}")
        for rename in family.renames:
            targets = getattr(rename, "targets", None) or (rename.target,)
            kind = ("group rename" if len(targets) > 1 else "rename") + _under(rename)
            click.echo(f"  {kind} {' | '.join(rename.sources)} -> {' | '.join(targets)}")


def _under(transform) -> str:
    """Where a scoped transform applies: ` (under model.vision_tower.)`, or nothing."""
    scope = getattr(transform, "scope", None)
    if scope is None:
        return ""
    return f" (under {'.'.join(p for p in (scope.base, scope.prefix) if p)}.)"


@cli.command()
@click.argument("model_type", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON (schema in README.md).")
@click.option("--evidence", is_flag=True, help="Show how each row is known: the source read or the run.")
def consumers(model_type: str | None, as_json: bool, evidence: bool) -> None:
    """Which engines load the fused layout of MODEL_TYPE, or of all recorded.

    MODEL_TYPE is config.json's model_type (qwen3_moe, mixtral, deepseek_v3, ...).
    """
    import json

    from .commands.consumers import consumers as consumers_table

    report = consumers_table(model_type)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo("\n".join(report.lines(evidence=evidence)))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
def example(directory: str) -> None:
    """Write a tiny per-expert Qwen3-MoE checkpoint to DIRECTORY, to try convert on."""
    from .commands.example import write_example

    root = write_example(directory)
    click.echo(f"Wrote a tiny qwen3_moe checkpoint (per-expert layout) to {root}")


class _ProgressBar:
    """A tqdm bar in bytes, created on the first update, when the total is known; shown only on a
    terminal and without --quiet. A context manager that closes the bar on the way out."""

    def __init__(self, desc: str, *, quiet: bool) -> None:
        self.desc = desc
        self.enabled = not quiet and sys.stderr.isatty()
        self._bar = None
        self._lock = threading.Lock()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=self.desc)
            self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def main() -> None:
    cli(prog_name="fusemoe-ckpt")
