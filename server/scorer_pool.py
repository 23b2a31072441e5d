"""Scorer replicas behind ``Score``: one exact scorer per entry of ``scorer_devices``, each fed whole micro-batches.

Why: ``Score`` runs at every training step of every run sharing a teacher, and on one scorer those runs queue behind
each other. With ``scorer_devices`` (``brts serve --scorer-devices cuda:1,cuda:2``) the server holds one
``TorchScorer`` per listed device, and the Score coalescer hands each micro-batch it forms, whole, to whichever
replica is free (``Coalescer`` in server/service.py), so up to N micro-batches run at once. A micro-batch is never
split across replicas: the micro-batch decides the padding, hence the last bits of the sums, so a replica returns for
it what one scorer would. Empty ``scorer_devices`` builds no pool: one scorer on ``device``, run on the coalescer's
own thread, as before.

Memory: every replica is one more copy of the teacher's weights on its device. The one exception is the hf engine:
the first replica whose device is the engine's own reuses the engine's model (the engine lends it to its scorer
today already), because a second copy on the same device would only cost memory.

Who uses what: ``runtime.scorer`` is replica 0 (``scorer_devices[0]``). The candidate pipeline (scorer-mode
re-scoring of fresh candidates) and the start-up probe call it directly, on their own threads, outside the pool:
that work belongs to GetCandidates, which has its own queue, and routing it through the pool would let one long
generation's re-scoring hold replicas that the trainers' per-step Score calls wait for. At start
(``check_agreement``), every replica scores one short fixed item on its own worker thread and must match replica 0
within the teacher dtype's engine tolerance: a replica on a broken device stops start-up with one line naming it.

Threads on CPU (measured with this venv's torch 2.13, an OpenMP build with MKL, two Python threads):
``torch.set_num_threads`` sets ONE process-wide count that every ATen parallel op reads, whichever thread runs it,
while MKL's GEMM count is per calling thread (``mkl_set_num_threads_local``; a thread that never set it takes the
process-wide count at its first ATen parallel op, and runs a GEMM before that at MKL's default); two Python threads
running ops at once each get their own OpenMP team. So N CPU replicas at the default count would run N teams of all
the cores' threads on those cores. The pool therefore sets the count once, to ``max(1, torch threads // CPU
replicas)`` (``cpu_threads_per_replica``), process-wide when it starts and on each CPU replica's own thread before
its first op (for MKL), and puts the previous count back when it closes. The engine's CPU work in the same process
runs ATen ops at that count too. The numbers do not depend on it: the toy teacher scored the same micro-batch
bit-identically at 1 and 2 threads; grouping the same items differently (other padding) moved log-probs by up to
6.2e-6 nats.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable, Sequence

import numpy as np

from brts.shared.engines.base import ScoreItem, Scorer, engine_tolerance

log = logging.getLogger("brts.serve")
_STOP = object()
__all__ = ["ScorerPool", "agreement_item", "check_agreement", "check_scorer_devices", "cpu_threads_per_replica"]


def check_scorer_devices(devices: Sequence[str]) -> tuple[str, ...]:
    """The devices as torch names (``cuda`` is ``cuda:0``), or a one-line ``ValueError`` naming ``scorer_devices[i]``,
    the device and the devices that exist. Reads what torch sees (no model loads); an empty list asks torch nothing."""
    if not devices:
        return ()
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = []
    for i, device in enumerate(devices):
        if device == "cpu":
            names.append("cpu")
            continue
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names_seen = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
            seen = (f"torch sees {count} CUDA device{'s' if count != 1 else ''} ({names_seen}"
                    f"{f', CUDA_VISIBLE_DEVICES={visible}' if visible is not None else ''}) and cpu" if count
                    else "torch sees no CUDA device here, only cpu")
            raise ValueError(f"scorer_devices[{i}]: {device} does not exist: {seen}")
        names.append(f"cuda:{index}")
    return tuple(names)


def cpu_threads_per_replica(devices: Sequence[str]) -> int | None:
    """Torch's intra-op thread count for CPU replicas: the cores torch uses now, shared evenly (at least one each);
    None when no replica is on the CPU (GPU replicas leave the count alone)."""
    import torch

    cpu = sum(1 for d in devices if d == "cpu")
    return max(1, torch.get_num_threads() // cpu) if cpu else None


class ScorerPool:
    """Scorer replicas, one worker thread each, and a queue of the free ones.

    ``acquire()`` blocks until a replica is free and reserves it; ``start(i, fn, done)`` runs ``fn(replica)`` on
    replica ``i``'s thread and calls ``done`` with its result or the exception it raised, after which the replica is
    free again; ``release(i)`` returns a reserved replica unused. ``replicas`` may be wrapped in place (the metrics
    time each one); ``devices[i]`` names replica ``i``. ``cpu_threads``: torch's intra-op count while the pool is
    open (module docstring), None to leave it alone. ``close()`` finishes the batches already started, then stops.
    """

    def __init__(self, replicas: Sequence[Scorer], devices: Sequence[str], cpu_threads: int | None = None) -> None:
        if not replicas or len(replicas) != len(devices):
            raise ValueError(f"replicas: need one per device and at least one; got {len(replicas)} for {len(devices)}")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads: must be >= 1 or None, got {cpu_threads!r}")
        self.replicas: list[Any] = list(replicas)
        self.devices = tuple(str(d) for d in devices)
        self._free: "queue.Queue[int]" = queue.Queue()
        self._inboxes: list["queue.Queue[Any]"] = [queue.Queue() for _ in self.replicas]
        self._lock = threading.Lock()
        self._closed = False
        self._cpu_threads, self._previous_threads = cpu_threads, None
        if cpu_threads is not None:
            import torch

            self._previous_threads = torch.get_num_threads()
            torch.set_num_threads(cpu_threads)  # process-wide: what every ATen parallel op reads
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"brts-scorer-{i}", daemon=True)
                         for i in range(len(self.replicas))]
        for i, thread in enumerate(self._threads):
            self._free.put(i)
            thread.start()

    def __len__(self) -> int:
        return len(self.replicas)

    def acquire(self) -> int:
        return self._free.get()

    def release(self, i: int) -> None:
        self._free.put(i)

    def start(self, i: int, fn: Callable[[Any], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn(replicas[i])`` on replica ``i``'s thread (reserved by ``acquire``); ``done(result or exception)``
        is called there. Raises RuntimeError once the pool is closed (the replica is not taken)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the scorer replicas are shut down (the server is stopping)")
            self._inboxes[i].put((fn, done))

    def each(self, fn: Callable[[Any], Any]) -> list[Any]:
        """``fn(replica)`` on every replica at once, each on its own thread: the results (or the exceptions) in
        replica order. Waits until every replica is free first (the start-up check)."""
        lanes = [self.acquire() for _ in self.replicas]
        results: list[Any] = [None] * len(lanes)
        finished = [threading.Event() for _ in lanes]

        def keep(lane: int) -> Callable[[Any], None]:
            def done(result: Any) -> None:
                results[lane] = result
                finished[lane].set()
            return done

        for lane in lanes:
            self.start(lane, fn, keep(lane))
        for event in finished:
            event.wait()
        return results

    def close(self) -> None:
        """Finish what was started, stop the threads, and put torch's previous thread count back."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for inbox in self._inboxes:
                inbox.put(_STOP)  # after any batch already handed over: those finish first
        for thread in self._threads:
            thread.join(timeout=300)
        if self._previous_threads is not None:
            import torch

            torch.set_num_threads(self._previous_threads)

    def _work(self, i: int) -> None:
        if self._cpu_threads is not None and self.devices[i] == "cpu":
            import torch

            torch.set_num_threads(self._cpu_threads)  # MKL's GEMM count is per calling thread: set it on this one
        inbox = self._inboxes[i]
        while True:
            job = inbox.get()
            if job is _STOP:
                return
            fn, done = job
            try:
                result = fn(self.replicas[i])
            except BaseException as exc:  # noqa: BLE001 - handed to the batch's waiters; the replica serves on
                result = exc
            try:
                done(result)
            except Exception:  # noqa: BLE001 - a broken callback must not take the replica down with it
                log.exception("scorer replica %d: delivering a result failed", i)
            finally:
                self._free.put(i)


