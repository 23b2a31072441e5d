"""Scorer replicas behind Score (``scorer_devices``, server/scorer_pool.py).

The pool and the Score coalescer with test doubles only at the scorer boundary: micro-batches go whole to a free
replica, two run at once (each double holds its call until the test lets it go, so both are inside ``score``
together), every submission gets its own results in order, an exception fails only its own batch, close finishes
what was started; CPU thread counts while the pool is open; devices that do not exist; the start-up agreement
check. Then real scorers: two tiny-Qwen2 replicas return what one scorer returns for the same micro-batches; the
runtime's hf engine lends its model to replica 0 only; and `brts serve --scorer-devices cpu,cpu` on the toy
teacher answers concurrent clients with a direct ``TorchScorer``'s numbers, both replicas serving, while a device
that is not there ends `brts serve` with one line naming ``scorer_devices[0]``.

Tolerance: 1e-5 nats. The same micro-batch scored at 1 and at 2 torch threads, or on two copies of the weights,
was bit-identical here (0.0); grouping the same items differently (other padding) moved log-probs by up to
6.2e-6, and another machine's BLAS may split a GEMM differently at another thread count.
"""

from __future__ import annotations

import copy
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from server_proc import BRTS, ServerProcess, free_port  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.server.scorer_pool import ScorerPool, check_agreement, check_scorer_devices, cpu_threads_per_replica  # noqa: E402 - after the sys.path line
from brts.server.service import Coalescer  # noqa: E402 - after the sys.path line
from brts.shared.engines.base import ScoreItem  # noqa: E402 - after the sys.path line
from brts.shared.engines.scorer import TorchScorer  # noqa: E402 - after the sys.path line

TOL = 1e-5
WAIT_S = 60.0  # hang guards only: every wait below ends on an event


class Held:
    """A scorer double: records each call's items, announces the call on ``entered``, and holds it until its
    gate opens (``let_go``); answers ``"<name>:<item>"`` per item, or raises for an item named ``"bad"``."""

    vocab_size = 100

    def __init__(self, name: str, entered: "queue.Queue[tuple[str, list]]") -> None:
        self.name, self.entered, self.gate, self.calls = name, entered, threading.Event(), []
        self.threads: list[int] = []

    def let_go(self) -> None:
        self.gate.set()

    def score(self, items, k):
        self.calls.append(list(items))
        self.threads.append((torch.get_num_threads(), _mkl_threads()))
        self.entered.put((self.name, list(items)))
        assert self.gate.wait(WAIT_S), "the test never let this call go"
        if "bad" in items:
            raise ValueError("boom: this replica failed")
        return [f"{self.name}:{x}" for x in items]


