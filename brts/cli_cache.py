"""`brts cache ...`: housekeeping over a cache directory; parsing and printing only (logic: brts.server.cache.admin)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def _fail(exc: Exception) -> None:
    click.echo(f"brts cache: {exc}", err=True)
    sys.exit(1)


def _emit(result: Any, as_json: bool, lines: list[str]) -> None:
    click.echo(json.dumps(result, indent=2, default=str) if as_json else "\n".join(lines))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _sources(by_source: dict[str, dict[str, int]]) -> str:
    """``admin.stats``'s split of the entries with a top-K by where their numbers came from, as one phrase."""
    return ", ".join(f"{source} {row['entries']} entries ({row['tokens']} tokens)"
                     for source, row in by_source.items()) or "none"


_dir = click.argument("directory", type=click.Path(file_okay=False, exists=True))
_json = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group("cache")
def cache() -> None:
    """Inspect and maintain a candidate cache directory (also while a server uses it)."""


@cache.command()
@_dir
@_json
def stats(directory: str, as_json: bool) -> None:
    """Entries, pools, size, bytes per token and tier composition, per teacher fingerprint; entries with a top-K by
    the source of their numbers (scorer, engine-decode, engine-prefill)."""
    from brts.server.cache import admin

    try:
        s = admin.stats(directory)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    lines = [f"{s['path']}: {s['pools']} pools, {s['entries']} entries, {s['tokens']} tokens, "
             f"{_size(s['disk_bytes'])} on disk ({s['disk_bytes_per_token']} B/token), map {_size(s['map_size'])}",
             f"  top-K by source: {_sources(s['sources'])}"]
    for teacher, row in s["teachers"].items():
        lines.append(f"  teacher {teacher}: {row.get('entries', 0)} entries (tier1 {row.get('entries_tier1', 0)}, "
                     f"perturbed {row.get('entries_perturbed', 0)}, tier2 {row.get('entries_tier2', 0)} of which "
                     f"{row.get('tier2_with_topk', 0)} correct, {row.get('tier2_leaked', 0)} leaked), "
                     f"{row.get('tokens', 0)} tokens, {row['bytes_per_token']} B/token in values, "
                     f"K {row.get('max_k', 0)}")
        lines.append(f"    top-K by source: {_sources(row['sources'])}")
    if s["damaged"]:
        lines.append(f"  {s['damaged']} damaged entries: run `brts cache verify {directory}`")
    _emit(s, as_json, lines)


@cache.command()
@_dir
@_json
@click.option("--live", "live_n", type=click.IntRange(min=1), default=None,
              help="Also compare N sampled cached candidates with the live teacher (--server) at the stored ids.")
@click.option("--server", default=None, help="HOST:PORT of the `brts serve` whose teacher the cache should match.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --live sample.")
@click.option("--assume-tokenizer-matches", is_flag=True,
              help="Compare even when the cache has no tokenizer record for the teacher (written by an older brts).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), help="Bearer token for the server.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), help="PEM CA/cert to trust (enables TLS).")
def verify(directory: str, as_json: bool, live_n: int | None, server: str | None, seed: int,
           assume_tokenizer_matches: bool, token_file: str | None, tls_ca: str | None) -> None:
    """Re-read every entry and check its checksum; exit 1 on damage. With --live N --server HOST:PORT, also check
    that N cached candidates still match the teacher that server runs (exit 1 beyond tolerance: the live-vs-live
    spread, plus the engine tolerance of the server's dtype for entries whose numbers came from an engine)."""
    from brts.server.cache import admin

    if (live_n is None) != (server is None):
        raise click.UsageError("--live N and --server HOST:PORT go together")
    try:
        r = admin.verify(directory)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    lines = [f"{r['path']}: {r['checked']} records checked, "
             + ("no damage" if r["ok"] else f"{len(r['problems'])} problems")]
    lines += [f"  {p}" for p in r["problems"][:50]]
    if live_n is not None and server is not None:
        token = open(token_file).read().strip() if token_file else None
        r["live"] = _verify_live(directory, server, live_n, seed, assume_tokenizer_matches, token, tls_ca)
        lines.append(r["live"]["line"])
    _emit(r, as_json, lines)
    sys.exit(0 if r["ok"] and r.get("live", {}).get("faithful", True) else 1)


