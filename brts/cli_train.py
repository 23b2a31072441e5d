"""`brts train`: checks (one line on any problem), then the ranks under torchrun (``trainer/launch.py``);
`brts train export`."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_file", default=None,
              help="YAML training config: a path or a shipped name (tiny_cpu, paper_brts_n4, ...).")
@click.option("--nproc", type=int, default=None, help="Ranks to launch on this node [the config's launch.nproc].")
@click.option("--resume", type=click.Path(), help="Run dir, checkpoint dir or RUN/checkpoints/latest to continue from.")
@click.option("--base-model", type=click.Path(file_okay=False),
              help="With `export`: the student's original folder (config, tokenizer).")
@click.argument("args", nargs=-1)
def train(config_file: str | None, nproc: int | None, resume: str | None, base_model: str | None,
          args: tuple[str, ...]) -> None:
    """Train a student with BRTS (or the OPD baseline) against a running `brts serve`. KEY=VALUE override settings.

    `--resume RUN_DIR` continues a run from its latest checkpoint with its saved config (overrides may change
    max_steps, save_every, server, ...).

    `brts train export CKPT OUT --base-model DIR` writes a checkpoint's student in Hugging Face format.
    """
    if args and args[0] == "export":
        if len(args) != 3 or not base_model:
            click.echo("brts train export: usage: brts train export CKPT OUT --base-model STUDENT_DIR", err=True)
            sys.exit(2)
        from brts.trainer.export import export_hf

        try:
            export_hf(args[1], base_model, args[2])
        except (ValueError, OSError, RuntimeError) as exc:
            click.echo(f"brts train export: {exc}", err=True)
            sys.exit(1)
        click.echo(f"brts train export: wrote {args[2]}")
        return
    from brts.trainer.launch import launch

    overrides = list(args) + ([f"launch.nproc={nproc}"] if nproc is not None else [])
    sys.exit(launch(config_file, overrides, resume))
