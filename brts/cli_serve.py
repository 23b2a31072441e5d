"""`brts serve` and `brts prewarm`: parse, build the config, delegate (brts.server.app, brts.server.prewarm)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click


def _die(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of server settings.")
@click.option("--engine", type=click.Choice(["hf", "vllm", "sglang"]), default=None, help="Generation engine [hf].")
@click.option("--model", type=click.Path(), help="Teacher model directory (HF format).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="LMDB cache directory [brts-cache].")
@click.option("--host", default=None,
              help="Bind address [127.0.0.1]; any other needs --tls-cert, --tls-key, --token-file.")
@click.option("--port", type=int, default=None, help="Port [50051]; 0 picks a free one.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate for TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key for TLS.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token clients must send.")
@click.option("--max-logprob-k", type=int, default=None,
              help="Largest teacher top-K served per position [16, at most 64].")
@click.option("--device", default=None, help="Device for the hf engine and the scorer: auto, cpu, cuda, cuda:N.")
@click.option("--dtype", default=None, help="Model dtype: auto, float32, bfloat16, float16.")
@click.option("--mem-fraction", type=float, default=None,
              help="GPU memory share of vllm/sglang, the rest is the scorer's.")
@click.option("--tensor-parallel", type=int, default=None, help="Tensor-parallel size passed to vllm/sglang.")
@click.option("--data-parallel", type=int, default=None, help="Data-parallel size passed to sglang.")
@click.option("--sglang-url", default=None, help="Use a running sglang.launch_server over HTTP instead of in-process.")
@click.option("--vllm-url", default=None,
              help="Use a running `vllm serve` (its /v1/completions) instead of in-process; with --engine vllm and "
                   "--model DIR (the folder still gives the tokenizer, the scorer and the probe). Start it with "
                   "--max-logprobs 64 (docs/gpu-guide.md).")
@click.option("--scorer-devices", default=None,
              help="Devices of the exact scorer behind Score, comma-separated (cuda:1,cuda:2; cpu,cpu for tests): one "
                   "replica per entry, each fed whole micro-batches; EACH IS ONE MORE COPY OF THE TEACHER'S WEIGHTS "
                   "[one scorer on --device].")
@click.option("--teacher-logprobs", type=click.Choice(["auto", "engine", "scorer"]), default=None,
              help="Where candidates' top-K come from: the engine's own numbers, the exact scorer's second forward, "
                   "or auto (engine when the start-up probe finds it agrees) [auto].")
@click.option("--teacher-fingerprint", default=None, help="Name the teacher instead of hashing its files.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port [0 = off].")
@click.option("--metrics-host", default=None,
              help="Metrics bind address [127.0.0.1]; any other serves HTTPS with --tls-cert/--tls-key.")
@click.argument("overrides", nargs=-1)
def serve(config_file: str | None, overrides: tuple[str, ...], teacher_fingerprint: str | None, **options: Any) -> None:
    """Run the teacher server (gRPC TeacherService) until SIGTERM/SIGINT. Extra KEY=VALUE override settings,
    e.g. sampling.max_new_tokens=4096 batch_window_ms=20."""
    from brts.shared.config import ConfigError, ServerConfig, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    values = {k: v for k, v in options.items() if v is not None}
    try:
        config = load_config(ServerConfig, config_file, overrides, **values)
    except ConfigError as exc:
        _die(f"brts serve: {exc}")
    from brts.server.app import serve as run_server

    try:
        run_server(config, teacher_fingerprint, echo=lambda line: click.echo(line, err=False))
    except (ValueError, ImportError, OSError, RuntimeError) as exc:
        _die(f"brts serve: {exc}")


def _report_consistency(r: dict[str, Any]) -> None:
    """--check's teacher checks: the agreement line, one cached candidate against Score; exit 1 beyond tolerance."""
    agreement, gap = r["agreement"], r["cached_vs_score"]
    if agreement is not None:
        click.echo(f"brts prewarm --check: {agreement.line()}")
    if gap is not None:
        click.echo(f"brts prewarm --check: {r['cached']['line']}")
    if agreement is not None and not agreement.ok:
        _die("brts prewarm --check: the teacher disagrees with itself beyond teacher_agreement_tolerance; serve it "
             "in float32, or set the tolerance to accept it")
    if gap is not None and gap > r["tolerance"]:
        _die(f"brts prewarm --check: the cached candidate differs from the live teacher by {gap:.2e} nats (tolerance "
             f"{r['tolerance']:.1e}): the cache does not match the teacher serving now (`brts cache verify --live`)")


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of prewarm settings.")
@click.option("--server", default=None, help="HOST:PORT of a running `brts serve` [127.0.0.1:50051].")
@click.option("--dataset", default=None, help="dapo (default), an eval set name, or a JSONL/parquet path.")
@click.option("--n-tier1", type=int, default=None, help="Tier-1 samples per prompt [4].")
@click.option("--n-tier2", type=int, default=None, help="Hinted samples when all Tier-1 fail [1].")
@click.option("--limit", type=int, default=None, help="Only the first N prompts.")
@click.option("--concurrency", type=int, default=None, help="Calls in flight [4].")
@click.option("--check", is_flag=True, help="Ask for a sample with generation disabled and report the hit rate.")
@click.option("--tokenizer", default=None, help="Tokenizer (bundled name or directory) for the prompt spec.")
@click.option("--chat-template", default=None, help="Chat template: bundled name, tokenizer_config.json or literal.")
@click.option("--max-prompt-len", type=int, default=None, help="Prompts longer than this are skipped.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), help="Bearer token for the server.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), help="PEM CA/cert to trust (enables TLS).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--route", default=None,
              help="With --config TRAIN.yaml (a training config): prewarm only the prompts routed to this teacher, "
                   "at its address, with its sampling settings (they enter the pool keys).")
