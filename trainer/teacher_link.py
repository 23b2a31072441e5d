"""The trainer's side of the teacher server: start-up checks, prefetched candidates, pipelined scoring.

Why a thread pool: GetCandidates for step s+1 is sent while step s still runs (the teacher works while the student
trains), and each micro-batch's Score is sent as soon as the student's top-K for it exists; the RPCs release the
GIL, so they overlap the student's forwards. Failures surface where the result is awaited, as ``TeacherDown``,
and the loop agrees on them across ranks before it checkpoints and stops.

Several teachers (``teachers:``, issue #26): one client per teacher; each prompt's requests go to the teacher its
route names (``trainer/routing.py``), so a call is split by teacher and its answers put back in the order asked
(``Routed``). A teacher that fails is named in ``TeacherDown``; there is never a fallback to another teacher.

Start-up checks (``check_server``, run once by ``brts train`` before any rank starts), for every teacher: it answers;
its tokenizer is the student's (the same fingerprint: same id↔token map); the student's logits fit the teacher's
``vocab_size``; it serves top-K as large as ``logprob_k``; the share of the first steps' prompts already
complete in its cache (a prompt-format mismatch with the prewarm shows as ~0 here); and that it scores one
sequence the same however it is batched (shared/agreement.py; refused above ``teacher_agreement_tolerance``).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np

from brts.shared.agreement import AgreementReport, check_agreement
from brts.shared.client import (
    Prompt,
    PromptCandidates,
    Sampling,
    ScoreResult,
    TeacherClient,
    TeacherMismatchError,
    TeacherUnavailableError,
)
from brts.shared.config import DEFAULT_TEACHER, SamplingConfig, TeacherConfig, TrainConfig
from brts.trainer.teacher_pool import needs_rescue, union_of

__all__ = ["Routed", "StartupError", "StartupReport", "TeacherDown", "TeacherLink", "check_server", "make_client",
           "sampling_of"]

HIT_SAMPLE_STEPS = 4
AGREEMENT_TEXT = "Question: what is 2 + 3? Answer: 5."  # the agreement check's prompt when no prompt is at hand


class StartupError(RuntimeError):
    """A check before training failed; the message is one line saying what to fix."""


class TeacherDown(RuntimeError):
    """A teacher server stopped answering during the run (after the client's retries); ``teacher`` names it."""

    def __init__(self, teacher: str, message: str) -> None:
        super().__init__(message)
        self.teacher = teacher


def sampling_of(s: SamplingConfig) -> Sampling:
    """The request's sampling, every field explicit (the pool key of a prewarm must be built from the same)."""
    return Sampling(s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed)


def make_client(entry: TeacherConfig, expected_teacher: str | None = None,
                connect_timeout_s: float = 10.0) -> TeacherClient:
    token = Path(entry.token_file).read_text().strip() if entry.token_file else None
    return TeacherClient(entry.address, token=token, tls_ca=entry.tls_ca, retries=entry.retries,
                         expected_teacher=expected_teacher or entry.expected_fingerprint,
                         connect_timeout_s=connect_timeout_s)


@dataclass
class Routed:
    """One call split by teacher: ``(teacher, positions in the call, future of its answers)`` per part."""

    parts: list[tuple[str, list[int], "Future[list[Any]]"]]
    size: int
    addresses: Mapping[str, str]

    def wait(self, what: str) -> list[Any]:
        """Every part's answers back in the order asked; ``TeacherDown`` naming the first teacher that failed."""
        out: list[Any] = [None] * self.size
        for name, positions, future in self.parts:
            for i, answer in zip(positions, _answer(future, name, self.addresses, what)):
                out[i] = answer
        return out


def _answer(future: "Future[Any]", name: str, addresses: Mapping[str, str], what: str) -> Any:
    """The future's value; a failed RPC becomes ``TeacherDown`` naming teacher ``name`` and its address."""
    try:
        return future.result()
    except TeacherDown:
        raise
    except (TeacherUnavailableError, grpc.RpcError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        code = exc.code().name if isinstance(exc, grpc.RpcError) else "UNAVAILABLE"
        raise TeacherDown(name, f"teacher {name} at {addresses[name]}: {what}: {code}: {detail}") from None


def _split(teachers: Sequence[str]) -> dict[str, list[int]]:
    """Positions per teacher, in call order (a teacher's requests keep their relative order)."""
    by: dict[str, list[int]] = {}
    for i, name in enumerate(teachers):
        by.setdefault(name, []).append(i)
    return by


class TeacherLink:
    """One client per teacher on each rank, plus a small thread pool for the asynchronous calls."""

    def __init__(self, config: TrainConfig, expected: Mapping[str, str] | None = None) -> None:
        """``expected``: the fingerprint per teacher that the launcher's preflight saw (a client refuses another)."""
        self.config = config
        self.entries = config.teacher_entries()
        self.clients: dict[str, TeacherClient] = {}
        try:
            for name, entry in self.entries.items():
                self.clients[name] = make_client(entry, (expected or {}).get(name))
        except BaseException:
            self.close_clients()
            raise
        self.sampling = {name: sampling_of(config.teacher_sampling(name)) for name in self.entries}
        self.addresses = {name: entry.address for name, entry in self.entries.items()}
        self._pool = ThreadPoolExecutor(max_workers=4 * len(self.entries), thread_name_prefix="teacher")
        # runs the two rounds of a cross-teacher pool (which wait on ``_pool``'s calls, so not on ``_pool`` itself)
        self._orchestrator = ThreadPoolExecutor(max_workers=2, thread_name_prefix="teacher-union")
        self._lock = threading.Lock()
        self._score_s = {name: 0.0 for name in self.entries}

    def fingerprints(self) -> dict[str, str]:
        """Every teacher's fingerprint as its server reports it (the checkpoint records them)."""
        return {n: c.info.teacher_fingerprint if c.info else "" for n, c in self.clients.items()}

    def _routed(self, teachers: Sequence[str], call: Callable[[str, list[int]], list[Any]]) -> Routed:
        parts = [(name, positions, self._pool.submit(call, name, positions))
                 for name, positions in _split(teachers).items()]
        return Routed(parts, len(teachers), self.addresses)

    def _get(self, name: str, asked: Sequence[Prompt]) -> list[PromptCandidates]:
        """One teacher's GetCandidates, its answers in the order asked (the stream's order is the server's)."""
        got = {r.prompt_id: r for r in self.clients[name].get_candidates(asked, self.sampling[name],
                                                                         self.config.logprob_k)}
        return [got[p.prompt_id] for p in asked]

    def candidates(self, prompts: Sequence[Prompt], teachers: Sequence[str]) -> Routed:
        """GetCandidates, each prompt at its teacher (``teachers[i]`` for ``prompts[i]``) with its sampling; with
        ``candidate_teachers``, each prompt's pool is the union of theirs (``_union``)."""
        if self.config.candidate_teachers:
            future = self._orchestrator.submit(self._union, prompts, teachers, self.config.candidate_teachers)
            return Routed([("", list(range(len(prompts))), future)], len(prompts), self.addresses)
        return self._routed(teachers, lambda name, positions: self._get(name, [prompts[i] for i in positions]))

    def _union(self, prompts: Sequence[Prompt], routes: Sequence[str], listed: Sequence[str]) -> list[Any]:
        """Cross-teacher pools, in two rounds (trainer/teacher_pool.py says why): every listed teacher's window
        without Tier 2, in parallel; then, where the whole union is wrong, the routed teacher's with it."""
        plain = [replace(p, n_tier2=0) for p in prompts]
        round1 = {name: self._pool.submit(self._get, name, plain) for name in listed}
        windows = {name: _answer(f, name, self.addresses, "GetCandidates") for name, f in round1.items()}
        per_prompt = [{name: windows[name][i] for name in listed} for i in range(len(prompts))]
        wrong = [i for i, w in enumerate(per_prompt) if needs_rescue(w) and prompts[i].n_tier2 > 0]
        round2 = {name: (idx, self._pool.submit(self._get, name, [prompts[wrong[j]] for j in idx]))
                  for name, idx in _split([routes[i] for i in wrong]).items()}
        rescues: dict[int, PromptCandidates] = {}
        for name, (idx, future) in round2.items():
            for j, answer in zip(idx, _answer(future, name, self.addresses, "GetCandidates (Tier 2)")):
                rescues[wrong[j]] = answer
        return [union_of(p.prompt_id, per_prompt[i], listed, rescues.get(i), routes[i])
                for i, p in enumerate(prompts)]

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], ids: Sequence[np.ndarray], k: int,
              teachers: Sequence[str]) -> Routed:
        """Score, each sequence by its prompt's teacher; the seconds each teacher took are summed per teacher."""
        def run(name: str, positions: list[int]) -> list[ScoreResult]:
            t = time.perf_counter()
            try:
                return self.clients[name].score([sequences[i] for i in positions], [starts[i] for i in positions],
                                                [ids[i] for i in positions], k)
            finally:
                with self._lock:
                    self._score_s[name] += time.perf_counter() - t

        return self._routed(teachers, run)

    def take_score_seconds(self) -> dict[str, float]:
        """Seconds of Score per teacher since the last call (the step's, once its scores are awaited)."""
        with self._lock:
            out, self._score_s = self._score_s, {name: 0.0 for name in self.entries}
        return out

    def close_clients(self) -> None:
        for client in self.clients.values():
            client.close()

    def close(self) -> None:
        self._orchestrator.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.close_clients()


