"""Prometheus metrics of one teacher server: ``brts serve --metrics-port P`` serves them at ``/metrics``.

Why: one server is shared by several training runs, and its operators expect what vLLM and SGLang servers give
them: request rates and errors, latency, queue depths, cache hit rates and the engine's busy time, scraped by
their Prometheus. Counters only: no prompt text, no token ids, no prompt names ever become a label.

Every metric is named ``brts_*`` and lives in the server's own ``CollectorRegistry`` (several servers in one
process, as in the tests, do not collide). What each counts, in the words of the calls that move it:

- ``brts_requests_total{method,code}``: RPCs finished, by gRPC status code; ``brts_requests_in_flight{method}``;
  ``brts_request_seconds{method}``: time from arrival (waiting for the start-up probe included) to the last byte;
- ``brts_queue_depth{queue}``: submissions waiting in the candidates/score coalescer;
  ``brts_batch_items{queue}``: items per coalesced engine or scorer call;
- ``brts_prompts_total{result}``: GetCandidates prompts served from the cache (``hit``), with something drawn
  or rescored for them (``miss``), or incomplete under ``cache_only`` (``absent``);
- ``brts_candidates_generated_total{tier}``, ``brts_tokens_generated_total``: candidates drawn by this server
  (entries another call had drawn count where they were drawn, once);
- ``brts_tier2_total{event}``: hinted samples drawn (``attempt``), and each one's outcome: correct without
  leaking the answer (``rescue``), dropped for leaking it (``leak``), or wrong (``wrong``);
- ``brts_engine_seconds_total``, ``brts_scorer_seconds_total``: time inside the engine's generation (with or
  without its decode-time top-K), and inside scoring: the exact scorer's calls plus, in engine mode, the engine's
  own prefill scoring (``score_via_prefill``), so the second counter is all the time spent re-reading candidates.
- with scorer replicas (``scorer_devices``) only: ``brts_scorer_replica_seconds_total{replica,device}`` and
  ``brts_scorer_replica_batches_total{replica,device}``: each replica's time inside Score micro-batches and how
  many it ran (``replica`` is its index in ``scorer_devices``), to see whether the load spreads over them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The metrics of one server, and the few hooks that move them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("brts_requests", "RPCs finished, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.in_flight = Gauge("brts_requests_in_flight", "RPCs being handled", ["method"], registry=r)
        self.latency = Histogram("brts_request_seconds", "RPC time from arrival to the last reply byte",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("brts_queue_depth", "Submissions waiting in a coalescer", ["queue"], registry=r)
        self.batch_items = Histogram("brts_batch_items", "Items per coalesced engine or scorer call", ["queue"],
                                     buckets=BATCH_BUCKETS, registry=r)
        self.prompts = Counter("brts_prompts", "GetCandidates prompts served, cache hit or miss", ["result"],
                               registry=r)
        self.candidates = Counter("brts_candidates_generated", "Candidates drawn by this server", ["tier"],
                                  registry=r)
        self.tokens = Counter("brts_tokens_generated", "Tokens of the candidates drawn by this server", registry=r)
        self.tier2 = Counter("brts_tier2", "Hinted (Tier-2) samples: attempts, rescues, leaks", ["event"], registry=r)
        self.engine_seconds = Counter("brts_engine_seconds", "Seconds inside the engine's generation", registry=r)
        self.scorer_seconds = Counter("brts_scorer_seconds", "Seconds inside scoring (exact scorer, engine prefill)",
                                      registry=r)
        self.replica_seconds = Counter("brts_scorer_replica_seconds", "Seconds a scorer replica spent on Score "
                                       "micro-batches", ["replica", "device"], registry=r)
        self.replica_batches = Counter("brts_scorer_replica_batches", "Score micro-batches a scorer replica ran",
                                       ["replica", "device"], registry=r)

    # -- RPCs -------------------------------------------------------------------------------------------------
    def unary(self, method: str, handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """``handler`` counted: in flight while it runs, then its status code and latency."""
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            start = self._begin(method)
            try:
                reply = handler(request, context)
            except BaseException:
                self._end(method, context, start, failed=True)
                raise
            self._end(method, context, start, failed=False)
            return reply
        return handle

    def stream(self, method: str, handler: Callable[[Any, Any], Iterator[Any]]) -> Callable[[Any, Any], Any]:
        """A streaming ``handler`` counted the same way, ended when its last message was yielded."""
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, failed = self._begin(method), True
            try:
                yield from handler(request, context)
                failed = False
            finally:
                self._end(method, context, start, failed)
        return handle

    def _begin(self, method: str) -> float:
        self.in_flight.labels(method).inc()
        return time.monotonic()

    def _end(self, method: str, context: grpc.ServicerContext, start: float, failed: bool) -> None:
        code = context.code()  # set by abort() or set_code(); None on a plain return
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(time.monotonic() - start)
        self.in_flight.labels(method).dec()

    # -- the work -----------------------------------------------------------------------------------------------
    def served(self, prompt: Any) -> None:
        """One ``ServedPrompt`` of GetCandidates: hit or miss, and what this server drew for it."""
        self.prompts.labels("absent" if prompt.missing else "hit" if prompt.cache_hit else "miss").inc()
        for c in prompt.candidates:
            if not c.cached and c.tier == 1:
                self.candidates.labels("1").inc()
                self.tokens.inc(int(c.token_ids.size))
        for c in prompt.tier2_attempts:
            if not c.cached:
                self.candidates.labels("2").inc()
                self.tokens.inc(int(c.token_ids.size))
                self.tier2.labels("attempt").inc()
                self.tier2.labels("leak" if c.leaked else "rescue" if c.correct else "wrong").inc()

    def timed(self, counter: Counter, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` with its wall time added to ``counter``."""
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return call(*args, **kwargs)
            finally:
                counter.inc(time.monotonic() - start)
        return run

    def instrument(self, runtime: Any) -> None:
        """Time the runtime's engine generation and exact scorer where the pipeline and the service call them (and
        each of Score's scorer replicas, when it has them)."""
        pipeline = runtime.pipeline
        timed = {name: self.timed(self.engine_seconds, getattr(pipeline.engine, name))
                 for name in ("generate", "generate_with_logprobs") if hasattr(pipeline.engine, name)}
        if hasattr(pipeline.engine, "score_via_prefill"):
            timed["score_via_prefill"] = self.timed(self.scorer_seconds, pipeline.engine.score_via_prefill)
        engine = _Timed(pipeline.engine, timed)
        scorer = _Timed(runtime.scorer, {"score": self.timed(self.scorer_seconds, runtime.scorer.score)})
        pipeline.engine, pipeline.scorer, runtime.scorer = engine, scorer, scorer
        pool = getattr(runtime, "scorer_pool", None)
        for i, replica in enumerate(pool.replicas if pool is not None else ()):
            pool.replicas[i] = _Timed(replica, {"score": self._replica_timed(i, pool.devices[i], replica.score)})

    def _replica_timed(self, i: int, device: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """A replica's ``score`` counted per replica, and in ``brts_scorer_seconds`` as every scorer call is."""
        seconds, batches = self.replica_seconds.labels(str(i), device), self.replica_batches.labels(str(i), device)

        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return call(*args, **kwargs)
            finally:
                took = time.monotonic() - start
                self.scorer_seconds.inc(took)
                seconds.inc(took)
                batches.inc()
        return run

    def serve(self, host: str, port: int, certfile: str | None = None, keyfile: str | None = None) -> Any:
        """Serve ``/metrics`` (HTTPS when a certificate is given); the returned server's ``shutdown()`` stops it.
        A port in use raises ``OSError``."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry, certfile=certfile, keyfile=keyfile)
        return server


class _Timed:
    """The wrapped object with some methods replaced (timed); every other attribute is the object's own."""

    def __init__(self, inner: Any, methods: dict[str, Callable[..., Any]]) -> None:
        self._inner, self._methods = inner, methods

    def __getattr__(self, name: str) -> Any:
        return self._methods.get(name) or getattr(self._inner, name)
