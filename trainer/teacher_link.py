"""The trainer's side of the teacher server: start-up checks, prefetched candidates, pipelined scoring.

Why a thread pool: GetCandidates for step s+1 is sent while step s still runs (the teacher works while the student
trains), and each micro-batch's Score is sent as soon as the student's top-K for it exists; the RPCs release the
GIL, so they overlap the student's forwards. Failures surface where the result is awaited, as ``TeacherDown``,
and the loop agrees on them across ranks before it checkpoints and stops.

Start-up checks (``check_server``, run once by ``brts train`` before any rank starts): the server answers; its
tokenizer is the student's (the same fingerprint: same id↔token map); the student's logits fit the teacher's
``vocab_size``; it serves top-K as large as ``logprob_k``; the share of the first steps' prompts already
complete in its cache (a prompt-format mismatch with the prewarm shows as ~0 here); and that it scores one
sequence the same however it is batched (shared/agreement.py; refused above ``teacher_agreement_tolerance``).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np

from brts.shared.agreement import AgreementReport, check_agreement
from brts.shared.client import Prompt, PromptCandidates, Sampling, ScoreResult, TeacherClient, TeacherUnavailableError
from brts.shared.config import TrainConfig

__all__ = ["StartupError", "StartupReport", "TeacherDown", "TeacherLink", "check_server", "make_client", "sampling_of"]

HIT_SAMPLE_STEPS = 4
AGREEMENT_TEXT = "Question: what is 2 + 3? Answer: 5."  # the agreement check's prompt when no prompt is at hand


class StartupError(RuntimeError):
    """A check before training failed; the message is one line saying what to fix."""


class TeacherDown(RuntimeError):
    """The server stopped answering during the run (after the client's retries)."""


def sampling_of(config: TrainConfig) -> Sampling:
    s = config.sampling
    return Sampling(s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed)


def make_client(
    config: TrainConfig, expected_teacher: str | None = None, connect_timeout_s: float = 10.0
) -> TeacherClient:
    token = Path(config.server_token_file).read_text().strip() if config.server_token_file else None
    return TeacherClient(config.server, token=token, tls_ca=config.server_tls_ca, retries=config.server_retries,
                         expected_teacher=expected_teacher, connect_timeout_s=connect_timeout_s)


class TeacherLink:
    """One client per rank plus a small thread pool for the asynchronous calls."""

    def __init__(self, config: TrainConfig, expected_teacher: str | None = None) -> None:
        self.config = config
        self.client = make_client(config, expected_teacher)
        self.sampling = sampling_of(config)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="teacher")

    def candidates(self, prompts: Sequence[Prompt]) -> "Future[dict[str, PromptCandidates]]":
        def run() -> dict[str, PromptCandidates]:
            if not prompts:
                return {}
            return {r.prompt_id: r for r in self.client.get_candidates(prompts, self.sampling, self.config.logprob_k)}

        return self._pool.submit(run)

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], ids: Sequence[np.ndarray],
              k: int) -> "Future[list[ScoreResult]]":
        return self._pool.submit(self.client.score, sequences, starts, ids, k)

    @staticmethod
    def result(future: "Future[Any]", what: str) -> Any:
        """The future's value, or ``TeacherDown`` naming the call for a server that is gone or failing."""
        try:
            return future.result()
        except (TeacherUnavailableError, grpc.RpcError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            code = exc.code().name if isinstance(exc, grpc.RpcError) else "UNAVAILABLE"
            raise TeacherDown(f"{what}: {code}: {detail}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


@dataclass
class StartupReport:
    teacher_fingerprint: str
    engine: str
    model: str
    asked: int
    complete: int
    agreement: AgreementReport | None = None

    def line(self) -> str:
        rate = self.complete / self.asked if self.asked else 0.0
        agree = f"; {self.agreement.line()}" if self.agreement is not None else ""
        return (f"teacher {self.model} ({self.engine}, {self.teacher_fingerprint[:12]}): tokenizer and vocabulary "
                f"match; {self.complete}/{self.asked} of the first steps' prompts complete in its cache ({rate:.0%})"
                f"{agree}")


def _student_vocab(student_dir: str) -> int:
    cfg = json.loads((Path(student_dir) / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"])


def check_server(config: TrainConfig, first_prompts: Sequence[Prompt]) -> StartupReport:
    """All start-up checks against the running server; raises StartupError (one line) on the first problem."""
    from brts.shared.tokenizer import load_tokenizer, tokenizer_fingerprint

    try:
        client = make_client(config, connect_timeout_s=10.0)
    except TeacherUnavailableError as exc:
        raise StartupError(str(exc)) from None
    with client:
        info = client.info
        assert info is not None
        try:
            student_tok = load_tokenizer(config.student)
        except (OSError, ValueError) as exc:
            raise StartupError(f"student {config.student}: no loadable tokenizer ({exc})") from None
        for name, tok in (("student " + config.student, student_tok),
                          ("prompt.tokenizer " + config.prompt.tokenizer, load_tokenizer(config.prompt.tokenizer))):
            fp = tokenizer_fingerprint(tok)
            if fp != info.tokenizer_fingerprint:
                raise StartupError(
                    f"tokenizer mismatch: {name} has fingerprint {fp[:12]}, the teacher at {config.server} "
                    f"{info.tokenizer_fingerprint[:12]}; distillation needs the same id↔token map on both sides "
                    "(use a student of the teacher's family)")
        vocab = _student_vocab(config.student)
        if vocab > info.vocab_size:
            raise StartupError(f"student vocab_size {vocab} exceeds the teacher's logits dimension {info.vocab_size}: "
                               "the student's top-K ids could not be scored")
        if config.logprob_k > info.max_logprob_k:
            raise StartupError(f"logprob_k: {config.logprob_k} exceeds the server's max of {info.max_logprob_k}")
        complete = 0
        if first_prompts:
            try:
                results = list(client.get_candidates(first_prompts, sampling_of(config), config.logprob_k,
                                                     cache_only=True))
            except grpc.RpcError as exc:
                raise StartupError(f"teacher at {config.server} refused a candidates request: {exc.code().name}: "
                                   f"{exc.details()}") from None
            complete = sum(r.missing == 0 for r in results)
        prompt = list(first_prompts[0].prompt_ids) if first_prompts else student_tok.encode(AGREEMENT_TEXT)
        try:
            agreement = check_agreement(client, prompt, info.dtype, config.teacher_agreement_tolerance)
        except grpc.RpcError as exc:
            raise StartupError(f"teacher at {config.server} refused the agreement check's Score: "
                               f"{exc.code().name}: {exc.details()}") from None
        if not agreement.ok:
            raise StartupError(f"{agreement.line()}: the teacher at {config.server} is not consistent enough to "
                               "distil from; serve it in float32, or set teacher_agreement_tolerance to accept it")
        return StartupReport(info.teacher_fingerprint, info.engine, info.model, len(first_prompts), complete,
                             agreement)
