"""The `fusemoe-ckpt` command: reads options, calls the library, prints the result."""

from __future__ import annotations

import sys
import threading
import traceback

import click

from . import __version__
from .converter import convert as convert_checkpoint
from .errors import FusemoeError
from .example import write_example
from .families import FAMILIES, REFUSED


class _Group(click.Group):
    """Renders every error in one place: one line on stderr, exit code 1; a traceback with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("Error: interrupted; nothing was written to the destination", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the one place errors become a message
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            message = str(e) if isinstance(e, FusemoeError) else f"{type(e).__name__}: {e}"
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="fusemoe-ckpt")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert per-expert MoE checkpoints into the fused layout transformers 5 holds in memory."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--revision", help="Branch, tag or commit of a Hub repo id SRC [default: main].")
@click.option("--family", help="Family rule to use instead of the one config.json names.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists and is not empty.")
@click.option("--workers", type=int, default=None, help="Shards written at once [default: min(4, CPUs)].")
@click.option("--no-fsync", is_flag=True, help="Skip flushing files to disk before the final rename.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary.")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Then push DST to this Hub repo, with a model card.")
@click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
def convert(
    src: str,
    dst: str,
    revision: str | None,
    family: str | None,
    max_shard_size: str,
    overwrite: bool,
    workers: int | None,
    no_fsync: bool,
    quiet: bool,
    push_to: str | None,
    private: bool,
) -> None:
    """Fuse the per-expert tensors of checkpoint SRC into a new checkpoint at DST.

    SRC is a local directory or, when no such path exists, a Hub repo id (org/name).
    """
    if private and push_to is None:
        raise click.UsageError("--private applies to the repo --push-to-hub creates; pass --push-to-hub REPO_ID")
    bar = _ProgressBar(enabled=not quiet and sys.stderr.isatty())
    try:
        result = convert_checkpoint(
            src,
            dst,
            family=family,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            workers=workers,
            durable=not no_fsync,
            progress=bar.update,
            revision=revision,
            download_progress=not quiet,
        )
    finally:
        bar.close()
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if not quiet:
        if result.nothing_to_fuse:
            name = result.plan.family.name
            click.echo(f"Nothing to fuse: no per-expert tensors for family {name}; copied through.")
        click.echo(result.summary())
    if push_to is not None:
        _push(dst, push_to, private=private or None, revision=None, commit_message=None, quiet=quiet)


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
    from .hub import push_to_hub  # huggingface_hub is imported only when the Hub is used

    result = push_to_hub(
        dst, repo_id, private=private, revision=revision, commit_message=commit_message, progress=not quiet
    )
    if not quiet:
        click.echo(result.summary())


@cli.command()
def families() -> None:
    """List the family rules with their model types and per-expert key patterns."""
    for family in FAMILIES:
        click.echo(f"{family.name}")
        click.echo(f"  model types: {', '.join(family.model_types)}")
        for converter in family.converters:
            operation = type(converter).__name__
            click.echo(f"  {operation}: {' + '.join(converter.sources)} -> {converter.target}")
        for rename in family.renames:
            click.echo(f"  rename {' | '.join(rename.sources)} -> {rename.target}")
    click.echo("refused (the rule needs an operation fusemoe-ckpt does not do)")
    for model_type, reason in sorted(REFUSED.items()):
        click.echo(f"  {model_type}: {reason}")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
def example(directory: str) -> None:
    """Write a tiny per-expert Qwen3-MoE checkpoint to DIRECTORY, to try convert on."""
    root = write_example(directory)
    click.echo(f"Wrote a tiny qwen3_moe checkpoint (per-expert layout) to {root}")


class _ProgressBar:
    """A tqdm bar in bytes, created on the first update, when the total is known."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._lock = threading.Lock()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert")
            self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def main() -> None:
    cli(prog_name="fusemoe-ckpt")
