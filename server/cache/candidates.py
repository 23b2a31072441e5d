"""The candidate cache: append-only pools of teacher candidates, generated once, served forever.

``CandidateCache.get`` answers a batch of ``PromptJob`` windows (design.md §4). The cache stores; which entries
a prompt wants, when Tier 2 fires, what is scored and what is kept are the pipeline's rules
(``brts.server.pipeline``: ``tier1_slots``, ``tier2_fires``, ``scored_when_drawn``, ``tier2_kept``, ...):
1. read every wanted Tier-1 entry (``tier1_slots``) in one snapshot;
2. claim the ones with work to do (``entry_work``; single flight: an entry another thread is generating is waited
   for, not generated again), draw them all in one engine call with seeds from ``pool_sample_seed``, score them
   all in one scoring call (the exact scorer, or the engine in engine mode), and commit them in one transaction;
3. judge every entry's stored answer against THIS request's ground truth, and for the prompts where Tier 2 fires
   do the same for the Tier-2 attempts (their pool key holds the ground truth and the hint version);
4. build every reply from the bytes read back from LMDB, so a fresh reply and every later cached one are
   byte-identical.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from brts.server.cache.codec import CorruptEntryError, Entry, decode_entry, decode_pool, encode_entry, encode_pool
from brts.server.cache.faithful import record_tokenizer
from brts.server.cache.keys import PoolAddress, entry_key, name_key, pool_address, sampling_key
from brts.server.cache.store import DEFAULT_MAP_SIZE, CacheError, LmdbStore
from brts.server.pipeline import (
    DRAW,
    RESCORE,
    TIER1,
    TIER2,
    CandidatePipeline,
    CandidateRecord,
    EntryWork,
    PoolDraw,
    PromptJob,
    entry_work,
    judged_when_drawn,
    pool_sample_seed,
    scored_when_drawn,
    tier1_slots,
    tier2_fires,
    tier2_indices,
    tier2_kept,
)
from brts.shared.engines.base import SOURCE_SCORER, SamplingParams
from brts.shared.topk import TopK
from brts.shared.verify import answers_correct_batch

MAX_STORE_K = 64


class CacheCollisionError(CacheError):
    """A pool key's stored header describes another pool: a hash collision, refused instead of served."""


@dataclass
class ServedCandidate:
    """A candidate as served: decoded from the stored bytes, top-K sliced to the asked K, judged for this request."""

    tier: int
    index: int
    token_ids: np.ndarray
    answer: str | None
    correct: bool
    leaked: bool
    finish_reason: str
    topk: TopK | None
    cached: bool
    perturbed: bool = False
    source: str = SOURCE_SCORER  # where ``topk`` came from (stored with the entry; engines/base.py)


@dataclass
class ServedPrompt:
    """One prompt's reply: what the trainer distils from (``candidates``) and every hinted attempt, for counts."""

    prompt_id: str
    candidates: list[ServedCandidate]  # the Tier-1 window (entries that exist), then the kept Tier-2 attempts
    tier2_attempts: list[ServedCandidate] = field(default_factory=list)
    cache_hit: bool = True  # nothing was generated or rescored for this prompt by this call
    missing: int = 0  # wanted entries that do not exist (only with generate=False)
    seconds: float = 0.0

    @property
    def tier2_drawn(self) -> int:
        return len(self.tier2_attempts)

    @property
    def tier2_leaked(self) -> int:
        return sum(c.leaked for c in self.tier2_attempts)


@dataclass(frozen=True)
class _Want:
    job: PromptJob
    address: PoolAddress
    tier: int
    index: int
    perturbed: bool = False

    @property
    def key(self) -> bytes:
        return entry_key(self.address.key, self.index)