@click.argument("overrides", nargs=-1)
def prewarm(config_file: str | None, overrides: tuple[str, ...], check: bool, tokenizer: str | None,
            chat_template: str | None, max_prompt_len: int | None, token_file: str | None, tls_ca: str | None,
            no_progress: bool, route: str | None, **options: Any) -> None:
    """Fill the server's cache over a dataset, as a client of the running server. KEY=VALUE overrides, e.g.
    prompt.instruction_suffix='' sampling.temperature=0.7 (sampling left unset takes the server's defaults)."""
    from brts.server import prewarm as pw
    from brts.shared.client import Sampling, TeacherClient, TeacherUnavailableError
    from brts.shared.config import ConfigError, PrewarmConfig, load_config, parse_overrides

    values: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    prompt = {k: v for k, v in (("tokenizer", tokenizer), ("chat_template", chat_template),
                                ("max_prompt_len", max_prompt_len)) if v is not None}
    if prompt:
        values["prompt"] = prompt
    try:
        if route is not None:
            passes, sampling, token_file, tls_ca = _route_plan(config_file, route, overrides, values,
                                                               (token_file, tls_ca))
        else:
            passes = [(load_config(PrewarmConfig, config_file, overrides, **values), None, "")]
            explicit = parse_overrides(overrides).get("sampling", {})
            sampling = Sampling(**{k: getattr(passes[0][0].sampling, k) for k in explicit}) if explicit else None
    except (ConfigError, ValueError, OSError) as exc:
        _die(f"brts prewarm: {exc}")
    config, problems, _ = passes[0]
    token = open(token_file).read().strip() if token_file else None
    try:
        client = TeacherClient(config.server, token=token, tls_ca=tls_ca)
    except (TeacherUnavailableError, RuntimeError) as exc:
        _die(f"brts prewarm: {exc}")
    with client:
        try:
            if check:
                r = pw.check(config, client, sampling, problems)
                click.echo(f"brts prewarm --check: {r['complete']}/{r['asked']} sampled prompts fully cached "
                           f"({r['hit_rate']:.0%}), {r['partial']} partly")
                if r["hit_rate"] == 0:
                    click.echo("  nothing hit: prewarm has not run for this dataset/teacher, or the prompt spec or "
                               "sampling differs from what was prewarmed (tokenizer, chat template, suffix)", err=True)
                _report_consistency(r)
                return
            summaries = [(label, pw.prewarm(cfg, client, sampling, probs, progress=not no_progress))
                         for cfg, probs, label in passes]
        except ValueError as exc:
            _die(f"brts prewarm: {exc}")
    for label, summary in summaries:
        for line in summary.lines():
            click.echo(f"brts prewarm: {label}{line}")


def _route_plan(config_file: str | None, route: str, overrides: tuple[str, ...], values: dict[str, Any],
                reach: tuple[str | None, str | None]) -> tuple[list[tuple[Any, Any, str]], Any, str | None, str | None]:
    """``--route NAME``: (the passes as (PrewarmConfig, problems, label), Sampling, token file, TLS CA) from a
    training config, built exactly as the trainer asks (same window, Tier 2, top-K, prompt spec and the teacher's
    sampling), so that every prompt prewarmed here is a cache hit for the run. The first pass is the prompts routed
    to NAME; when NAME is in ``candidate_teachers``, a second pass fills its Tier-1 windows of every other prompt
    (what a cross-teacher pool asks it for: no Tier 2, which only the routed teacher draws)."""
    from dataclasses import replace

    from brts.shared.config import ConfigError, PrewarmConfig
    from brts.shared.data import load_dataset
    from brts.trainer.config import load_train_config
    from brts.trainer.routing import problems_of, teacher_of
    from brts.trainer.teacher_link import sampling_of

    if config_file is None:
        raise ConfigError("--route: give the training config with --config TRAIN.yaml")
    clash = sorted(k for k in values if k in ("server", "dataset", "n_tier1", "n_tier2", "prompt"))
    if clash or any(reach):
        given = clash + [n for n, v in zip(("token_file", "tls_ca"), reach) if v]
        raise ConfigError(f"--route: {', '.join(given)} come from the training config's teacher entry; "
                          "leave them out (override the training config's settings as KEY=VALUE instead)")
    train, _ = load_train_config(config_file, overrides)
    entries = train.teacher_entries()
    if route not in entries:
        raise ConfigError(f"--route: no teacher named {route!r} in {config_file}; teachers: {', '.join(entries)}")
    entry = entries[route]
    every = load_dataset(train.dataset, train.teacher_route)
    problems = problems_of(every, entries, route)
    others = [p for p in every if teacher_of(p.route, entries) != route] if route in train.candidate_teachers else []
    if not problems and not others:
        raise ValueError(f"--route {route}: no prompt of {train.dataset} is routed to this teacher")
    config = PrewarmConfig(server=entry.address, dataset=train.dataset, n_tier1=train.n_candidates,
                           n_tier2=train.n_tier2, logprob_k=train.logprob_k, prompt=train.prompt,
                           sampling=train.teacher_sampling(route),
                           teacher_agreement_tolerance=train.teacher_agreement_tolerance,
                           **{k: v for k, v in values.items() if k in ("limit", "concurrency", "prompts_per_call")})
    passes = [(config, problems, "")] if problems else []
    if others:
        passes.append((replace(config, n_tier2=0), others, "the other teachers' prompts, Tier 1 for the pool: "))
    return passes, sampling_of(config.sampling), entry.token_file, entry.tls_ca
