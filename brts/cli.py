"""The `brts` command line: one click group that parses options and delegates; no logic lives here.

A subcommand whose issue has not landed yet says so in one line and exits 2, so scripts can tell "not yet"
from "failed" (1) and "bad usage" (click's own 2 with a usage message).
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

NOT_YET_EXIT = 2


def _not_yet(command: str, issue: int, what: str) -> NoReturn:
    click.echo(f"brts {command}: {what} is not available yet (it lands with issue #{issue}).", err=True)
    sys.exit(NOT_YET_EXIT)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="brts", prog_name="brts")
def main() -> None:
    """On-policy distillation with Best-of-N teacher rollout selection (BRTS).

    A shared, cached teacher server (serve, prewarm, cache) and a distributed student trainer
    (train, eval, report). `brts demo` runs the whole pipeline on a CPU in minutes.
    """


from brts.cli_serve import prewarm, serve  # noqa: E402 - commands of their own module, registered here

main.add_command(serve)
main.add_command(prewarm)


from brts.cli_train import train  # noqa: E402 - a command of its own module, registered here

main.add_command(train)


from brts.cli_eval import eval_  # noqa: E402 - a command of its own module, registered here

main.add_command(eval_)


from brts.cli_cache import cache  # noqa: E402 - a group of its own module, registered here

main.add_command(cache)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to write plots [RUN_DIR/report].")
def report(run_dirs: tuple[str, ...], out: str | None) -> None:
    """Plots and a Markdown summary of one or several runs, side by side."""
    from brts.trainer.report import write_report

    try:
        files = write_report(run_dirs, out)
    except (FileNotFoundError, ValueError) as exc:
        click.echo(f"brts report: {exc}", err=True)
        sys.exit(1)
    click.echo(f"brts report: wrote {', '.join(str(f) for f in files)}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="brts-demo", show_default=True)
@click.option("--seeds", type=int, default=3, show_default=True)
def demo(out: str, seeds: int) -> None:
    """BRTS vs OPD end to end on a CPU in minutes: serve, prewarm, train, eval, report."""
    _not_yet("demo", 10, "the demo")


if __name__ == "__main__":  # pragma: no cover
    main()