def agreement_item(tokenizer: Any, text: str) -> ScoreItem:
    """A short fixed item for ``check_agreement``: ``text``'s tokens, every position after the first scored, with
    the actual next token as the one candidate id (so the check reads the same ids on every replica)."""
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    if len(ids) < 2:
        raise ValueError(f"the replica check text {text!r} must be at least 2 tokens long")
    return ScoreItem(ids, 1, np.asarray(ids[1:], dtype=np.int32)[:, None])


def check_agreement(pool: ScorerPool, item: ScoreItem, k: int, dtype: str) -> float:
    """Score ``item`` on every replica at once and return the largest gap to replica 0 in nats; a replica that
    raises, or whose top-``k`` or candidate log-probs differ from replica 0's by more than
    ``engine_tolerance(dtype)``, is a RuntimeError of one line naming ``scorer_devices[i]`` and its device."""
    outcomes = pool.each(lambda replica: replica.score([item], k)[0])
    for i, out in enumerate(outcomes):
        if isinstance(out, BaseException):
            first = (str(out).strip().splitlines() or [""])[0]
            raise RuntimeError(f"scorer_devices[{i}]: the scorer replica on {pool.devices[i]} failed its start-up "
                               f"check: {type(out).__name__}: {first}") from out
    bound, worst, ref = engine_tolerance(dtype), 0.0, outcomes[0]
    for i, out in enumerate(outcomes[1:], start=1):
        gap = max(_gap(ref.topk.logprobs, out.topk.logprobs), _gap(ref.candidate_logprobs, out.candidate_logprobs))
        if not gap <= bound:
            raise RuntimeError(f"scorer_devices[{i}]: the scorer replica on {pool.devices[i]} differs from replica 0 "
                               f"on {pool.devices[0]} by {gap:.3g} nats on the start-up check (allowed {bound:g} in "
                               f"{dtype}): that device does not compute the same model; check it or leave it out")
        worst = max(worst, gap)
    return worst


def _gap(a: Any, b: Any) -> float:
    """Largest |a - b|; equal values (-inf at the same place included) count 0, NaN or a lone inf count inf."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(a == b, 0.0, np.abs(a - b))
    if not diff.size:
        return 0.0
    return float(np.max(diff)) if np.isfinite(diff).all() else float("inf")
