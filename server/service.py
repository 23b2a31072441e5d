"""The gRPC ``TeacherService``: GetCandidates (streamed per prompt), Score, Info.

Why batchers: one server is shared by several trainers, so requests that arrive within a short window are
coalesced into ONE cache call (one engine call for everything missing: four trainers asking at once cost one
generation), and Score requests are coalesced the same way on their own worker and queue, so a trainer's
per-step Score never waits behind a long generation. With scorer replicas (``scorer_devices``), each Score
micro-batch runs whole on whichever replica is free, several at once (server/scorer_pool.py). Cached prompts skip
the batcher: a snapshot read answers them at once, and only prompts with missing entries are queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import grpc

from brts.proto import teacher_pb2, teacher_pb2_grpc
from brts.server.cache import ServedPrompt
from brts.server.metrics import ServerMetrics
from brts.server.pipeline import PromptJob
from brts.server.runtime import TeacherRuntime
from brts.server.validation import Limits, RequestError, candidates_call, check_generation_fits, score_items
from brts.server.wire import candidate_source, encode_prompt
from brts.shared.engines.base import SamplingParams, ScoreItem, ScoreOutput
from brts.shared.topk import to_proto

log = logging.getLogger("brts.serve")
_STOP = object()
SNAPSHOT_CHUNK = 4  # prompts per snapshot read: small enough to start streaming at once


@dataclass
class _Submission:
    key: Any
    payload: list[Any]
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)


class Coalescer:
    """A worker thread that gathers submissions for ``window_s`` and runs each group (same key) in one call.

    ``run(key, payloads) -> results`` gets the concatenated payloads of a group and returns one result per
    payload item; each submission receives its slice (or the exception) on its own queue.

    With a ``pool`` (``ScorerPool``, server/scorer_pool.py: Score's scorer replicas) each group is handed whole to a
    free replica, ``run(key, payloads, replica)`` on that replica's thread, and the loop goes back to gathering at
    once, so up to one group per replica runs at a time. The loop takes a free replica BEFORE it gathers: while
    every replica is busy, submissions pile up and leave together as one larger group, as they do with one scorer.
    """

    def __init__(self, name: str, run: Callable[..., Sequence[Any]], window_s: float,
                 depth: Any = None, sizes: Any = None, pool: Any = None) -> None:
        # depth, sizes: a metrics gauge of the submissions waiting and a histogram of the items per call (or None)
        self._run, self._window, self._depth, self._sizes, self._pool = run, window_s, depth, sizes, pool
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self.calls = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Any, payload: list[Any]) -> _Submission:
        sub = _Submission(key, payload)
        if self._depth is not None:
            self._depth.inc()
        self._queue.put(sub)
        return sub

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            lane = self._pool.acquire() if self._pool is not None else None
            first = self._queue.get()
            if first is _STOP:
                if lane is not None:
                    self._pool.release(lane)
                return
            batch, deadline, stop = [first], time.monotonic() + self._window, False
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            if self._depth is not None:
                self._depth.dec(len(batch))
            groups: dict[Any, list[_Submission]] = {}
            for sub in batch:
                groups.setdefault(sub.key, []).append(sub)
            for key, subs in groups.items():
                if self._pool is None:
                    self._run_group(key, subs)
                else:  # the first group takes the replica reserved above; any other waits for one
                    self._dispatch(key, subs, lane if lane is not None else self._pool.acquire())
                    lane = None
            if stop:
                return

    def _items(self, subs: list[_Submission]) -> list[Any]:
        items = [x for sub in subs for x in sub.payload]
        self.calls += 1
        if self._sizes is not None:
            self._sizes.observe(len(items))
        return items

    def _run_group(self, key: Any, subs: list[_Submission]) -> None:
        items = self._items(subs)
        try:
            results: Any = list(self._run(key, items))
        except BaseException as exc:  # noqa: BLE001 - every waiter gets it
            results = exc
        _deliver(subs, results)

    def _dispatch(self, key: Any, subs: list[_Submission], lane: int) -> None:
        items = self._items(subs)
        try:
            self._pool.start(lane, lambda replica: list(self._run(key, items, replica)),
                             lambda results: _deliver(subs, results))
        except BaseException as exc:  # noqa: BLE001 - a closed pool: every waiter gets it
            self._pool.release(lane)
            _deliver(subs, exc)


def _deliver(subs: list[_Submission], results: Any) -> None:
    """Each submission its slice of ``results`` (in submission order), or the exception the whole group got."""
    if isinstance(results, BaseException):
        for sub in subs:
            sub.out.put(results)
        return
    at = 0
    for sub in subs:
        sub.out.put(results[at : at + len(sub.payload)])
        at += len(sub.payload)


def prompt_message(served: ServedPrompt, packed_tokens: bool = False) -> Any:
    """A ``PromptCandidates`` built from what the cache decoded from its stored bytes. ``packed_tokens``: the
    tokens as one int32 Array (``token_ids_packed``) instead of a repeated field, about 5x cheaper to build and
    to parse for long responses (issue #5's hit path)."""
    msg = teacher_pb2.PromptCandidates(
        prompt_id=served.prompt_id, tier2_drawn=served.tier2_drawn, tier2_leaked=served.tier2_leaked,
        cache_hit=served.cache_hit, seconds=served.seconds, missing=served.missing,
    )
    for c in served.candidates:
        cand = msg.candidates.add(tier=c.tier, index=c.index, answer=c.answer or "", correct=c.correct,
                                  leaked=c.leaked, finish_reason=c.finish_reason, cached=c.cached,
                                  logprob_source=candidate_source(c))
        if packed_tokens:
            to_proto(c.token_ids, "int32", cand.token_ids_packed)
        else:
            cand.token_ids.extend(c.token_ids.tolist())
        if c.topk is not None:
            to_proto(c.topk.ids, "int32", cand.topk_ids)
            to_proto(c.topk.logprobs, c.topk.logprobs.dtype.name, cand.topk_logprobs)
    return msg


def reply_for(served: ServedPrompt, packed_tokens: bool) -> Any:
    """What GetCandidates yields: pre-encoded bytes for clients that take packed tokens (``wire.encode_prompt``,
    the fast path), a message for the others."""
    return encode_prompt(served) if packed_tokens else prompt_message(served)


def score_message(output: ScoreOutput) -> Any:
    result = teacher_pb2.ScoreResult()
    to_proto(output.topk.ids, "int32", result.topk_ids)
    to_proto(output.topk.logprobs, "float32", result.topk_logprobs)
    if output.candidate_logprobs is not None:
        to_proto(output.candidate_logprobs, "float32", result.candidate_logprobs)
    return result


class TeacherService(teacher_pb2_grpc.TeacherServiceServicer):
    def __init__(self, runtime: TeacherRuntime, window_s: float | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        cfg = runtime.config
        self.runtime = runtime
        self.metrics = metrics or ServerMetrics()
        self.limits = Limits(
            vocab_size=runtime.vocab_size, max_context=runtime.max_context, max_logprob_k=cfg.max_logprob_k,
            max_prompts_per_call=cfg.max_prompts_per_call, max_samples_per_prompt=cfg.max_samples_per_prompt,
            max_pool_offset=cfg.max_pool_offset, max_new_tokens=max(cfg.sampling.max_new_tokens, 1),
        )
        window = cfg.batch_window_ms / 1000 if window_s is None else window_s
        m = self.metrics
        self.candidates = Coalescer("brts-candidates", self._generate, window, m.queue_depth.labels("candidates"),
                                    m.batch_items.labels("candidates"))
        # with scorer replicas (runtime.scorer_pool), each Score micro-batch runs whole on a free replica
        self.scores = Coalescer("brts-score", self._score, window, m.queue_depth.labels("score"),
                                m.batch_items.labels("score"), pool=runtime.scorer_pool)
        # Snapshot reads (decompress + decode, which release the GIL) run on these threads while the RPC thread
        # builds and serializes the messages of the prompts already read: the two overlap instead of adding up.
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="brts-read")

    def close(self) -> None:
        self.candidates.close()
        self.scores.close()
        self._readers.shutdown(wait=True)

    def _snapshot(self, call: Any) -> Iterator[tuple[PromptJob, ServedPrompt]]:
        """What the cache holds for each prompt, read in chunks ahead of the consumer, in request order."""
        rt, size = self.runtime, SNAPSHOT_CHUNK
        chunks = [call.jobs[i : i + size] for i in range(0, len(call.jobs), size)]
        futures = [self._readers.submit(rt.cache.get, c, call.sampling, call.seed, call.k, generate=False)
                   for c in chunks]
        try:
            for chunk, future in zip(chunks, futures):
                yield from zip(chunk, future.result())
        finally:
            for future in futures:
                future.cancel()

    # -- workers ----------------------------------------------------------------------------------------------------
    def _generate(self, key: tuple[SamplingParams, int, int], jobs: list[PromptJob]) -> list[ServedPrompt]:
        sampling, seed, k = key
        return self.runtime.cache.get(jobs, sampling, seed, k)

    def _score(self, k: int, items: list[ScoreItem], replica: Any = None) -> list[ScoreOutput]:
        """One Score micro-batch: on the replica the pool gave it, or on the one scorer when there is no pool."""
        return (self.runtime.scorer if replica is None else replica).score(items, k)

    @staticmethod
    def _wait(sub: _Submission, context: Any) -> list[Any]:
        while True:
            try:
                result = sub.out.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    raise RuntimeError("client went away") from None
                continue
            if isinstance(result, BaseException):
                raise result
            return result

    @staticmethod
    def _abort(context: Any, exc: BaseException, what: str) -> None:
        if isinstance(exc, RequestError):
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        log.exception("%s failed", what)
        context.abort(grpc.StatusCode.INTERNAL, f"{what}: {exc.__class__.__name__}: {exc}")

    # -- RPCs -------------------------------------------------------------------------------------------------------
    def GetCandidates(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802 - gRPC's name
        rt = self.runtime
        try:
            call = candidates_call(request, rt.default_sampling, rt.config.sampling.seed, self.limits, rt.fingerprint)
        except Exception as exc:  # noqa: BLE001 - any failure of a call becomes its gRPC status, never a crashed server
            self._abort(context, exc, "GetCandidates")
            return
        pending = []
        try:
            for job, served in self._snapshot(call):
                if served.missing == 0 or call.cache_only:
                    self.metrics.served(served)
                    yield reply_for(served, call.packed_tokens)
                else:
                    pending.append(job)
        except Exception as exc:  # noqa: BLE001 - any failure of a call becomes its gRPC status, never a crashed server
            self._abort(context, exc, "GetCandidates")
            return
        if not pending:
            return
        try:
            check_generation_fits(pending, call.sampling, self.limits, rt.pipeline)
            sub = self.candidates.submit((call.sampling, call.seed, call.k), pending)
            results = self._wait(sub, context)
        except Exception as exc:  # noqa: BLE001 - any failure of a call becomes its gRPC status, never a crashed server
            self._abort(context, exc, "GetCandidates")
            return
        for served in results:
            self.metrics.served(served)
            yield reply_for(served, call.packed_tokens)

    def Score(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method names are the proto's
        try:
            items, k = score_items(request, self.limits)
            outputs = self._wait(self.scores.submit(k, items), context)
        except Exception as exc:  # noqa: BLE001 - any failure of a call becomes its gRPC status, never a crashed server
            self._abort(context, exc, "Score")
            raise  # unreachable: abort raises
        reply = teacher_pb2.ScoreReply()
        reply.results.extend(score_message(o) for o in outputs)
        return reply

    def Info(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method names are the proto's
        rt = self.runtime
        return teacher_pb2.InfoReply(
            teacher_fingerprint=rt.fingerprint, tokenizer_fingerprint=rt.tokenizer_fingerprint,
            vocab_size=rt.vocab_size, max_logprob_k=rt.config.max_logprob_k, engine=rt.engine.name,
            model=str(rt.config.model), dtype=rt.dtype, logprob_source=rt.pipeline.logprob_mode,
            logprob_temperature=1.0, logprob_normalisation="full-logits", logprob_k_served=rt.config.max_logprob_k,
            engine_deterministic=rt.deterministic,
        )
