"""The one Python client of ``brts serve``: typed calls returning numpy arrays (prewarm, the trainer, anyone's).

Why these behaviours: a shared server restarts (a new teacher, a crash), so calls retry with backoff on
UNAVAILABLE, and a GetCandidates stream that breaks is resumed for the prompts not yet received (the server's
cache makes that idempotent); a server that is down gives one error naming the address; connecting checks the
teacher fingerprint when the caller pins one, so a run never trains against the wrong teacher.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
import numpy as np

from brts.proto import teacher_pb2, teacher_pb2_grpc
from brts.shared.topk import from_proto, to_proto

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class TeacherUnavailableError(ConnectionError):
    """The server cannot be reached; the message names the address."""


class TeacherMismatchError(RuntimeError):
    """The server serves another teacher than the one the caller pinned."""


@dataclass(frozen=True)
class Prompt:
    """One prompt's request (``brts.v1.PromptRequest``)."""

    prompt_id: str
    prompt_ids: Sequence[int]
    ground_truth: str = ""
    n_tier1: int = 4
    n_tier2: int = 0
    pool_offset: int = 0
    perturbation: str = ""
    perturb_slot: int = 0
    tier2_keep_leaked: bool = False
    perturb_position: str = ""  # "" = the server's after_template (today's prompts and pools)


@dataclass
class Candidate:
    tier: int
    index: int
    token_ids: np.ndarray
    answer: str
    correct: bool
    leaked: bool
    finish_reason: str
    topk_ids: np.ndarray | None
    topk_logprobs: np.ndarray | None
    cached: bool
    # where the top-K came from (brts.shared.engines.base.LOGPROB_SOURCES): it sets how closely a re-score must
    # match (prewarm --check); "" from a server older than the field, whose numbers were the scorer's
    logprob_source: str = ""
    # which teacher wrote it, set by the trainer in a cross-teacher pool (not on the wire: "" = the one asked)
    teacher: str = ""


@dataclass
class PromptCandidates:
    prompt_id: str
    candidates: list[Candidate]
    tier2_drawn: int
    tier2_leaked: int
    cache_hit: bool
    seconds: float
    missing: int = 0
    wire_bytes: int = 0


@dataclass(frozen=True)
class ScoreResult:
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    candidate_logprobs: np.ndarray | None


@dataclass(frozen=True)
class ServerInfo:
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_logprob_k: int
    engine: str
    model: str
    dtype: str = ""  # the teacher's compute dtype; "" from a server older than the field
    # the log-prob contract of fresh candidates (InfoReply 8-12; "" / 0 / False from older servers)
    logprob_source: str = ""
    logprob_temperature: float = 0.0
    logprob_normalisation: str = ""
    logprob_k_served: int = 0
    engine_deterministic: bool = False


