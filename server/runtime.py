"""Everything one teacher server holds: engine, exact scorer, tokenizer, fingerprint, verifier, cache.

Why one object: the gRPC service, ``brts serve`` and the tests all need the same assembly, and its teardown order
matters (stop taking work, drain, close the cache so nothing is half-written, then free the engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brts.server.cache import CandidateCache
from brts.server.fingerprint import teacher_fingerprint
from brts.server.pipeline import CandidatePipeline
from brts.server.probe import ProbeReport
from brts.shared.config import ServerConfig
from brts.shared.engines.base import GenerationEngine, SamplingParams, Scorer
from brts.shared.engines.registry import make_teacher

log = logging.getLogger("brts.serve")


@dataclass
class TeacherRuntime:
    config: ServerConfig
    engine: GenerationEngine
    scorer: Scorer
    tokenizer: Any
    fingerprint: str
    tokenizer_fingerprint: str
    cache: CandidateCache
    pipeline: CandidatePipeline

    @property
    def default_sampling(self) -> SamplingParams:
        s = self.config.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.vocab_size)

    @property
    def dtype(self) -> str:
        """The teacher's compute dtype as served in ``Info`` ("float32", "bfloat16", "float16"): the scorer's
        parameters decide it (every served number comes from them or is checked against them)."""
        model = getattr(self.scorer, "model", None)
        if model is not None:
            return str(next(model.parameters()).dtype).removeprefix("torch.")
        return self.config.dtype

    @property
    def deterministic(self) -> bool:
        """Whether the engine's numbers do not depend on how requests are batched (``Info``): the engine says."""
        return bool(getattr(self.engine, "deterministic", False))

    def apply_probe(self, report: ProbeReport) -> None:
        """Serve what the start-up probe resolved ``teacher_logprobs`` to (before SERVING: no call races it)."""
        self.pipeline.set_logprob_mode(report.logprob_mode)
        log.info("teacher log-probs: %s", report.mode_line())

    @property
    def max_context(self) -> int:
        return int(min(self.engine.max_context, getattr(self.scorer, "max_context", self.engine.max_context)))

    def close(self) -> None:
        self.cache.close()
        self.engine.close()
        if self.pipeline.verifier is not None:
            self.pipeline.verifier.close()


def build_runtime(config: ServerConfig, teacher_override: str | None = None) -> TeacherRuntime:
    """Load the teacher and open its cache; raises ValueError/ImportError with what to fix."""
    from brts.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
    from brts.shared.verify import BoundedVerifier

    model = Path(config.model)
    if not model.is_dir():
        raise ValueError(f"model: {model} is not a directory (a local Hugging Face model folder is expected)")
    tokenizer = load_tokenizer(model)
    fingerprint = teacher_fingerprint(model, tokenizer, override=teacher_override)
    engine, scorer = make_teacher(config.engine, config.model, device=config.device, dtype=config.dtype,
                                  mem_fraction=config.mem_fraction, tensor_parallel=config.tensor_parallel,
                                  data_parallel=config.data_parallel, url=config.sglang_url)
    verifier = BoundedVerifier()
    sampling = SamplingParams(temperature=config.sampling.temperature, top_p=config.sampling.top_p,
                              top_k=config.sampling.top_k, max_new_tokens=config.sampling.max_new_tokens)
    pipeline = CandidatePipeline(engine, scorer, tokenizer, sampling, logprob_k=config.max_logprob_k,
                                 verifier=verifier)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    cache = CandidateCache(config.cache_dir, fingerprint, pipeline, store_k=config.max_logprob_k,
                           tokenizer_fingerprint=tokenizer_hash)
    return TeacherRuntime(config, engine, scorer, tokenizer, fingerprint, tokenizer_hash, cache, pipeline)
