"""Bounded verification: equivalences, the hard time bound from any thread, and the kill path."""

import os
import signal
import threading
import time

import pytest

from brts.shared.verify import BoundedVerifier, answers_match_exactly, is_correct, is_correct_batch

# What a bounded call may take past its bound on a loaded machine (the kill, the replacement's spawn, the scheduler).
# The promise is "never hangs": a hang is forever, so any finite slack proves it; 5 s holds under a CPU hog.
SLACK_S = 5.0


def _ready(v: BoundedVerifier, timeout: float = 600.0) -> BoundedVerifier:
    """Wait until every idle worker has imported math-verify. A worker still importing at a call's bound answers
    "not correct, unsettled", so without this a test's verdict would depend on how fast the machine imports
    sympy; ``timeout`` is a hang guard only."""
    workers = []
    while not v._idle.empty():
        workers.append(v._idle.get_nowait())
    try:
        for worker in workers:
            assert v._wait_ready(worker, time.monotonic() + timeout), "a verifier worker never became ready"
    finally:
        for worker in workers:
            v._idle.put(worker)
    return v


@pytest.fixture(scope="module")
def verifier():
    """For the equivalence verdicts: a bound no sympy simplification here nears on a loaded machine (the bound
    itself is tested below with verifiers of their own)."""
    v = _ready(BoundedVerifier(timeout_s=60.0, workers=2).start())
    yield v
    v.close()


@pytest.mark.parametrize(
    "response, truth",
    [
        (r"\boxed{025}", "25"),
        (r"\boxed{27.0}", "27"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{(x+1)^2}", "x^2+2x+1"),
        (r"\boxed{22000000000000000000001}", "22000000000000000000001"),
        (r"\boxed{-366}", "-366"),
    ],
)
def test_equivalent_answers_are_correct(verifier, response, truth):
    assert is_correct("reasoning... " + response, truth, verifier) is True


@pytest.mark.parametrize(
    "response, truth",
    [
        (r"\boxed{22000000000000000000001}", "22000000000000000000000"),  # beyond int64, off by one
        (r"\boxed{26}", "25"),
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}"),
        ("the answer is 25", "25"),  # no box
        (r"\boxed{25", "25"),  # unbalanced
        (r"\boxed{25}", ""),  # no ground truth
    ],
)
def test_wrong_or_unboxed_answers_are_not_correct(verifier, response, truth):
    assert is_correct(response, truth, verifier) is False


def test_exact_fast_path_needs_no_worker():
    assert answers_match_exactly("025", "25") is True
    assert answers_match_exactly("24", "25") is False
    assert answers_match_exactly(r"\frac{1}{2}", "0.5") is None


def test_never_raises_on_garbage(verifier):
    assert is_correct(None, "3", verifier) is False  # type: ignore[arg-type]
    assert is_correct(r"\boxed{\frac{{{}", "3", verifier) is False
    assert is_correct(r"\boxed{\left( \right. ]}", r"\sqrt{2}", verifier) is False


def test_pathological_input_is_bounded_from_a_worker_thread():
    v = _ready(BoundedVerifier(timeout_s=5.0, workers=1).start())
    out: dict = {}

    def run():
        start = time.monotonic()
        out["result"] = is_correct(r"\boxed{9^{9^{9^{9}}}}", "34", v)
        out["seconds"] = time.monotonic() - start

    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert out["result"] is False
        assert out["seconds"] <= v.timeout_s + SLACK_S
        # the verifier still answers afterwards (with the worker that finished or its replacement, once ready)
        _ready(v)
        assert is_correct(r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", v) is True
    finally:
        v.close()


def test_a_hung_worker_is_killed_and_replaced():
    v = _ready(BoundedVerifier(timeout_s=2.0, workers=1).start())
    try:
        assert v.equivalent(r"\frac{1}{2}", "0.5") is True  # worker is up
        worker = v._idle.get_nowait()
        os.kill(worker.process.pid, signal.SIGSTOP)  # a worker stuck where no alarm can reach it
        v._idle.put(worker)
        start = time.monotonic()
        assert v.equivalent(r"\frac{3}{4}", "0.75") is False  # answered "not correct" at the bound
        assert time.monotonic() - start <= v.timeout_s + SLACK_S
        assert v.kills == 1
        assert worker.process.poll() is not None  # the stuck worker is gone
        # a timed-out pair stays "not correct" (memoised: a pathological answer costs the bound once): with the
        # replacement ready, an unmemoised call would compute 3/4 = 0.75 and answer True
        _ready(v)
        assert v.equivalent(r"\frac{3}{4}", "0.75") is False and v.kills == 1
        # ... and the replacement worker answers new pairs
        assert v.equivalent(r"\frac{6}{8}", "0.75") is True
    finally:
        v.close()


def test_batch_matches_single_calls(verifier):
    responses = [r"\boxed{1/2}", r"\boxed{3}", "none", r"\boxed{\pi}", r"\boxed{2\sqrt{2}}"]
    truths = [r"\frac{1}{2}", "4", "1", r"\pi", r"\sqrt{8}"]
    assert is_correct_batch(responses, truths, verifier) == [True, False, False, True, True]
    with pytest.raises(ValueError, match="ground_truths"):
        is_correct_batch(responses, truths[:2], verifier)


def test_closed_verifier_answers_false_without_raising():
    v = BoundedVerifier(timeout_s=1.0, workers=1)
    v.close()
    assert v.equivalent(r"\frac{1}{2}", "0.5") is False
    assert v.equivalent("7", "7") is True  # the exact path needs no worker


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        BoundedVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        BoundedVerifier(workers=0)
