"""Bounded answer verification: last-boxed extraction, then math-verify equivalence, in killable workers.

Why a worker process: math-verify's own timeout uses ``signal.alarm``, which only works in the main thread
(the gRPC server and the trainer call us from worker threads), and a hung sympy call, such as evaluating
``9^{9^{9^{9}}}``, cannot be interrupted inside the process at all. So the equivalence check runs in a
persistent child process with an address-space limit; the caller waits at most ``timeout_s`` for it and
kills and replaces the child when it overruns. ``is_correct`` never raises: anything that goes wrong is
"not correct".

Exact fast paths run in the caller first and answer most math problems without a worker: a missing box is
wrong, identical strings are right, and two integer spellings (``025``, ``27.0``, ``1,000``; ground truths
beyond 64 bits included) compare as Python ints.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from brts.shared.answers import extract_boxed, normalize_integer

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_LIMIT_MB = 4096
# Part of every memoised correctness key (the cache issue memoises per (answer, ground truth, version)):
# bump it when the comparison rules change.
VERIFIER_VERSION = "brts-verify-v1"


def answers_match_exactly(answer: str, ground_truth: str) -> bool | None:
    """Decide equivalence without sympy when it is certain: True/False, or None to ask math-verify."""
    if answer.strip() == ground_truth.strip():
        return True
    a, g = normalize_integer(answer), normalize_integer(ground_truth)
    if a is not None and g is not None:
        return a == g
    return None


@dataclass
class _Worker:
    process: subprocess.Popen
    buffer: bytes = b""
    ready: bool = False

    def send(self, message: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()

    def receive(self, deadline: float) -> object | None:
        """The next message, or None when ``deadline`` passes first; EOFError when the worker died."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("verification worker exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


