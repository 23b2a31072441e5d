"""Test doubles at the engine boundary for the cache tests (also imported by their subprocess scripts).

``SeededEngine`` answers "PROBLEM: a+b" prompts: each sample is a pure function of (prompt, seed), right with
probability ``p_right`` and, for "hard" problems (a == 99), never right without the hint; after the hint it
copies the key, and mentions it (a leak) for one seed in four. ``ArithmeticScorer`` returns sorted top-K rows
that depend only on the token ids. Together they let the cache's orchestration be tested fast and exactly, while
the real engines, the real scorer and the real LMDB are tested elsewhere and in ``test_cache_real.py``.
"""

from __future__ import annotations

import random
import re
import threading
from typing import Any, Sequence

import numpy as np

from brts.server.pipeline import CandidatePipeline, PromptJob
from brts.shared.engines.base import Generation, SamplingParams, ScoreOutput
from brts.shared.topk import TopK

VOCAB = 151_936


class SeededEngine:
    name, vocab_size, max_context = "seeded", VOCAB, 4096

    def __init__(self, tokenizer: Any, p_right: float = 0.5, gate: threading.Event | None = None) -> None:
        # ``gate``: generate() blocks until it is set, so a test can hold a generation open as long as it needs
        self.tok, self.p_right, self.gate = tokenizer, p_right, gate
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.eos_token_ids = (self.eos,)
        self.samples = 0
        self.calls = 0
        self._lock = threading.Lock()

    def answer_text(self, prompt: str, seed: int) -> str:
        a, b = map(int, re.search(r"PROBLEM: (\d+)\+(\d+)", prompt).groups())
        rng = random.Random(seed)
        key = re.search(r"VALIDATION_KEY[^:]*: ([^\]]+)\]", prompt)
        if key:
            truth = key.group(1)
            return f"the key says {truth}, so \\boxed{{{truth}}}" if seed % 4 == 0 else f"so \\boxed{{{truth}}}"
        right = a != 99 and rng.random() < self.p_right
        return f"{a}+{b} is \\boxed{{{a + b if right else a + b + 1 + rng.randrange(3)}}}"

    def generate(self, requests: Sequence[Any], sampling: SamplingParams) -> list[list[Generation]]:
        with self._lock:
            self.calls += 1
            self.samples += sum(len(r.seeds) for r in requests)
        if self.gate is not None and not self.gate.wait(timeout=600):  # a hang guard only
            raise TimeoutError("SeededEngine: the test never opened the gate")
        out = []
        for req in requests:
            prompt = self.tok.decode(list(req.prompt_ids))
            gens = []
            for seed in req.seeds:
                ids = tuple(self.tok.encode(self.answer_text(prompt, seed), add_special_tokens=False)) + (self.eos,)
                gens.append(Generation(ids, "stop"))
            out.append(gens)
        return out

    def close(self) -> None:
        pass


class ArithmeticScorer:
    vocab_size = VOCAB

    def __init__(self) -> None:
        self.items: list[Any] = []

    def score(self, items: Sequence[Any], k: int) -> list[ScoreOutput]:
        self.items.extend(items)
        outs = []
        for item in items:
            ctx = np.asarray(item.token_ids, dtype=np.int64)
            rows = len(ctx) - item.response_start
            base = ctx[item.response_start - 1 : -1, None]
            ids = ((base * 7 + np.arange(k)[None, :] * 13 + ctx.sum()) % VOCAB).astype(np.int32)
            lps = (-0.37 * np.arange(1, k + 1)[None, :] - (base % 11) * 0.013).astype(np.float32)
            outs.append(ScoreOutput(TopK(ids.reshape(rows, k), lps.reshape(rows, k)), None))
        return outs


def make_pipeline(tokenizer: Any, p_right: float = 0.5, gate: threading.Event | None = None) -> CandidatePipeline:
    engine = SeededEngine(tokenizer, p_right, gate)
    return CandidatePipeline(engine, ArithmeticScorer(), tokenizer, SamplingParams(), logprob_k=8)


def prompt_ids(tokenizer: Any, a: int, b: int) -> tuple[int, ...]:
    text = f"<|im_start|>user\nPROBLEM: {a}+{b}<|im_end|>\n<|im_start|>assistant\n"
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def job(tokenizer: Any, a: int, b: int, n_tier1: int = 2, n_tier2: int = 0, offset: int = 0,
        truth: str | None = None, pid: str | None = None, **kw: Any) -> PromptJob:
    return PromptJob(pid or f"p{a}_{b}", prompt_ids(tokenizer, a, b), str(a + b) if truth is None else truth,
                     n_tier1=n_tier1, n_tier2=n_tier2, pool_offset=offset, **kw)
