"""`brts eval`: parse options into an EvalConfig (one line on a bad value) and run ``brts.trainer.evaluate``."""

from __future__ import annotations

import sys

import click


@click.command(name="eval")
@click.option("--model", required=True, type=click.Path(), help="Model directory (e.g. `brts train export` output).")
@click.option("--benchmarks", default="aime24,aime25,amc23", show_default=True,
              help="Comma-separated bundled sets (aime24, aime25, amc23); empty with --dataset for a file only.")
@click.option("--dataset", type=click.Path(dir_okay=False), multiple=True,
              help="Any JSONL/parquet with problem and answer columns, named by its file stem; may be repeated.")
@click.option("--n", type=int, default=4, show_default=True, help="Samples per problem.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--max-new-tokens", type=int, default=31744, show_default=True)
@click.option("--engine", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first L problems of each set.")
@click.option("--out", type=click.Path(file_okay=False), default="eval-out", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (per-sample seeds derive from it).")
@click.option("--tokenizer", default=None, help="Prompt tokenizer (bundled name or directory) [the model's folder].")
@click.option("--chat-template", default=None, help="Chat template: bundled name, tokenizer_config.json or literal.")
@click.option("--instruction-suffix", default=None, help="Text after the problem [the boxed-answer instruction].")
@click.option("--device", default="auto", show_default=True, help="hf engine: cpu, cuda, cuda:1, auto.")
@click.option("--dtype", default="auto", show_default=True, help="float32, bfloat16 or auto.")
def eval_(model: str, benchmarks: str, dataset: tuple[str, ...], n: int, temperature: float, top_p: float,
          max_new_tokens: int, engine: str, limit: int | None, out: str, seed: int, tokenizer: str | None,
          chat_template: str | None, instruction_suffix: str | None, device: str, dtype: str) -> None:
    """Evaluate a model on AIME 2024/2025 and AMC 2023: mean@n, pass@n, majority@n and the paper's bootstraps."""
    from brts.shared.config import ConfigError, EvalConfig, from_dict

    prompt = {k: v for k, v in (("tokenizer", tokenizer or model), ("chat_template", chat_template),
                                ("instruction_suffix", instruction_suffix)) if v is not None}
    data = {"model": model, "benchmarks": [b for b in benchmarks.split(",") if b.strip()], "dataset": list(dataset),
            "n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "engine": engine,
            "limit": limit, "out": out, "seed": seed, "prompt": prompt}
    try:
        config = from_dict(EvalConfig, data)
    except ConfigError as exc:
        click.echo(f"brts eval: {exc}", err=True)
        sys.exit(1)
    from brts.trainer.evaluate import evaluate, format_table

    try:
        results = evaluate(config, device=device, dtype=dtype)
    except (ValueError, OSError) as exc:
        click.echo(f"brts eval: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(1)
    click.echo(f"brts eval: {config.model}, n={config.n}, T={config.temperature}, top_p={config.top_p}; prompt suffix "
               f"{config.prompt.instruction_suffix!r}")
    click.echo(format_table(results, config.n))
    click.echo(f"brts eval: wrote {out}/summary.json and {out}/samples.jsonl")