@dataclass
class Sampling:
    """None = the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    seed: int | None = None

    def message(self) -> Any:
        return teacher_pb2.Sampling(**{k: v for k, v in self.__dict__.items() if v is not None})


def _candidates(msg: Any) -> PromptCandidates:
    cands = []
    for c in msg.candidates:
        has = bool(c.topk_ids.dtype)
        # a writable copy (16 KB for 4,096 tokens): callers index and convert it like the repeated field's array
        tokens = from_proto(c.token_ids_packed, "token_ids_packed").copy() if c.token_ids_packed.dtype else \
            np.asarray(c.token_ids, dtype=np.int32)
        cands.append(Candidate(
            c.tier, c.index, tokens, c.answer, c.correct, c.leaked, c.finish_reason,
            from_proto(c.topk_ids, "topk_ids") if has else None,
            from_proto(c.topk_logprobs, "topk_logprobs") if has else None, c.cached, c.logprob_source,
        ))
    return PromptCandidates(msg.prompt_id, cands, msg.tier2_drawn, msg.tier2_leaked, msg.cache_hit, msg.seconds,
                            msg.missing, msg.ByteSize())


def _server_info(r: Any) -> ServerInfo:
    """An ``InfoReply`` as a ``ServerInfo`` (fields a server older than them leaves out read "" / 0 / False)."""
    return ServerInfo(r.teacher_fingerprint, r.tokenizer_fingerprint, r.vocab_size, r.max_logprob_k, r.engine,
                      r.model, r.dtype, r.logprob_source, r.logprob_temperature, r.logprob_normalisation,
                      r.logprob_k_served, r.engine_deterministic)


@dataclass
class TeacherClient:
    """``TeacherClient("127.0.0.1:50051")``; use as a context manager or call ``close()``."""

    address: str
    token: str | None = None
    tls_ca: str | None = None  # PEM file of the CA (or the self-signed cert) to trust; enables TLS
    tls_server_name: str | None = None
    timeout_s: float = 3600.0
    connect_timeout_s: float = 10.0
    retries: int = 8  # backoff 0.5, 1, 2, 4, 8, then 10 s (jittered): ~45 s covers a server restart
    backoff_s: float = 0.5
    expected_teacher: str | None = None
    info: ServerInfo | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if ":" not in self.address:
            raise ValueError(f"address: expected HOST:PORT, got {self.address!r}")
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        if self.tls_ca:
            creds = grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes())
            self._channel = grpc.secure_channel(self.address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = teacher_pb2_grpc.TeacherServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise TeacherUnavailableError(
                f"teacher server {self.address}: not reachable within {self.connect_timeout_s:.0f} s; is "
                "`brts serve` running there (and TLS set the same on both sides)?") from None
        self.info = self.get_info()
        if self.expected_teacher and self.info.teacher_fingerprint != self.expected_teacher:
            self._channel.close()
            raise TeacherMismatchError(
                f"teacher server {self.address} serves {self.info.teacher_fingerprint}, expected "
                f"{self.expected_teacher}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pause(self, attempt: int) -> None:
        time.sleep(min(self.backoff_s * 2**attempt, 10.0) * (0.5 + random.random()))

    def _unary(self, method: Any, request: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries:
                    raise
                self._pause(attempt)
        raise AssertionError("unreachable")

    def get_info(self) -> ServerInfo:
        return _server_info(self._unary(self._stub.Info, teacher_pb2.InfoRequest()))

    def get_candidates(self, prompts: Sequence[Prompt], sampling: Sampling | None = None, logprob_k: int = 0,
                       cache_only: bool = False) -> Iterator[PromptCandidates]:
        """Yield one ``PromptCandidates`` per prompt as the server streams them (in any order); a broken stream
        is resumed for the prompts not yet received."""
        left = {p.prompt_id: p for p in prompts}
        if len(left) != len(prompts):
            raise ValueError("prompts: prompt_id values must be unique within a call")
        attempt = 0
        while left:
            request = teacher_pb2.CandidatesRequest(
                prompts=[teacher_pb2.PromptRequest(
                    prompt_id=p.prompt_id, prompt_ids=list(p.prompt_ids), ground_truth=p.ground_truth,
                    n_tier1=p.n_tier1, n_tier2=p.n_tier2, pool_offset=p.pool_offset, perturbation=p.perturbation,
                    perturb_slot=p.perturb_slot, tier2_keep_leaked=p.tier2_keep_leaked,
                    perturb_position=p.perturb_position) for p in left.values()],
                sampling=(sampling or Sampling()).message(), logprob_k=logprob_k,
                expected_teacher=self.expected_teacher or "", cache_only=cache_only, packed_tokens=True)
            try:
                for msg in self._stub.GetCandidates(request, timeout=self.timeout_s, metadata=self._metadata):
                    left.pop(msg.prompt_id, None)
                    yield _candidates(msg)
                    attempt = 0
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt >= self.retries:
                    raise
                self._pause(attempt)
                attempt += 1

    def score(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
              candidate_ids: Sequence[np.ndarray | None] | None = None, logprob_k: int = 0) -> list[ScoreResult]:
        """Teacher log-probs at given ids (exact, T=1) and its own top-K, per response position."""
        if len(sequences) != len(response_starts):
            raise ValueError("response_starts: one per sequence")
        request = teacher_pb2.ScoreRequest(logprob_k=logprob_k)
        for n, (seq, start) in enumerate(zip(sequences, response_starts)):
            item = request.items.add(token_ids=list(seq), response_start=int(start))
            if candidate_ids is not None and candidate_ids[n] is not None:
                to_proto(np.asarray(candidate_ids[n]), "int32", item.candidate_ids)
        reply = self._unary(self._stub.Score, request)
        return [ScoreResult(from_proto(r.topk_ids, "topk_ids"), from_proto(r.topk_logprobs, "topk_logprobs"),
                            from_proto(r.candidate_logprobs, "candidate_logprobs")
                            if r.candidate_logprobs.dtype else None)
                for r in reply.results]