class CandidateCache:
    """LMDB-backed pools over a ``CandidatePipeline`` (``pipeline=None``: read only what exists)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        teacher: str,
        pipeline: CandidatePipeline | None = None,
        store_k: int = 16,
        logprob_dtype: str = "float16",
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        tokenizer_fingerprint: str | None = None,
    ) -> None:
        if not teacher:
            raise ValueError("teacher: the teacher fingerprint is required (entries are keyed by it)")
        if not 1 <= store_k <= MAX_STORE_K:
            raise ValueError(f"store_k: must be in 1..{MAX_STORE_K}, got {store_k}")
        self.store = LmdbStore(path, readonly=readonly, map_size=map_size)
        self.teacher, self.pipeline, self.store_k, self.logprob_dtype = teacher, pipeline, store_k, logprob_dtype
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future[None]] = {}
        self._engine_lock = threading.Lock()  # engines are not assumed thread-safe; the server batches anyway
        self.generated = 0  # entries drawn by this process (tests and benches read it)
        self.rescored = 0
        if tokenizer_fingerprint and not readonly:
            record_tokenizer(self.store, teacher, tokenizer_fingerprint)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "CandidateCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entry_count(self) -> int:
        with self.store.read() as txn:
            return int(txn.stat(self.store.db["entries"])["entries"])

    # -- public ---------------------------------------------------------------------------------------------------
    def get(self, jobs: Sequence[PromptJob], sampling: SamplingParams, seed: int, k: int,
            generate: bool = True) -> list[ServedPrompt]:
        """Serve the windows of ``jobs``; with ``generate=False`` nothing is drawn (``ServedPrompt.missing``)."""
        start = time.monotonic()
        if not 1 <= k <= MAX_STORE_K:
            raise ValueError(f"logprob_k: must be in 1..{MAX_STORE_K}, got {k}")
        if generate and self.pipeline is None:
            raise CacheError("cache: opened without a pipeline, so it cannot generate; pass generate=False")
        samp = sampling_key(sampling, seed)
        fetched1 = self._fetch(jobs, self._tier1_wants, samp, sampling, seed, k, generate)
        served = [ServedPrompt(job.prompt_id, cands, cache_hit=hit, missing=missing)
                  for job, (cands, hit, missing) in zip(jobs, fetched1)]
        retry = [n for n, job in enumerate(jobs) if tier2_fires(job, (c.correct for c in served[n].candidates))]
        server_keeps = self.pipeline.keep_leaked if self.pipeline is not None else False
        fetched2 = self._fetch([jobs[n] for n in retry], self._tier2_wants, samp, sampling, seed, k, generate)
        for n, (attempts, hit, missing) in zip(retry, fetched2):
            s = served[n]
            s.tier2_attempts = attempts
            keep_leaked = server_keeps or jobs[n].keep_leaked
            s.candidates.extend(c for c in attempts if tier2_kept(c.correct, c.leaked, c.topk is not None, keep_leaked))
            s.cache_hit = s.cache_hit and hit
            s.missing += missing
        elapsed = time.monotonic() - start
        for s in served:
            s.seconds = elapsed
        return served

    def _fetch(self, jobs: Sequence[PromptJob], wants_of: Callable[[PromptJob, dict], list[_Want]], samp: dict,
               sampling: SamplingParams, seed: int, k: int,
               generate: bool) -> list[tuple[list[ServedCandidate], bool, int]]:
        """One tier of every job: its wanted entries made to exist (unless not ``generate``), read back, judged
        against the job's ground truth. Per job: the served entries that exist, whether none of its wanted
        entries was made by this call (a cache hit), and how many wanted entries do not exist."""
        wants = [wants_of(job, samp) for job in jobs]
        got, fresh = self._ensure([w for ws in wants for w in ws], sampling, seed, k, generate)
        present = [[w for w in ws if w.key in got] for ws in wants]
        judged = self._judge(jobs, present, got)
        out = []
        for ws, here, verdicts in zip(wants, present, judged):
            cands = [self._serve(got[w.key], ok, k, w.key in fresh) for w, ok in zip(here, verdicts)]
            out.append((cands, not any(w.key in fresh for w in ws), len(ws) - len(here)))
        return out

    def _judge(
        self, jobs: Sequence[PromptJob], present: list[list[_Want]], got: dict[bytes, Entry]
    ) -> list[list[bool]]:
        """Every stored answer against its request's ground truth, in one verifier batch for the whole call."""
        answers = [got[w.key].answer for ws in present for w in ws]
        truths = [job.ground_truth for job, ws in zip(jobs, present) for _ in ws]
        flat = iter(self._verdicts(answers, truths))
        return [[next(flat) for _ in ws] for ws in present]

    def _verdicts(self, answers: Sequence[str | None], truths: Sequence[str]) -> list[bool]:
        """The one way answers are judged, at draw and when served: the extracted answer (what an entry stores),
        never the text, so a verdict depends on nothing the cache does not keep."""
        return answers_correct_batch(answers, truths, self._verifier)

    # -- wants ----------------------------------------------------------------------------------------------------
    @property
    def _verifier(self):  # noqa: ANN202 - BoundedVerifier | None
        return self.pipeline.verifier if self.pipeline is not None else None

    def _tier1_wants(self, job: PromptJob, samp: dict) -> list[_Want]:
        """The window's entries (``tier1_slots``): the perturbed slot from the perturbed pool, the rest from the
        plain pool."""
        plain = pool_address("tier1", self.teacher, job.prompt_ids, samp)
        wants = []
        for i, perturbed in tier1_slots(job):
            if perturbed:
                addr = pool_address("perturbed", self.teacher, job.prompt_ids, samp,
                                    perturbation=job.perturbation or "", perturb_position=job.perturb_position)
                wants.append(_Want(job, addr, TIER1, i, perturbed=True))
            else:
                wants.append(_Want(job, plain, TIER1, i))
        return wants

    def _tier2_wants(self, job: PromptJob, samp: dict) -> list[_Want]:
        addr = pool_address("tier2", self.teacher, job.prompt_ids, samp, ground_truth=job.ground_truth)
        return [_Want(job, addr, TIER2, j) for j in tier2_indices(job)]

    def _serve(self, entry: Entry, correct: bool, k: int, fresh: bool) -> ServedCandidate:
        topk = entry.topk.slice_k(min(k, entry.k)) if entry.topk is not None else None
        return ServedCandidate(entry.tier, entry.index, entry.token_ids, entry.answer, correct, entry.leaked,
                               entry.finish_reason, topk, cached=not fresh, perturbed=entry.perturbed,
                               source=entry.source)

    # -- reading --------------------------------------------------------------------------------------------------
    def _read(self, wants: Sequence[_Want]) -> dict[bytes, Entry]:
        found: dict[bytes, Entry] = {}
        checked: set[bytes] = set()
        with self.store.read(buffers=True) as txn:
            for w in wants:
                if w.address.key not in checked:
                    checked.add(w.address.key)
                    raw = txn.get(w.address.key, db=self.store.db["pools"])
                    if raw is None:
                        continue
                    header = decode_pool(raw, f"pool {w.address.key.hex()}")
                    if not header.matches(w.address.header):
                        raise CacheCollisionError(
                            f"cache: pool key {w.address.key.hex()} holds another pool ({header.kind}, "
                            f"{header.prompt_ids.size} prompt ids); refusing to serve it")
                raw = txn.get(w.key, db=self.store.db["entries"])
                if raw is not None:
                    found[w.key] = decode_entry(raw, f"entry {w.key.hex()}")
        return found

    @staticmethod
    def _work(w: _Want, found: dict[bytes, Entry], k: int) -> EntryWork | None:
        """``entry_work`` of a wanted entry, given what the last read found."""
        entry = found.get(w.key)
        return entry_work(entry is not None, entry.k if entry is not None and entry.topk is not None else None, k)

    # -- single flight --------------------------------------------------------------------------------------------
    def _ensure(self, wants: Sequence[_Want], sampling: SamplingParams, seed: int, k: int,
                generate: bool) -> tuple[dict[bytes, Entry], set[bytes]]:
        """Make every wanted entry exist (unless not ``generate``); return them as stored, and the ones made here."""
        unique = list({w.key: w for w in wants}.values())
        made: set[bytes] = set()
        while True:
            found = self._read(unique)
            todo = [w for w in unique if self._work(w, found, k) is not None] if generate else []
            if not todo:
                return found, made
            mine, waits = [], []
            with self._lock:
                for w in todo:
                    if w.key in self._inflight:
                        waits.append(self._inflight[w.key])
                    else:
                        self._inflight[w.key] = Future()
                        mine.append(w)
            if mine:
                try:
                    self._make(mine, found, sampling, seed, k)
                    made.update(w.key for w in mine)
                    error: BaseException | None = None
                except BaseException as exc:  # noqa: BLE001 - passed to the waiters, then re-raised
                    error = exc
                with self._lock:
                    for w in mine:
                        future = self._inflight.pop(w.key)
                        future.set_exception(error) if error is not None else future.set_result(None)
                if error is not None:
                    raise error
            for future in waits:
                future.exception()  # wait; a failed claim shows up as still missing on the next read

    def _make(self, wants: Sequence[_Want], found: dict[bytes, Entry], sampling: SamplingParams, seed: int,
              k: int) -> None:
        """Draw the missing entries (one engine call), score (one scorer call), commit (one transaction)."""
        assert self.pipeline is not None
        missing = [w for w in wants if self._work(w, found, k) == DRAW]
        rescore = [w for w in wants if self._work(w, found, k) == RESCORE]
        with self._engine_lock:
            made = self._draw(missing, sampling, seed, max(k, self.store_k))
            pairs = [(w.job.prompt_ids, record) for w, record, _, scored in made if scored]
            old = []
            for w in rescore:
                e = found[w.key]
                record = CandidateRecord(e.tier, e.index, tuple(int(t) for t in e.token_ids), e.finish_reason, "",
                                         e.answer)
                old.append((w, e, record))
                pairs.append((w.job.prompt_ids, record))
            self.pipeline.score(pairs, max(k, self.store_k))
        now = time.time()
        values: list[tuple[_Want, bytes]] = []
        for w, record, s, _ in made:
            entry = Entry(w.tier, w.index, np.asarray(record.token_ids, dtype=np.int32), record.finish_reason,
                          record.answer, record.leaked, record.perturbed, record.topk, seed=s, created=now,
                          source=record.source)
            values.append((w, encode_entry(entry, self.logprob_dtype)))
        for w, e, record in old:
            e.topk, e.source = record.topk, record.source
            values.append((w, encode_entry(e, self.logprob_dtype)))
        self._commit(values, now)
        self.generated += len(made)
        self.rescored += len(old)

    def _draw(self, missing: Sequence[_Want], sampling: SamplingParams, seed: int,
              k: int) -> list[tuple[_Want, CandidateRecord, int, bool]]:
        """Draw the missing entries in one engine call, one request per pool, with their ``pool_sample_seed``;
        per entry: the record, its seed, and whether it is scored (``scored_when_drawn``, after judging once
        the attempts whose scoring waits on a verdict, ``judged_when_drawn``, in one verifier batch)."""
        assert self.pipeline is not None
        groups: dict[tuple[bytes, bool], list[_Want]] = {}
        for w in missing:
            groups.setdefault((w.address.key, w.perturbed), []).append(w)
        draws = [
            PoolDraw(ws[0].job, ws[0].tier, tuple(w.index for w in ws),
                     tuple(pool_sample_seed(seed, w.address.key, w.index) for w in ws), perturbed=perturbed)
            for (_, perturbed), ws in groups.items()
        ]
        records_of = self.pipeline.draw(draws, sampling, k)
        drawn = [(w, record, s) for ws, records, d in zip(groups.values(), records_of, draws)
                 for w, record, s in zip(ws, records, d.seeds)]
        judge = [n for n, (w, _, _) in enumerate(drawn) if judged_when_drawn(w.tier)]
        verdicts = self._verdicts([drawn[n][1].answer for n in judge], [drawn[n][0].job.ground_truth for n in judge])
        correct: dict[int, bool] = dict(zip(judge, verdicts))
        return [(w, record, s, scored_when_drawn(w.tier, correct.get(n))) for n, (w, record, s) in enumerate(drawn)]

    def _commit(self, values: Sequence[tuple[_Want, bytes]], now: float) -> None:
        db = self.store.db

        def put_all(txn) -> None:  # noqa: ANN001 - lmdb.Transaction
            for w, value in values:
                if txn.get(w.address.key, db=db["pools"]) is None:
                    header = w.address.header
                    header.created = now
                    txn.put(w.address.key, encode_pool(header), db=db["pools"])
                txn.put(w.key, value, db=db["entries"])
                txn.put(name_key(w.job.prompt_id, w.address.key), w.job.ground_truth.encode(), db=db["names"])

        self.store.write(put_all)


def read_entry_checked(value: bytes | memoryview, what: str) -> Entry | None:
    """Decode a value, or None when it is damaged (for tools that report instead of raising)."""
    try:
        return decode_entry(value, what)
    except CorruptEntryError:
        return None
