"""``brts prewarm``: fill a running server's cache over a dataset, as its client.

Why as a client: the prompt ids are built by the same ``PromptSpec`` the trainer uses, so the trainer's requests
hit exactly what prewarm stored, and the server keeps the single writer and single flight. Re-running skips
what is cached (the server answers cached prompts from a snapshot read), so a killed prewarm just runs again;
``check`` asks for a sample with generation disabled, so a prompt-format mismatch shows before training.

``check`` also holds one cached candidate against ``Score`` on the same tokens. Its tolerance is the teacher
agreement tolerance (how much one re-score may differ from another) plus ``source_allowance(source, dtype)``: 0
when the candidate's numbers came from the exact scorer (``Candidate.logprob_source`` "scorer", or "" from a
server older than the field), ``engine_tolerance(dtype)`` when they came from an engine, whose decode-time or
prefill kernels differ from the scorer's by more than the scorer differs from itself.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from brts.server.cache.faithful import drift_report
from brts.shared.agreement import check_agreement
from brts.shared.client import Prompt, PromptCandidates, Sampling, TeacherClient
from brts.shared.config import PrewarmConfig
from brts.shared.data import Problem, filter_by_prompt_length, load_dataset
from brts.shared.engines.base import LOGPROB_SOURCES, SOURCE_SCORER, source_allowance
from brts.shared.prompts import PromptSpec

CHECK_SAMPLE = 64


@dataclass
class PrewarmSummary:
    prompts: int = 0
    skipped_too_long: int = 0
    cache_hits: int = 0
    tier1_solved: int = 0
    tier2_tried: int = 0
    tier2_rescued: int = 0
    tier2_leaked: int = 0
    tokens_generated: int = 0
    candidates: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        solve = self.tier1_solved / max(self.prompts, 1)
        rescue = self.tier2_rescued / max(self.tier2_tried, 1)
        return [
            f"prompts {self.prompts} ({self.cache_hits} already cached, {self.skipped_too_long} skipped: too long)",
            f"Tier-1 solve rate {solve:.1%}; Tier-2 rescue rate {rescue:.1%} "
            f"({self.tier2_rescued}/{self.tier2_tried}), leaking hints dropped {self.tier2_leaked}",
            f"candidates {self.candidates}, tokens generated {self.tokens_generated} in {self.seconds:.1f} s",
        ]


def prompt_spec(cfg: PrewarmConfig, tokenizer: Any | None = None) -> PromptSpec:
    p = cfg.prompt
    return PromptSpec.from_options(tokenizer or p.tokenizer, p.chat_template, p.instruction_suffix, p.max_prompt_len,
                                   p.system_prompt)


def build_prompts(problems: Sequence[Problem], spec: PromptSpec, cfg: PrewarmConfig) -> tuple[list[Prompt], int]:
    kept, dropped = filter_by_prompt_length(problems, spec)
    ids = spec.encode_batch([p.problem for p in kept])
    prompts = [Prompt(p.id, tuple(i), p.answer, cfg.n_tier1, cfg.n_tier2) for p, i in zip(kept, ids)]
    return prompts, len(dropped)


def _account(summary: PrewarmSummary, result: PromptCandidates) -> None:
    summary.prompts += 1
    summary.cache_hits += result.cache_hit
    tier1 = [c for c in result.candidates if c.tier == 1]
    summary.tier1_solved += any(c.correct for c in tier1)
    summary.tier2_tried += result.tier2_drawn > 0
    summary.tier2_rescued += any(c.tier == 2 for c in result.candidates)
    summary.tier2_leaked += result.tier2_leaked
    summary.candidates += len(result.candidates)
    summary.tokens_generated += sum(int(c.token_ids.size) for c in result.candidates if not c.cached)


def prewarm(cfg: PrewarmConfig, client: TeacherClient, sampling: Sampling | None = None,
            problems: Sequence[Problem] | None = None, progress: bool = True,
            on_result: Callable[[PromptCandidates], None] | None = None) -> PrewarmSummary:
    """Walk the dataset in calls of ``prompts_per_call``, ``concurrency`` calls in flight."""
    from tqdm import tqdm

    start = time.monotonic()
    problems = list(problems) if problems is not None else load_dataset(cfg.dataset)
    if cfg.limit is not None:
        problems = problems[: cfg.limit]
    spec = prompt_spec(cfg)
    prompts, dropped = build_prompts(problems, spec, cfg)
    summary = PrewarmSummary(skipped_too_long=dropped)
    calls = [prompts[i : i + cfg.prompts_per_call] for i in range(0, len(prompts), cfg.prompts_per_call)]
    bar = tqdm(total=len(prompts), unit="prompt", disable=not progress, desc="prewarm", smoothing=0.1)

    def run(chunk: list[Prompt]) -> list[PromptCandidates]:
        return list(client.get_candidates(chunk, sampling, cfg.logprob_k))

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        queued = iter(calls)
        running = {pool.submit(run, c) for c in [next(queued) for _ in range(min(cfg.concurrency, len(calls)))]}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                for result in future.result():
                    _account(summary, result)
                    if on_result is not None:
                        on_result(result)
                bar.update(len(future.result()))
                elapsed = max(time.monotonic() - start, 1e-9)
                bar.set_postfix(tok_s=f"{summary.tokens_generated / elapsed:.0f}", hits=summary.cache_hits)
                nxt = next(queued, None)
                if nxt is not None:
                    running.add(pool.submit(run, nxt))
    bar.close()
    summary.seconds = time.monotonic() - start
    return summary


def check(cfg: PrewarmConfig, client: TeacherClient, sampling: Sampling | None = None,
          problems: Sequence[Problem] | None = None, sample: int = CHECK_SAMPLE, seed: int = 0) -> dict[str, Any]:
    """Ask for a random sample with generation disabled; the hit rate says whether prompts match the cache."""
    problems = list(problems) if problems is not None else load_dataset(cfg.dataset)
    if cfg.limit is not None:
        problems = problems[: cfg.limit]
    picked = random.Random(seed).sample(problems, min(sample, len(problems)))
    prompts, _ = build_prompts(picked, prompt_spec(cfg), cfg)
    results = list(client.get_candidates(prompts, sampling, cfg.logprob_k, cache_only=True))
    hits = sum(r.missing == 0 for r in results)
    dtype = client.info.dtype if client.info is not None else ""
    agreement = check_agreement(client, prompts[0].prompt_ids, dtype, cfg.teacher_agreement_tolerance) \
        if prompts else None
    by_id = {p.prompt_id: p for p in prompts}
    cached = next(((by_id[r.prompt_id], c) for r in results for c in r.candidates if c.topk_ids is not None), None)
    compared = tolerance = None
    if agreement is not None:
        tolerance = agreement.tolerance
        if cached is not None:
            compared = check_cached(client, *cached, agreement.tolerance, dtype)
            tolerance = compared["tolerance"]  # what cached_vs_score is held to: widened by the candidate's source
    return {"asked": len(results), "complete": hits, "hit_rate": hits / max(len(results), 1),
            "partial": sum(0 < r.missing and r.candidates != [] for r in results),
            "agreement": agreement, "cached_vs_score": None if compared is None else compared["drift"],
            "cached": compared,  # the one cached candidate's comparison: source, drift, tolerance, verdict, line
            "tolerance": tolerance}


def check_cached(client: TeacherClient, prompt: Prompt, candidate: Any, base_tolerance: float,
                 dtype: str) -> dict[str, Any]:
    """``cached_vs_score`` of one candidate, held to ``base_tolerance`` (the teacher's agreement tolerance) plus
    the allowance of the source its numbers came from under the teacher's ``dtype``: a dict with the source, drift,
    allowance, tolerance, verdict (``ok``) and a line saying all of it."""
    source = candidate.logprob_source or SOURCE_SCORER  # "" from an older server: its numbers were the scorer's
    if source not in LOGPROB_SOURCES:
        raise ValueError(f"the server sent candidates whose log-prob source is {source!r}, which this brts does not "
                         f"know ({', '.join(LOGPROB_SOURCES)}): update brts on this side")
    allowance = source_allowance(source, dtype)
    drift = cached_vs_score(client, prompt, candidate)
    tolerance = base_tolerance + allowance
    ok = drift <= tolerance
    line = (f"one cached candidate's top-K vs Score on the same tokens: {drift:.2e} nats beyond the stored "
            f"rounding; {source} log-probs, tolerance {tolerance:.1e} (agreement {base_tolerance:.1e} + "
            f"{allowance:.1e} for {source} numbers in {dtype or 'an unknown dtype'}): "
            f"{'ok' if ok else 'BEYOND TOLERANCE'}")
    return {"source": source, "drift": drift, "allowance": allowance, "tolerance": tolerance, "ok": ok,
            "line": line}


def cached_vs_score(client: TeacherClient, prompt: Prompt, candidate: Any) -> float:
    """Largest |cached - Score| log-prob, at the cached top-K ids of one candidate, after its original prompt,
    beyond the rounding of the stored value (the server sends the stored dtype): ``faithful.drift_report``'s drift
    (the tolerance it is held to, by its source, is ``check_cached``'s)."""
    seq = list(prompt.prompt_ids) + [int(t) for t in candidate.token_ids]
    ids = np.asarray(candidate.topk_ids)
    (live,) = client.score([seq], [len(prompt.prompt_ids)], [ids], logprob_k=int(ids.shape[1]))
    stored, scored = np.asarray(candidate.topk_logprobs), live.candidate_logprobs
    return float(drift_report([stored], [ids], [scored], [scored])["drift"])