class BoundedVerifier:
    """A pool of math-verify worker processes with a hard per-call time bound; safe to call from any thread."""

    def __init__(
        self,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        workers: int | None = None,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0 seconds, got {timeout_s}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        if memory_limit_mb < 256:
            raise ValueError(f"memory_limit_mb: must be >= 256, got {memory_limit_mb}")
        self.timeout_s = float(timeout_s)
        self.max_workers = workers or max(1, os.cpu_count() or 1)
        self.memory_limit_mb = memory_limit_mb
        # math-verify's in-process alarm fires a little before our kill, so most slow comparisons end cleanly
        # and the worker survives; the kill remains the guarantee.
        self._inner_timeout = max(1, int(self.timeout_s * 0.6))
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._count = 0
        self._lock = threading.Lock()
        self._closed = False
        self.kills = 0  # how many workers were killed for overrunning (observable in tests and logs)

    # -- worker management -------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        # A plain subprocess rather than multiprocessing: spawn/forkserver would re-import the caller's
        # __main__ in the child, and fork is unsafe next to gRPC's and torch's threads.
        process = subprocess.Popen(
            [sys.executable, "-m", "brts.shared._verify_worker", str(self.memory_limit_mb), str(self._inner_timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        return _Worker(process=process)

    def start(self) -> "BoundedVerifier":
        """Start every worker now (they import math-verify in the background) instead of on first use."""
        with self._lock:
            while self._count < self.max_workers and not self._closed:
                self._count += 1
                self._idle.put(self._spawn())
        return self

    def _acquire(self, deadline: float) -> _Worker | None:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._count < self.max_workers and not self._closed:
                self._count += 1
                return self._spawn()
        try:
            return self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def _discard(self, worker: _Worker, replace: bool) -> None:
        _stop(worker, graceful=False)
        with self._lock:
            if replace and not self._closed:
                self._idle.put(self._spawn())  # warm up the replacement right away
            else:
                self._count -= 1

    def _wait_ready(self, worker: _Worker, deadline: float) -> bool:
        if not worker.ready:
            worker.ready = worker.receive(deadline) == "ready"
        return worker.ready

    # -- the check ---------------------------------------------------------------------------------------
    def equivalent(self, answer: str, ground_truth: str) -> bool:
        """math-verify equivalence of two answer strings within ``timeout_s``; False on timeout or error."""
        exact = answers_match_exactly(answer, ground_truth)
        if exact is not None:
            return exact
        return _memo(self, answer, ground_truth)

    def _equivalent_in_worker(self, answer: str, ground_truth: str) -> tuple[bool, bool]:
        """(result, settled): ``settled`` is False when the answer came from waiting, not from computing."""
        if self._closed:
            return False, False
        deadline = time.monotonic() + self.timeout_s
        worker = self._acquire(deadline)
        if worker is None:
            return False, False
        try:
            if not self._wait_ready(worker, deadline):
                if worker.process.poll() is None:
                    self._idle.put(worker)  # still importing: let the next caller use it
                else:
                    self._discard(worker, replace=True)
                return False, False
            worker.send([answer, ground_truth])
            reply = worker.receive(deadline)
            if reply is not None:
                self._idle.put(worker)
                return reply is True, True
            self.kills += 1
            self._discard(worker, replace=True)
            return False, True
        except (EOFError, OSError, ValueError):
            self._discard(worker, replace=True)  # the worker died (e.g. out of memory): not correct
            return False, True

    def close(self) -> None:
        """Stop every worker; later calls return False (and still never raise)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            _stop(worker, graceful=True)


def _stop(worker: _Worker, graceful: bool) -> None:
    """End a worker: closing its stdin asks it to exit; a kill follows if it does not within a second."""
    try:
        if graceful and worker.process.stdin is not None:
            worker.process.stdin.close()
            worker.process.wait(timeout=1)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait(timeout=5)
    for stream in (worker.process.stdin, worker.process.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


@functools.lru_cache(maxsize=65536)
def _settled(verifier: BoundedVerifier, answer: str, ground_truth: str) -> bool:
    result, settled = verifier._equivalent_in_worker(answer, ground_truth)
    if not settled:
        raise _Unsettled(result)
    return result


class _Unsettled(Exception):
    """Raised through the memo so a result that only reflects a busy or starting pool is not remembered."""

    def __init__(self, result: bool) -> None:
        super().__init__()
        self.result = result


def _memo(verifier: BoundedVerifier, answer: str, ground_truth: str) -> bool:
    try:
        return _settled(verifier, answer, ground_truth)
    except _Unsettled as exc:
        return exc.result


_default: BoundedVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> BoundedVerifier:
    """The process-wide verifier (one worker per core), created on first use and stopped at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BoundedVerifier()
            atexit.register(_default.close)
        return _default


def is_correct(response_text: str, ground_truth: str, verifier: BoundedVerifier | None = None) -> bool:
    """Is the last ``\\boxed{}`` of ``response_text`` equivalent to ``ground_truth``? Never raises; bounded in time."""
    try:
        if not isinstance(ground_truth, str) or not ground_truth.strip():
            return False
        answer = extract_boxed(response_text)
        if answer is None:
            return False
        return (verifier or default_verifier()).equivalent(answer, ground_truth)
    except Exception:  # noqa: BLE001 - the contract is a bool, whatever the input
        return False


def is_correct_batch(
    responses: Sequence[str], ground_truths: Sequence[str], verifier: BoundedVerifier | None = None
) -> list[bool]:
    """``is_correct`` over many pairs, one thread per worker so every core verifies at once."""
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"ground_truths: expected {len(responses)} entries (one per response), got {len(ground_truths)}"
        )
    verifier = verifier or default_verifier()
    if len(responses) <= 1:
        return [is_correct(r, g, verifier) for r, g in zip(responses, ground_truths)]
    with ThreadPoolExecutor(max_workers=min(verifier.max_workers, len(responses))) as pool:
        return list(pool.map(lambda pair: is_correct(pair[0], pair[1], verifier), zip(responses, ground_truths)))


def answers_correct_batch(
    answers: Sequence[str | None], ground_truths: Sequence[str], verifier: BoundedVerifier | None = None
) -> list[bool]:
    """Judge already-extracted answers (None = nothing boxed) against ground truths, e.g. answers read back from
    the candidate cache, which stores the answer and never the verdict. Memoised per (answer, ground truth) in
    the verifier, whose version is ``VERIFIER_VERSION``."""
    if len(answers) != len(ground_truths):
        raise ValueError(f"ground_truths: expected {len(answers)} entries (one per answer), got {len(ground_truths)}")
    verifier = verifier or default_verifier()

    def judge(pair: tuple[str | None, str]) -> bool:
        answer, truth = pair
        if answer is None or not isinstance(truth, str) or not truth.strip():
            return False
        try:
            return verifier.equivalent(answer, truth)
        except Exception:  # noqa: BLE001 - the contract is a bool, whatever the input
            return False

    pairs = list(zip(answers, ground_truths))
    if len(pairs) <= 1:
        return [judge(p) for p in pairs]
    with ThreadPoolExecutor(max_workers=min(verifier.max_workers, len(pairs))) as pool:
        return list(pool.map(judge, pairs))