def _mkl_threads() -> int | None:
    """MKL's GEMM thread count for the calling thread (per thread, unlike ATen's), None without MKL."""
    found = re.search(r"mkl_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info())
    return int(found.group(1)) if found else None


def _pool(n: int = 2, cpu_threads: int | None = None):
    entered: "queue.Queue[tuple[str, list]]" = queue.Queue()
    replicas = [Held(f"r{i}", entered) for i in range(n)]
    return ScorerPool(replicas, ["cpu"] * n, cpu_threads=cpu_threads), replicas, entered


def _coalescer(pool, window_s: float = 0.05) -> Coalescer:
    return Coalescer("test-score", lambda k, items, replica: replica.score(items, k), window_s, pool=pool)


def _result(sub):
    return sub.out.get(timeout=WAIT_S)


def test_micro_batches_go_whole_to_free_replicas_two_at_once_and_each_submission_gets_its_own_results():
    pool, (r0, r1), entered = _pool()
    co = _coalescer(pool)
    try:
        a = co.submit(4, ["a1", "a2"])
        assert entered.get(timeout=WAIT_S) == ("r0", ["a1", "a2"])
        b = co.submit(4, ["b1"])
        # both replicas are inside score() at once: neither call has been let go yet
        assert entered.get(timeout=WAIT_S) == ("r1", ["b1"])
        assert a.out.empty() and b.out.empty()
        # both busy: the coalescer waits for a free replica, so these pile up and leave together (one per key)
        c, d, e = co.submit(4, ["c1", "c2"]), co.submit(4, ["d1"]), co.submit(8, ["e1"])
        r0.let_go()
        assert _result(a) == ["r0:a1", "r0:a2"]
        assert entered.get(timeout=WAIT_S) == ("r0", ["c1", "c2", "d1"])
        assert _result(c) == ["r0:c1", "r0:c2"] and _result(d) == ["r0:d1"]
        assert entered.get(timeout=WAIT_S) == ("r0", ["e1"])  # the k=8 group: its own micro-batch
        assert _result(e) == ["r0:e1"]
        assert b.out.empty()  # r1 still holds b
        r1.let_go()
        assert _result(b) == ["r1:b1"]
    finally:
        r0.let_go()
        r1.let_go()
        co.close()
        pool.close()
    assert r0.calls == [["a1", "a2"], ["c1", "c2", "d1"], ["e1"]] and r1.calls == [["b1"]]
    assert co.calls == 4


def test_an_exception_in_one_replica_fails_only_its_own_batch():
    pool, (r0, r1), entered = _pool()
    co = _coalescer(pool)
    try:
        hold0 = co.submit(4, ["h0"])
        assert entered.get(timeout=WAIT_S) == ("r0", ["h0"])
        hold1 = co.submit(4, ["h1"])
        assert entered.get(timeout=WAIT_S) == ("r1", ["h1"])
        bad, good_neighbour = co.submit(4, ["bad"]), co.submit(4, ["x"])  # one micro-batch: both fail
        r0.let_go()
        assert _result(hold0) == ["r0:h0"]
        assert entered.get(timeout=WAIT_S) == ("r0", ["bad", "x"])
        failed = _result(bad)
        assert isinstance(failed, ValueError) and "boom" in str(failed)
        assert _result(good_neighbour) is failed
        r1.let_go()
        assert _result(hold1) == ["r1:h1"]  # the other replica's batch is untouched
        after = co.submit(4, ["y"])  # and the replica that raised serves on
        assert _result(after) in (["r0:y"], ["r1:y"])
    finally:
        r0.let_go()
        r1.let_go()
        co.close()
        pool.close()


def test_close_finishes_the_batch_in_flight_then_refuses_new_work():
    pool, (r0, _), entered = _pool()
    co = _coalescer(pool)
    sub = co.submit(4, ["z"])
    assert entered.get(timeout=WAIT_S) == ("r0", ["z"])
    co.close()  # the coalescer stops taking work; the batch already on r0 is still running
    closer = threading.Thread(target=pool.close)
    closer.start()
    r0.let_go()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert sub.out.get_nowait() == ["r0:z"]  # delivered before close() returned
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError, match="scorer replicas are shut down"):
        pool.start(0, lambda replica: None, lambda result: None)
    # a coalescer whose pool is gone hands that error to the submissions instead of hanging them
    late = _coalescer(pool)
    try:
        assert isinstance(_result(late.submit(4, ["w"])), RuntimeError)
    finally:
        late.close()