@dataclass
class StartupReport:
    teacher_fingerprint: str
    engine: str
    model: str
    asked: int
    complete: int
    agreement: AgreementReport | None = None
    name: str = DEFAULT_TEACHER

    def line(self) -> str:
        rate = self.complete / self.asked if self.asked else 0.0
        agree = f"; {self.agreement.line()}" if self.agreement is not None else ""
        return (f"teacher {self.name}: {self.model} ({self.engine}, {self.teacher_fingerprint[:12]}): tokenizer and "
                f"vocabulary match; {self.complete}/{self.asked} of the first steps' prompts complete in its cache "
                f"({rate:.0%}){agree}")


def _student_vocab(student_dir: str) -> int:
    cfg = json.loads((Path(student_dir) / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"])


def check_server(config: TrainConfig, first_prompts: Mapping[str, Sequence[Prompt]]) -> list[StartupReport]:
    """All start-up checks against every teacher (``first_prompts``: the first steps' requests routed to each);
    raises StartupError (one line naming the teacher) on the first problem."""
    from brts.shared.tokenizer import load_tokenizer, tokenizer_fingerprint

    try:
        student_tok = load_tokenizer(config.student)
    except (OSError, ValueError) as exc:
        raise StartupError(f"student {config.student}: no loadable tokenizer ({exc})") from None
    fingerprints = {"student " + config.student: tokenizer_fingerprint(student_tok),
                    "prompt.tokenizer " + config.prompt.tokenizer:
                        tokenizer_fingerprint(load_tokenizer(config.prompt.tokenizer))}
    reports = []
    for name, entry in config.teacher_entries().items():
        try:
            client = make_client(entry, connect_timeout_s=10.0)
        except TeacherUnavailableError as exc:
            raise StartupError(f"teacher {name}: {exc}") from None
        except TeacherMismatchError as exc:  # the pinned expected_fingerprint is not what it serves
            raise StartupError(f"teacher {name}: {exc} (teachers.{name}.expected_fingerprint)") from None
        with client:
            prompts = list(first_prompts.get(name, ()))
            default = student_tok.encode(AGREEMENT_TEXT)
            reports.append(_check_teacher(config, name, client, fingerprints, prompts, default))
    pooled: dict[str, str] = {}
    for report in reports:
        if report.name in config.candidate_teachers:
            other = pooled.setdefault(report.teacher_fingerprint, report.name)
            if other != report.name:
                raise StartupError(f"candidate_teachers: {other} and {report.name} serve the same teacher "
                                   f"({report.teacher_fingerprint[:12]}): their pools would be identical; list one")
    return reports


def _check_teacher(config: TrainConfig, name: str, client: TeacherClient, fingerprints: Mapping[str, str],
                   first_prompts: Sequence[Prompt], agreement_ids: Sequence[int]) -> StartupReport:
    """One teacher's checks: tokenizer, vocabulary, top-K, the cache share of its first prompts, agreement."""
    info, where = client.info, f"teacher {name} at {client.address}"
    assert info is not None
    for what, fp in fingerprints.items():
        if fp != info.tokenizer_fingerprint:
            raise StartupError(
                f"tokenizer mismatch: {what} has fingerprint {fp[:12]}, {where} {info.tokenizer_fingerprint[:12]}; "
                "distillation needs the same id↔token map on both sides (use a student of the teacher's family; "
                "cross-tokenizer distillation is not supported)")
    vocab = _student_vocab(config.student)
    if vocab > info.vocab_size:
        raise StartupError(f"student vocab_size {vocab} exceeds the logits dimension {info.vocab_size} of {where}: "
                           "the student's top-K ids could not be scored")
    if config.logprob_k > info.max_logprob_k:
        raise StartupError(f"logprob_k: {config.logprob_k} exceeds the max of {info.max_logprob_k} of {where}")
    complete = 0
    if first_prompts:
        try:
            results = list(client.get_candidates(first_prompts, sampling_of(config.teacher_sampling(name)),
                                                 config.logprob_k, cache_only=True))
        except grpc.RpcError as exc:
            raise StartupError(f"{where} refused a candidates request: {exc.code().name}: {exc.details()}") from None
        complete = sum(r.missing == 0 for r in results)
    prompt = list(first_prompts[0].prompt_ids) if first_prompts else list(agreement_ids)
    try:
        agreement = check_agreement(client, prompt, info.dtype, config.teacher_agreement_tolerance)
    except grpc.RpcError as exc:
        raise StartupError(f"{where} refused the agreement check's Score: {exc.code().name}: {exc.details()}") \
            from None
    if not agreement.ok:
        raise StartupError(f"{agreement.line()}: {where} is not consistent enough to distil from; serve it in "
                           "float32, or set teacher_agreement_tolerance to accept it")
    return StartupReport(info.teacher_fingerprint, info.engine, info.model, len(first_prompts), complete,
                         agreement, name)
