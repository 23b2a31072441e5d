"""Everything one teacher server holds: engine, exact scorer (or its replicas), tokenizer, fingerprint, verifier, cache.

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
from brts.server.probe import PROBE_K, PROBE_TEXT, ProbeReport
from brts.server.scorer_pool import (
    ScorerPool,
    agreement_item,
    check_agreement,
    check_scorer_devices,
    cpu_threads_per_replica,
)
from brts.shared.config import ServerConfig
from brts.shared.engines.base import GenerationEngine, SamplingParams, Scorer
from brts.shared.engines.registry import ENGINES, check_supported, make_engine, make_teacher

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
    # Score's replicas when config.scorer_devices is set (replica 0 is ``scorer``); None: Score runs on ``scorer``
    scorer_pool: ScorerPool | None = None

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
        if self.scorer_pool is not None:
            self.scorer_pool.close()  # the Score batches already handed to a replica finish first
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
    devices = check_scorer_devices(config.scorer_devices)  # before anything loads: a device that is not there
    tokenizer = load_tokenizer(model)
    fingerprint = teacher_fingerprint(model, tokenizer, override=teacher_override)
    engine, scorer, pool = _teacher(config, devices, tokenizer)
    verifier = BoundedVerifier()
    sampling = SamplingParams(temperature=config.sampling.temperature, top_p=config.sampling.top_p,
                              top_k=config.sampling.top_k, max_new_tokens=config.sampling.max_new_tokens)
    pipeline = CandidatePipeline(engine, scorer, tokenizer, sampling, logprob_k=config.max_logprob_k,
                                 verifier=verifier)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    cache = CandidateCache(config.cache_dir, fingerprint, pipeline, store_k=config.max_logprob_k,
                           tokenizer_fingerprint=tokenizer_hash)
    return TeacherRuntime(config, engine, scorer, tokenizer, fingerprint, tokenizer_hash, cache, pipeline, pool)


def _teacher(config: ServerConfig, devices: tuple[str, ...],
             tokenizer: Any) -> tuple[GenerationEngine, Scorer, ScorerPool | None]:
    """The engine, the exact scorer the pipeline and the probe use, and Score's replicas (None without
    ``scorer_devices``: one scorer on ``device``, as ``make_teacher`` builds it).

    With ``scorer_devices``, one ``TorchScorer`` per entry, in that order; the first is ``runtime.scorer``. Each is
    ONE MORE COPY of the teacher's weights on its device, except with the hf engine, whose model the first replica
    on the engine's own device reuses (it lends it to its scorer anyway; a second copy there would only cost
    memory). Other engines load no scorer on ``device`` then: the replicas load first, before the engine takes its
    share of the memory, as ``make_teacher`` orders it. The replicas must agree with replica 0 on a short fixed item
    before the engine loads where it can (``check_agreement``)."""
    from brts.shared.engines.scorer import TorchScorer

    options = dict(device=config.device, dtype=config.dtype, mem_fraction=config.mem_fraction,
                   tensor_parallel=config.tensor_parallel, data_parallel=config.data_parallel, url=config.engine_url)
    if not devices:
        engine, scorer = make_teacher(config.engine, config.model, **options)
        return engine, scorer, None
    engine, lent, pool = None, None, None
    try:
        if ENGINES[config.engine].lends_model_to_scorer:
            engine, lent = make_teacher(config.engine, config.model, **options)
        else:
            check_supported(config.engine, config.model, **options)
        replicas = []
        for device in devices:
            if lent is not None and str(lent.device) == device and lent not in replicas:
                replicas.append(lent)
            else:
                replicas.append(TorchScorer.from_pretrained(config.model, device=device, dtype=config.dtype))
        pool = ScorerPool(replicas, devices, cpu_threads=cpu_threads_per_replica(devices))
        dtype = str(next(replicas[0].model.parameters()).dtype).removeprefix("torch.")
        gap = check_agreement(pool, agreement_item(tokenizer, PROBE_TEXT), min(PROBE_K, config.max_logprob_k), dtype)
        log.info("%d scorer replicas on %s agree with replica 0 within %.1e nats", len(devices), ", ".join(devices),
                 gap)
        if engine is None:
            engine = make_engine(config.engine, config.model, **options)
    except BaseException:
        if pool is not None:
            pool.close()
        if engine is not None:
            engine.close()
        raise
    return engine, replicas[0], pool