def test_cpu_replicas_run_at_their_share_of_the_threads_and_the_count_is_restored():
    before = torch.get_num_threads()
    share = 1 if before > 1 else 2  # a count different from the process's own
    pool, replicas, entered = _pool(2, cpu_threads=share)
    try:
        for r in replicas:
            r.let_go()
        results = pool.each(lambda replica: replica.score(["t"], 1))
        assert sorted(results) == [["r0:t"], ["r1:t"]]
        mkl = None if _mkl_threads() is None else share  # MKL's count is set on each replica's own thread
        assert [r.threads for r in replicas] == [[(share, mkl)], [(share, mkl)]]
    finally:
        pool.close()
    assert torch.get_num_threads() == before
    assert cpu_threads_per_replica(("cpu", "cpu", "cuda:1")) == max(1, before // 2)
    assert cpu_threads_per_replica(("cuda:0", "cuda:1")) is None


def test_a_device_that_is_not_there_is_named_with_what_exists(monkeypatch):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"^scorer_devices\[1\]: cuda:{count} does not exist: torch sees "):
        check_scorer_devices(("cpu", f"cuda:{count}"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 2-GPU machine, as torch would report it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_scorer_devices(("cuda:1", "cuda", "cpu")) == ("cuda:1", "cuda:0", "cpu")
    with pytest.raises(ValueError) as info:
        check_scorer_devices(("cuda:1", "cuda:0", "cuda:3"))
    assert str(info.value).startswith("scorer_devices[2]: cuda:3 does not exist: torch sees 2 CUDA devices "
                                      "(cuda:0..cuda:1")


# ---------------------------------------------------------------------------------------------------- real scorers


def _items(seed: int, n: int, vocab: int, k_cand: int = 4) -> list[ScoreItem]:
    rng = np.random.default_rng(seed)
    items = []
    for length in rng.integers(12, 60, n):
        start = int(rng.integers(1, length - 1))
        cand = rng.integers(0, vocab, (int(length) - start, k_cand)).astype(np.int32)
        items.append(ScoreItem(rng.integers(0, vocab, int(length)).tolist(), start, cand))
    return items


def assert_same_scores(got, want, tol: float = TOL) -> None:
    """Log-probs within ``tol``; top-K ids equal except inside a tie (the order of equal log-probs is free)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.topk.logprobs, w.topk.logprobs, rtol=0, atol=tol)
        np.testing.assert_allclose(g.candidate_logprobs, w.candidate_logprobs, rtol=0, atol=tol)
        lp = w.topk.logprobs
        tied = np.zeros(lp.shape, dtype=bool)
        close = np.abs(np.diff(lp, axis=1)) <= tol
        tied[:, 1:] |= close
        tied[:, :-1] |= close
        assert ((g.topk.ids == w.topk.ids) | tied).all()


class Recording:
    """A real scorer that keeps each micro-batch it was given with what it returned (to compare with one scorer)."""

    def __init__(self, inner: TorchScorer) -> None:
        self.inner, self.vocab_size, self.batches = inner, inner.vocab_size, []

    def score(self, items, k):
        out = self.inner.score(items, k)
        self.batches.append((list(items), k, out))
        return out


class Broken:
    """A replica on a device that fails (what a bad GPU raises from inside torch)."""

    vocab_size = 1000

    def score(self, items, k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")


def test_two_real_replicas_return_what_one_scorer_returns_for_the_same_micro_batches(tiny_qwen2):
    one = TorchScorer(tiny_qwen2)
    replicas = [Recording(TorchScorer(tiny_qwen2)), Recording(TorchScorer(copy.deepcopy(tiny_qwen2)))]
    pool = ScorerPool(replicas, ["cpu", "cpu"], cpu_threads=cpu_threads_per_replica(["cpu", "cpu"]))
    co = _coalescer(pool, window_s=0.0)
    requests = [_items(seed, 3, 1000) for seed in range(8)]
    try:
        subs = [co.submit(k, items) for k, items in zip((4, 8) * 4, requests)]
        replies = [_result(s) for s in subs]
    finally:
        co.close()
        pool.close()
    assert all(not isinstance(r, BaseException) for r in replies), replies
    assert all(r.batches for r in replicas)  # both replicas served
    for r in replicas:
        for items, k, out in r.batches:
            assert_same_scores(out, one.score(items, k))  # the same micro-batch on one scorer at the default threads
    for items, k, reply in zip(requests, (4, 8) * 4, replies):
        assert_same_scores(reply, one.score(items, k))


def test_the_start_up_check_names_a_replica_that_fails_or_disagrees(tiny_qwen2, tiny_qwen2_factory):
    item = _items(1, 1, 1000)[0]
    good = [TorchScorer(tiny_qwen2), TorchScorer(copy.deepcopy(tiny_qwen2))]
    other_weights = TorchScorer(tiny_qwen2_factory(seed=1))
    broken = Broken()
    for replicas, message in (
        (good, None),
        ([good[0], other_weights], r"^scorer_devices\[1\]: the scorer replica on cpu differs from replica 0 on cpu "
                                   r"by [0-9.e+-]+ nats on the start-up check \(allowed 0\.001 in float32\)"),
        ([good[0], good[1], broken], r"^scorer_devices\[2\]: the scorer replica on cpu failed its start-up check: "
                                     r"RuntimeError: CUDA error: an illegal memory access was encountered$"),
    ):
        pool = ScorerPool(replicas, ["cpu"] * len(replicas))
        try:
            if message is None:
                assert check_agreement(pool, item, 4, "float32") <= TOL
            else:
                with pytest.raises(RuntimeError, match=message):
                    check_agreement(pool, item, 4, "float32")
        finally:
            pool.close()


def test_the_hf_engine_lends_its_model_to_the_replica_on_its_own_device_only(toy_teacher_dir, tmp_path):
    from brts.server.runtime import build_runtime
    from brts.shared.config import ServerConfig, load_config

    before = torch.get_num_threads()
    config = load_config(ServerConfig, None, [], model=str(toy_teacher_dir), cache_dir=str(tmp_path / "cache"),
                         device="cpu", dtype="float32", scorer_devices="cpu,cpu")
    runtime = build_runtime(config)
    try:
        pool = runtime.scorer_pool
        assert pool is not None and pool.devices == ("cpu", "cpu")
        assert pool.replicas[0] is runtime.scorer is runtime.engine.scorer()  # the engine's own model: no copy
        assert pool.replicas[1].model is not runtime.engine.model  # a second copy of the weights
        assert torch.get_num_threads() == max(1, before // 2)
    finally:
        runtime.close()
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------------- brts serve


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_brts_serve_with_two_cpu_replicas_answers_concurrent_clients_like_one_scorer(toy_teacher_dir, tmp_path):
    from brts.shared.client import TeacherClient

    clients, calls, k, metrics_port = 4, 2, 8, free_port()
    # window 0: every call is its own micro-batch, the same batch the direct scorer below is given
    server = ServerProcess(toy_teacher_dir, tmp_path / "cache", ["--scorer-devices", "cpu,cpu", "batch_window_ms=0",
                                                                "--metrics-port", str(metrics_port)])
    work = [[_items(100 * c + i, 2, 151_643, k_cand=3) for i in range(calls)] for c in range(clients)]
    replies: dict[tuple[int, int], list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def ask(c: int) -> None:
        try:
            with TeacherClient(server.address) as client:
                barrier.wait(WAIT_S)
                for i, items in enumerate(work[c]):
                    replies[c, i] = client.score([it.token_ids for it in items], [it.response_start for it in items],
                                                 [it.candidate_ids for it in items], logprob_k=k)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=ask, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 5)
        samples = _scrape(metrics_port)
    finally:
        stopped = server.stop()
    assert not errors, errors
    direct = TorchScorer.from_pretrained(toy_teacher_dir, device="cpu", dtype="float32")
    for (c, i), got in sorted(replies.items()):
        want = direct.score(work[c][i], k)
        assert_same_scores([_as_output(r) for r in got], want)
    batches = [samples.get(("brts_scorer_replica_batches_total", frozenset({"replica": r, "device": "cpu"}.items())),
                           0.0) for r in ("0", "1")]
    assert batches[0] >= 1 and batches[1] >= 1 and sum(batches) == clients * calls  # both replicas served
    assert ServerProcess.counts(stopped)["score_batches"] == clients * calls
    assert any("2 scorer replicas on cpu, cpu agree with replica 0" in line for line in server.lines)


def _as_output(result):
    """A client ``ScoreResult`` as the scorer's ``ScoreOutput`` (what ``assert_same_scores`` reads)."""
    from brts.shared.engines.base import ScoreOutput
    from brts.shared.topk import TopK

    return ScoreOutput(topk=TopK(result.topk_ids, result.topk_logprobs), candidate_logprobs=result.candidate_logprobs)


def test_brts_serve_refuses_a_scorer_device_that_is_not_there_with_one_line(toy_teacher_dir, tmp_path):
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    r = subprocess.run([*BRTS, "serve", "--model", str(toy_teacher_dir), "--cache", str(tmp_path / "cache"),
                        "--port", "0", "--scorer-devices", f"{missing},cpu"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and "listening on" not in r.stdout, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"brts serve: scorer_devices[0]: {missing} does not exist: torch sees "), r.stderr