def _verify_live(directory: str, server: str, n: int, seed: int, assume: bool, token: str | None,
                 tls_ca: str | None) -> dict[str, Any]:
    """The --live check (server/cache/faithful.py): tokenizer record first, then the live comparison, each entry
    held to its source's tolerance under the server's compute dtype (``Info.dtype``)."""
    import numpy as np

    from brts.server.cache import faithful
    from brts.shared.client import TeacherClient, TeacherUnavailableError

    try:
        client = TeacherClient(server, token=token, tls_ca=tls_ca)
    except (TeacherUnavailableError, RuntimeError) as exc:
        _fail(exc)
    with client:
        info = client.info
        assert info is not None
        teacher = info.teacher_fingerprint
        recorded = faithful.recorded_tokenizer(directory, teacher)
        if recorded is None and not assume:
            _fail(RuntimeError(f"verify --live: the cache has no tokenizer record for teacher {teacher} (written by "
                               "an older brts); pass --assume-tokenizer-matches to compare anyway"))
        if recorded is not None and recorded != info.tokenizer_fingerprint:
            _fail(RuntimeError(f"verify --live: the server's tokenizer ({info.tokenizer_fingerprint[:12]}) is not the "
                               f"one teacher {teacher} wrote this cache with ({recorded[:12]}); nothing compared"))
        samples = faithful.sample_cached(directory, teacher, n, seed)
        if not samples:
            _fail(RuntimeError(f"verify --live: the cache holds no candidate of teacher {teacher} (the live server's)"))

        def score(seqs: list, starts: list, ids: list) -> list:
            return [r.candidate_logprobs for r in client.score(seqs, starts, [np.asarray(i) for i in ids])]

        report = faithful.compare_live(samples, score, dtype=info.dtype)
    verdict = "faithful" if report["faithful"] else "DRIFTED: the cache does not match the live teacher"
    per_source = "; ".join(f"{source} ({row['candidates']}) {row['drift']:.2e} of {row['tolerance']:.1e} allowed"
                           for source, row in report["by_source"].items())
    report["line"] = (f"live: {report['candidates']} candidates ({report['positions']} positions) of teacher "
                      f"{teacher}: worst drift {report['drift']:.2e} nats beyond the stored rounding (up to "
                      f"{report['rounding']:.1e}), live-vs-live control spread {report['spread']:.2e}; by source "
                      f"(engine numbers get {_engine_allowance(info.dtype):.1e} more for "
                      f"{info.dtype or 'an unknown dtype'}): {per_source}: {verdict}")
    return report


def _engine_allowance(dtype: str) -> float:
    from brts.shared.engines.base import SOURCE_DECODE, source_allowance

    return source_allowance(SOURCE_DECODE, dtype)


@cache.command()
@_dir
@click.option("--prompt-id", default=None, help="The caller's id of the prompt (e.g. a DAPO row id).")
@click.option("--text", default=None, help="A substring of the prompt text (needs --tokenizer).")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(file_okay=False),
              help="Tokenizer folder to decode prompts and responses [the bundled Qwen2.5 one with --text].")
@click.option("--limit", type=int, default=8, show_default=True, help="At most this many pools.")
@_json
def inspect(directory: str, prompt_id: str | None, text: str | None, tokenizer_dir: str | None, limit: int,
            as_json: bool) -> None:
    """Show one prompt's pools as text."""
    from brts.server.cache import admin
    from brts.shared.tokenizer import bundled_tokenizer_dir, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_dir or bundled_tokenizer_dir()) if (tokenizer_dir or text) else None
        pools = admin.inspect(directory, prompt_id=prompt_id, text=text, tokenizer=tok, limit=limit)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    if not pools:
        _fail(ValueError(
            f"no pool found for {'--prompt-id ' + repr(prompt_id) if prompt_id else '--text ' + repr(text)}"))
    lines = []
    for p in pools:
        lines.append(f"pool {p['pool']} ({p['kind']}, teacher {p['teacher']}, sampling {p['sampling']}"
                     + (f", ground truth {p['ground_truth']!r}" if p["ground_truth"] else "") + ")")
        if "prompt" in p:
            lines.append(f"  prompt: {p['prompt']!r}")
        for e in p["entries"]:
            flags = ", leaked" if e["leaked"] else ""
            lines.append(f"  [{e['index']}] {e['tokens']} tokens, answer {e['answer']!r}, "
                         f"{e['finish_reason']}{flags}, K {e['k']}"
                         + (f": {e['text']!r}" if "text" in e else ""))
    _emit(pools, as_json, lines)


@cache.command()
@_dir
@click.option("--keep-teacher", required=True, help="Teacher fingerprint whose entries are kept.")
@_json
def gc(directory: str, keep_teacher: str, as_json: bool) -> None:
    """Drop other teachers' entries (run `compact` afterwards to give the space back)."""
    from brts.server.cache import admin

    try:
        r = admin.gc(directory, keep_teacher)
    except (ValueError, RuntimeError) as exc:
        _fail(exc)
    _emit(r, as_json, [f"removed {r['pools_removed']} pools ({r['entries_removed']} entries); kept {keep_teacher}"])


@cache.command()
@_dir
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Target directory [DIRECTORY.compact].")
@click.option("--replace", is_flag=True, help="Swap the compacted copy in place of DIRECTORY (stop the server first).")
@_json
def compact(directory: str, out: str | None, replace: bool, as_json: bool) -> None:
    """Copy into a fresh environment (LMDB files never shrink)."""
    from brts.server.cache import admin

    try:
        r = admin.compact(directory, out, replace)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    _emit(r, as_json, [f"{r['from']} ({_size(r['bytes_before'])}) -> {r['to']} ({_size(r['bytes_after'])})"])


@cache.command()
@_dir
@click.argument("out", type=click.Path(dir_okay=False))
@_json
def export(directory: str, out: str, as_json: bool) -> None:
    """Write token ids, answers and flags as parquet or JSONL (by OUT's extension)."""
    from brts.server.cache import admin

    try:
        r = admin.export(directory, out)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    _emit(r, as_json, [f"wrote {r['rows']} rows to {r['out']}"])
