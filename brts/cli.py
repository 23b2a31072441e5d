"""The `brts` command line: one click group that parses options and delegates; no logic lives here.

Exit codes: 0 done, 1 failed (one line saying what to fix), 2 bad usage (click's usage message).
"""

from __future__ import annotations

import sys

import click


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
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for everything the demo writes (models, cache, runs, report); reused when run again. "
                   "[default: brts-demo, or brts-demo-teachers2 with --teachers 2]")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Training seeds per method.")
@click.option("--retrain", is_flag=True, help="Train the runs again (the fits, the cache and the evaluations stay).")
@click.option("--tails", is_flag=True,
              help="Train with a tail bucket in both losses (sc_tail, tc_tail), to compare with a demo without; "
                   "use another --out (copying models/, cache/ and eval-before/ over reuses them).")
@click.option("--task", default="default", show_default=True,
              help="A named toy task of brts/demo_tasks.py (an unknown name lists them); each wants its own --out.")
@click.option("--teachers", type=click.IntRange(1, 2), default=1, show_default=True,
              help="2: add a second toy teacher (another strength and answer style) and a third method, BRTS choosing "
                   "among both teachers' candidates (candidate_teachers); the table shows each teacher's share.")
def demo(out: str | None, seeds: int, retrain: bool, tails: bool, task: str, teachers: int) -> None:
    """BRTS vs OPD end to end on a CPU in minutes: serve, prewarm, train, eval, report.

    Fits a toy teacher and a weaker toy student, serves the teacher on loopback with an LMDB cache, prewarms it,
    trains BRTS and the student-only OPD baseline with the same budget over SEEDS seeds, evaluates before and
    after on the training problems and on held-out ones, writes plots and prints the table. Interrupted, it resumes
    where it stopped when run again. --teachers 2 adds a second toy teacher and BRTS over both teachers' candidates.
    """
    from dataclasses import replace

    from brts.demo import DemoError, run_demo
    from brts.demo_tasks import task_settings

    out = out or ("brts-demo" if teachers == 1 else f"brts-demo-teachers{teachers}")
    try:
        settings = replace(task_settings(task, tails=tails), teachers=teachers)
    except ValueError as exc:
        click.echo(f"brts demo: {exc}", err=True)
        sys.exit(2)
    try:
        run_demo(out, seeds=seeds, retrain=retrain, settings=settings, say=click.echo)
    except DemoError as exc:
        click.echo(f"brts demo: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"brts demo: interrupted; run it again with --out {out} to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
