"""bench_server's shared pieces: Zipf-like token ids and teacher log-probs, interleaved timing, the worker thread
the direct side runs on, batcher instrumentation, and the tiny random Qwen2 behind a real server.

Why a module of its own: parts (1)-(3) of bench/bench_server.py each use them, and each part lives in its own module
(``_server_hit``, ``_server_load``) so that the script itself is only its options and its sequence.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

VOCAB = 151_936
FIRST_SPECIAL = 151_643  # ids from here on are special tokens of the Qwen2.5 tokenizer
MB = 1e6


# ---------------------------------------------------------------------------------------------------- helpers


def zipf_weights_cdf(vocab: int, s: float = 1.1, offset: float = 2.7) -> np.ndarray:
    """CDF of p(id) ∝ (id + offset)^-s: low ids are the frequent ones, as in a BPE vocabulary."""
    cdf = np.cumsum((np.arange(vocab, dtype=np.float64) + offset) ** -s)
    return cdf / cdf[-1]


_CDF_VOCAB = zipf_weights_cdf(VOCAB)
CDF_TEXT = zipf_weights_cdf(FIRST_SPECIAL)


def zipf_ids(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """int32 [rows, k]: k distinct Zipf-like ids per row over the whole vocabulary, in random order."""
    draws = np.searchsorted(_CDF_VOCAB, rng.random((rows, 3 * k))).astype(np.int64)
    draws.sort(axis=1)
    dup = np.zeros_like(draws, dtype=bool)
    dup[:, 1:] = draws[:, 1:] == draws[:, :-1]
    draws[dup] = VOCAB + np.arange(int(dup.sum()))  # push repeats past the end, keep the first k distinct
    draws.sort(axis=1)
    ids = draws[:, :k]
    short = ids >= VOCAB  # fewer than k distinct draws (rare): uniform fill
    ids[short] = rng.integers(0, VOCAB, int(short.sum()))
    order = np.argsort(rng.random((rows, k)), axis=1)
    return np.take_along_axis(ids, order, axis=1).astype(np.int32)


def teacher_logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """float32 [rows, k], rows sorted descending: a confident top-1 (p ~ Beta(6, 1)), a runner-up taking a share
    of the rest, then gaps of ~0.7 nats, as in a reasoning model's T=1 top-K."""
    p1 = rng.beta(6.0, 1.0, rows)
    lp = np.empty((rows, k), dtype=np.float64)
    lp[:, 0] = np.log(p1)
    lp[:, 1] = np.log(np.maximum((1 - p1) * rng.beta(5.0, 2.0, rows), 1e-30))
    lp[:, 2:] = lp[:, 1:2] - np.cumsum(rng.exponential(0.7, (rows, k - 2)), axis=1)
    lp = np.minimum.accumulate(np.minimum(lp, 0.0), axis=1)
    return lp.astype(np.float16).astype(np.float32)  # float16-representable: the cache stores float16


def timed_pair(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[list[float], list[float], Any, Any]:
    """One untimed warm-up call of each, then ``repeats`` timed rounds, the order alternating per round."""
    ra, rb = a(), b()
    ta: list[float] = []
    tb: list[float] = []
    for r in range(repeats):
        for fn, times, first in ((a, ta, True), (b, tb, False)) if r % 2 == 0 else ((b, tb, False), (a, ta, True)):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            if first:
                ra = out
            else:
                rb = out
    return ta, tb, ra, rb


_DIRECT = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-direct")


def off_main(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run on one persistent worker thread, as the server runs its work (gRPC handlers, the coalescer):
    on CPU, torch's intra-op threads behave differently from the main thread (hf generation from the main thread
    measured 4-5x slower than from a worker on a loaded 2-core machine), which is not the server's overhead."""
    return lambda: _DIRECT.submit(fn).result()


def time_batcher(coalescer: Any) -> list[float]:
    """Wrap a server batcher's run function (bench instrumentation, nothing else changes): the list gets the
    seconds of every group it runs, i.e. the time the server spends inside the cache or the scorer."""
    spans: list[float] = []
    run = coalescer._run

    def timed(key: Any, items: list[Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return run(key, items)
        finally:
            spans.append(time.perf_counter() - t0)

    coalescer._run = timed
    return spans


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float], ms: bool = True) -> str:
    """'min-max' of ``xs`` seconds, in ms (or in s with two decimals)."""
    lo, hi = (f"{min(xs) * 1e3:.0f}", f"{max(xs) * 1e3:.0f}") if ms else (f"{min(xs):.2f}", f"{max(xs):.2f}")
    return f"{lo}-{hi}"


def make_prompts(n: int, samples: int, length: int, seed: int, offset: int = 0) -> tuple[list[Any], list[Any]]:
    """The same prompts as client ``Prompt``s and as cache ``PromptJob``s (random text ids, fixed length)."""
    from brts.server.pipeline import PromptJob
    from brts.shared.client import Prompt

    rng = np.random.default_rng(seed)
    ids = [tuple(int(t) for t in rng.integers(0, FIRST_SPECIAL, length)) for _ in range(n)]
    prompts = [Prompt(f"p{i}", ids[i], str(i), n_tier1=samples, pool_offset=offset) for i in range(n)]
    jobs = [PromptJob(f"p{i}", ids[i], str(i), n_tier1=samples, pool_offset=offset) for i in range(n)]
    return prompts, jobs


# ---------------------------------------------------------------------------------------------------- tiny model


def build_tiny_model(path: Path, hidden: int, layers: int, max_positions: int, seed: int = 0) -> None:
    """A random fp32 Qwen2 (vocab 151,936, tied embeddings) saved with the bundled Qwen2.5 tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer("qwen2.5-instruct")
    heads = max(1, hidden // 16)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    Qwen2ForCausalLM(config).float().eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


@dataclass
class TinyServer:
    runtime: Any
    running: Any
    folder: Path


def start_tiny_server(folder: Path, args: argparse.Namespace) -> TinyServer:
    from brts.server.app import RunningServer
    from brts.server.runtime import build_runtime
    from brts.shared.config import ServerConfig, load_config

    model = folder / "model"
    build_tiny_model(model, args.hidden, args.layers, args.max_positions)
    config = load_config(
        ServerConfig, None,
        [f"sampling.max_new_tokens={args.new_tokens}", f"sampling.temperature={args.temperature}",
         f"sampling.top_p={args.top_p}", f"max_logprob_k={args.k}"],
        model=str(model), cache_dir=str(folder / "serve-cache"), device=args.device, dtype="float32", port=0)
    runtime = build_runtime(config)
    try:
        running = RunningServer(runtime.config, window_s=args.window_ms / 1000).start().attach(runtime)
    except BaseException:
        runtime.close()
        raise
    return TinyServer(runtime, running, folder)
