"""Does the teacher give one answer per sequence, however its server batches it? Checked before it is trusted.

Why: the trainer distils the teacher's log-probs; if the same sequence scored twice comes back with numbers that
differ by more than the signal being distilled, the run learns noise. SkyRL refuses to train in that case
(engine-apis.md §4, "serverless replicas disagree on logprobs by more than the OPD signal itself"). Here one
short sequence is sent to ``Score`` several times at once: alone, and inside batches of other sequences of
different lengths at different places (the server pads and coalesces them, as it does for concurrent trainers);
the log-probs it gets at the same ids (the top-K of the first scoring) must agree within a tolerance.

The default tolerance depends on the teacher's compute dtype (``Info.dtype``), from measurement:
- float32: batchings differ by about 1e-6 nats on the CPU (tests/reliability/test_concurrent_clients.py
  measures up to ~1e-5 across coalesced batches); the default, 1e-4, is 10x that and still far below any
  distillation signal;
- bfloat16 / float16: batchings differ by up to a few 1e-2 (tests/shared/engines/test_scorer.py needs atol 3e-2); the
  default is 0.1. An unknown dtype ("" from an older server) gets the bf16 default.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}
PROBE_K = 8
RESPONSE_TOKENS = 24  # the probe's response: the prompt's own first ids (valid ids of any tokenizer's prompt)


def default_tolerance(dtype: str) -> float:
    return DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["bfloat16"])


@dataclass(frozen=True)
class AgreementReport:
    scorings: int
    positions: int
    disagreement: float  # nats: the largest spread of one log-prob across the scorings
    tolerance: float
    dtype: str

    @property
    def ok(self) -> bool:
        return self.disagreement <= self.tolerance

    def line(self) -> str:
        return (f"teacher agreement: one sequence ({self.positions} positions) scored {self.scorings} times in "
                f"different batches disagrees by at most {self.disagreement:.2e} nats (tolerance "
                f"{self.tolerance:.1e} for {self.dtype or 'an unknown dtype'})")


def max_disagreement(scorings: Sequence[np.ndarray]) -> float:
    """The largest (max - min) of any one value across the scorings (same shape each; -inf padding skipped)."""
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in scorings])
    finite = np.isfinite(stack).all(axis=0)
    if not finite.any():
        return 0.0
    real = stack[:, finite]
    return float((real.max(axis=0) - real.min(axis=0)).max())


def batch_plan(probe: list[int], others: Sequence[list[int]]) -> list[list[list[int]]]:
    """The batches the probe is scored in: alone twice, then among other sequences, first, middle and last."""
    a, b = others[0], others[1 % len(others)]
    return [[probe], [probe], [probe, a], [a, probe], [a, probe, b], [b, a, probe]]


def check_agreement(client: Any, prompt_ids: Sequence[int], dtype: str,
                    tolerance: float | None = None) -> AgreementReport:
    """Score ``prompt_ids`` + a response of its first ``RESPONSE_TOKENS`` ids in every batch of ``batch_plan``
    concurrently with ``client`` (a ``TeacherClient``) at the top-K ids of a first scoring, and report the
    largest disagreement."""
    response_ids = list(prompt_ids)[:RESPONSE_TOKENS]
    probe, start = list(prompt_ids) + response_ids, len(prompt_ids)
    (first,) = client.score([probe], [start], logprob_k=PROBE_K)
    ids = np.asarray(first.topk_ids)
    others = [list(prompt_ids) + list(response_ids[: max(1, len(response_ids) // 2)]),
              list(prompt_ids) + list(response_ids) * 3]
    plan = batch_plan(probe, others)

    def run(batch: list[list[int]]) -> np.ndarray:
        starts = [start] * len(batch)
        cands = [ids if seq is probe else None for seq in batch]
        results = client.score(batch, starts, cands, logprob_k=PROBE_K)
        return results[next(i for i, seq in enumerate(batch) if seq is probe)].candidate_logprobs

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        scorings = list(pool.map(run, plan))
    scorings.append(np.asarray(first.topk_logprobs))
    return AgreementReport(len(scorings), int(ids.shape[0]), max_disagreement(scorings),
                           default_tolerance(dtype) if tolerance is None else tolerance, dtype)
