"""The engine protocol: what the candidate pipeline, the student rollouts and `brts eval` need from an engine, and
the helpers every adapter shares (request checks, the EOS convention, ``SampleLogprobs``), so no adapter imports
another.

Two batched operations (design.md §5): ``generate`` samples responses, ``score`` returns the teacher's exact
T=1 full-vocabulary log-probs along given sequences. Adding an engine touches one file plus one line: write an
adapter module with ``build(model, options, **own_options)`` (and, when its in-process build cannot run every
model, ``check_model(model, options)``), then add its line to ``ENGINES`` in ``registry.py``; the server,
`brts eval` and the rollouts all build engines through ``make_engine``.

EOS convention (the proto's): a sample that stopped on EOS ends with exactly one EOS token and has
``finish_reason == "stop"``; a sample cut at ``max_new_tokens`` has ``"length"`` and no trailing EOS. Lengths
come from the engine, never from ``id != pad``, because pad may equal EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from brts.shared.topk import TopK

FinishReason = Literal["stop", "length"]

#: Where a candidate's top-K log-probs came from (its provenance, stored with each cache entry):
#: ``scorer``: the exact transformers forward over (original prompt + response), the reference for everything;
#: ``engine-decode``: the engine's raw T=1 numbers taken while it sampled the response after the original prompt;
#: ``engine-prefill``: the engine's own prompt top-K over (original prompt + response), for responses sampled
#: after another prompt (Tier 2, perturbed) and for wider re-scores.
SOURCE_SCORER, SOURCE_DECODE, SOURCE_PREFILL = "scorer", "engine-decode", "engine-prefill"
LOGPROB_SOURCES = (SOURCE_SCORER, SOURCE_DECODE, SOURCE_PREFILL)
#: How far an engine's own log-probs may sit from the exact scorer's, by the teacher's compute dtype. fp32: 1e-3
#: nats: two fp32 implementations (vLLM's CPU kernels vs transformers) differ by 4.8e-7 on a 2-layer, hidden-64 model
#: (platform-notes §3) but by 1.9e-4 on a 4-layer, hidden-512 one (bench_prewarm --hidden 512 --layers 4), growing
#: with depth and width, so 1e-4 would turn real fp32 teachers away. bf16/fp16: 0.1 nats: two batchings of the same
#: bf16 kernels already differ by up to ~3e-2 (tests/shared/engines/test_scorer.py), decode-time and prefill kernels
#: add their own rounding (engine-apis §4). An engine returning its processed T=0.7 distribution misses by > 1e-2 at
#: its top ids and by nats at the tail; a wrong model or tokenizer by whole nats.
ENGINE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


def engine_tolerance(dtype: str) -> float:
    """``ENGINE_TOLERANCE`` for ``dtype``; an unknown dtype gets the bf16 bound."""
    return ENGINE_TOLERANCE.get(dtype, ENGINE_TOLERANCE["bfloat16"])


def source_allowance(source: str, dtype: str) -> float:
    """Extra nats a stored top-K may differ from a live exact-scorer re-score because of where it came from: none
    for the scorer's own numbers, ``engine_tolerance(dtype)`` for an engine's (decode-time or engine prefill)."""
    if source not in LOGPROB_SOURCES and source != "":
        raise ValueError(f"source: must be one of {LOGPROB_SOURCES}, got {source!r}")
    return 0.0 if source in (SOURCE_SCORER, "") else engine_tolerance(dtype)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings that change the distribution (and so belong in a cache key)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 7168

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k: must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class EngineOptions:
    """What any caller may say about any engine, in one vocabulary; each adapter's ``build`` maps these to its own
    arguments and its docstring says which apply (the configs decide which are allowed with which engine).

    ``device`` and ``dtype``: config-style names or torch objects ("auto" = CUDA when present / the checkpoint's
    dtype); ``mem_fraction``: the share of GPU memory a serving engine may take (None = the engine's default);
    ``tensor_parallel``/``data_parallel``: GPUs per replica / replicas; ``url``: a running engine server to talk to
    instead of starting one in-process.
    """

    device: Any = "auto"
    dtype: Any = "auto"
    mem_fraction: float | None = None
    tensor_parallel: int = 1
    data_parallel: int = 1
    url: str | None = None


class UnsupportedModelError(ValueError):
    """An engine's in-process build cannot run this model; raised before anything loads, with one line that says
    what to use instead."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and one seed per wanted sample: sample i is reproducible from ``seeds[i]`` whatever the batch."""

    prompt_ids: tuple[int, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    finish_reason: FinishReason


@dataclass(frozen=True)
class ScoreItem:
    """A sequence to score: prompt + response ids, where the response starts (>= 1), optional ids per position.

    ``candidate_ids`` is int [len(token_ids) - response_start, K']: row t holds ids whose log-probs are wanted
    at the position predicting ``token_ids[response_start + t]``; -1 entries get -inf.
    """

    token_ids: tuple[int, ...]
    response_start: int
    candidate_ids: np.ndarray | None = None


@dataclass(frozen=True)
class ScoreOutput:
    """Row t predicts ``token_ids[response_start + t]``: the teacher's top-K there and its log-probs at the
    given candidate ids (float32 [rows, K'], or None when none were given)."""

    topk: TopK
    candidate_logprobs: np.ndarray | None


@runtime_checkable
class Scorer(Protocol):
    """Exact teacher log-probs at T=1, normalised over the full vocabulary."""

    vocab_size: int

    def score(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]: ...


@runtime_checkable
class GenerationEngine(Protocol):
    """A teacher sampler. ``vocab_size`` is the logits dimension (may exceed the tokenizer's length)."""

    name: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[list[Generation]]:
        """All prompts × samples in one call; returns, per request, one Generation per seed, in seed order."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DecodeLogprobs(Protocol):
    """An engine that returns the teacher's raw T=1 top-K along each sample while it samples (vllm, sglang, hf)."""

    def generate_with_logprobs(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int
    ) -> list[list["SampleLogprobs"]]: ...


@runtime_checkable
class PrefillTopK(Protocol):
    """An engine that scores given sequences itself: its prompt top-K at T=1 over the response of each item
    (``candidate_ids`` are not supported: ``ScoreOutput.candidate_logprobs`` is None). The hf engine has none:
    its prefill is the exact scorer on the same model."""

    def score_via_prefill(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]: ...


def check_token_ids(ids: Sequence[int], vocab_size: int, max_context: int, field: str) -> None:
    """Reject empty, out-of-vocabulary or over-long id sequences with a ValueError naming ``field``."""
    if len(ids) == 0:
        raise ValueError(f"{field}: must not be empty")
    if len(ids) > max_context:
        raise ValueError(f"{field}: {len(ids)} tokens exceed the engine's context of {max_context}")
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{field}: token ids must be integers")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise ValueError(
            f"{field}: token id {int(arr[bad[0]])} at position {int(bad[0])} is outside 0..{vocab_size - 1}"
        )


@dataclass(frozen=True)
class SampleLogprobs:
    """A generated sample with the teacher's T=1 log-probs along it.

    ``token_logprobs`` float32 [T]: log-prob of each generated token; ``topk``: the top-K at each generated
    position (row t is the distribution the t-th token was drawn from, before sampling processing).
    """

    generation: Generation
    token_logprobs: np.ndarray
    topk: TopK


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_generation(
    requests: Sequence[GenerationRequest], sampling: SamplingParams, vocab_size: int, max_context: int
) -> None:
    """Check everything before any compute, with ValueErrors that name the field.

    Same rules as the hf engine, so all engines fail alike: a prompt must be non-empty, in-vocabulary and leave
    room for ``max_new_tokens`` within the context; seeds must be integers in 0..2**63-1 (vLLM reads seed -1 as
    "unseeded", which would silently break reproducibility).
    """
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
    if sampling.max_new_tokens >= max_context:
        raise ValueError(
            f"sampling.max_new_tokens: {sampling.max_new_tokens} leaves no room for a prompt in the engine's "
            f"context of {max_context}"
        )
    for i, req in enumerate(requests):
        if not isinstance(req, GenerationRequest):
            raise ValueError(f"requests[{i}]: expected a GenerationRequest, got {type(req).__name__}")
        field = f"requests[{i}].prompt_ids"
        check_token_ids(req.prompt_ids, vocab_size, max_context, field)
        if len(req.prompt_ids) + sampling.max_new_tokens > max_context:
            raise ValueError(
                f"{field}: {len(req.prompt_ids)} prompt tokens + max_new_tokens={sampling.max_new_tokens} exceed "
                f"the engine's context of {max_context}"
            )
        for j, seed in enumerate(req.seeds):
            if not is_int(seed) or not 0 <= int(seed) < 2**63:
                raise ValueError(f"requests[{i}].seeds[{j}]: must be an integer in 0..2**63-1, got {seed!r}")


def check_eos_convention(
    token_ids: Sequence[int], finish_reason: str, eos_token_ids: Sequence[int], where: str
) -> None:
    """Raise RuntimeError when an engine reply breaks the proto's EOS convention (an adapter bug, not bad input)."""
    eos = set(eos_token_ids)
    body = token_ids[:-1] if finish_reason == "stop" else token_ids
    if finish_reason == "stop" and (not token_ids or token_ids[-1] not in eos):
        raise RuntimeError(f"{where}: finish_reason 'stop' but the last token is not one of eos {sorted(eos)}")
    if any(t in eos for t in body):
        raise RuntimeError(f"{where}: an EOS token appears before the end of the sample")
