"""Four clients at once against one `brts serve`: 100 mixed requests each, then the same 400 again from one client.

Why: the server is shared by several trainers, coalesces their calls into one engine or scorer batch and
generates a missing entry once however many ask for it at the same time (single flight). Sharing must not change
what anyone gets: every candidate served to the four concurrent clients (cache hits, and misses that one client
generated while others waited for it) must be byte-identical -- tokens and top-K ids and log-probs -- to what one
client alone gets for the same requests afterwards, and the server must have drawn each missing entry exactly once.

Score is compared with a tolerance: concurrent Score calls are coalesced into one scorer forward, so a sequence's
logits are computed in a batch of another size and padding than when it is scored alone; CPU matmul kernels
block and reduce differently for different shapes, so float32 log-probs may differ in the last bits (the exact
value is not what is promised, the value up to float rounding is). Tolerance: |delta log-prob| <= SCORE_ATOL, and
the top-K ids equal except where two log-probs tie within SCORE_ATOL.
"""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from forkserver import ForkServer, Teacher  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.shared.client import Prompt, TeacherClient  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.toy import make_problems, toy_prompt_spec  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SEED = 7
CLIENTS, REQUESTS = 4, 100
SCORE_ATOL = 2e-4  # log-probs are O(1..20) in float32; batched vs alone measured up to ~1e-5 apart here
CALL_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def tokenizer(toy_teacher_dir: Path) -> Any:
    """The toy teacher's tokenizer (the bundled Qwen2.5 one), to build prompts exactly as prewarm does."""
    from brts.shared.tokenizer import load_tokenizer

    return load_tokenizer(toy_teacher_dir)


def _candidates_key(result: Any) -> tuple:
    """What must be byte-identical in a served prompt (not its cache_hit/cached/seconds, which say who drew it)."""
    return (result.prompt_id, tuple(
        (c.tier, c.index, c.token_ids.astype("<i4").tobytes(), c.answer, c.correct, c.finish_reason,
         c.topk_ids.dtype.str, c.topk_ids.shape, c.topk_ids.tobytes(), c.topk_logprobs.dtype.str,
         c.topk_logprobs.tobytes())
        for c in result.candidates))


def _run(client: TeacherClient, request: tuple) -> Any:
    kind, *args = request
    if kind == "candidates":
        prompts, k = args
        results = {r.prompt_id: r for r in client.get_candidates(prompts, logprob_k=k)}
        assert set(results) == {p.prompt_id for p in prompts}
        for p in prompts:
            assert len(results[p.prompt_id].candidates) == p.n_tier1
            for c in results[p.prompt_id].candidates:
                assert c.topk_ids.shape == (c.token_ids.size, k) == c.topk_logprobs.shape
        return [(results[p.prompt_id].cache_hit, _candidates_key(results[p.prompt_id])) for p in prompts]
    seqs, starts, cands, k = args
    return client.score(seqs, starts, cands, logprob_k=k)


def _plans(tokenizer: Any, rng: random.Random) -> tuple[list[Prompt], list[list[tuple]], int]:
    """The prewarmed prompts, each client's 100 requests, and how many entries the misses must draw."""
    spec = toy_prompt_spec(tokenizer)
    problems = make_problems(12, seed=31)
    ids = [tuple(spec.encode(p.problem)) for p in problems]
    assert len(set(ids)) == len(ids)
    hot = [Prompt(f"h{n}", ids[n], problems[n].answer, n_tier1=2) for n in range(8)]  # prewarmed
    misses = [Prompt(f"m{n}", ids[n], problems[n].answer, n_tier1=2) for n in range(8, 12)]  # new prompts
    misses += [Prompt(f"o{n}", ids[n], problems[n].answer, n_tier1=1, pool_offset=2) for n in range(4)]  # new window
    to_draw = sum(p.n_tier1 for p in misses)
    scores = []
    for _ in range(12):
        picked = rng.sample(hot, rng.choice([1, 2]))
        seqs = [list(p.prompt_ids) + [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(4, 24))]
                for p in picked]
        starts = [len(p.prompt_ids) for p in picked]
        cands = [None if rng.random() < 0.5 else
                 np.array([[rng.randrange(-1, 1000) for _ in range(3)] for _ in range(len(s) - b)], dtype=np.int32)
                 for s, b in zip(seqs, starts)]
        scores.append(("score", seqs, starts, cands, rng.choice([4, 16])))
    plans = []
    for c in range(CLIENTS):
        requests: list[tuple] = [("candidates", [m], rng.choice([4, 16])) for m in misses]  # every client asks each
        requests += rng.choices(scores, k=30)
        while len(requests) < REQUESTS:
            picked = rng.sample(hot, rng.randint(1, 3))
            window = rng.choice([1, 2])
            prompts = [Prompt(f"{p.prompt_id}-c{c}-{len(requests)}", p.prompt_ids, p.ground_truth, n_tier1=window)
                       for p in picked]
            requests.append(("candidates", prompts, rng.choice([1, 4, 8, 16])))
        rng.shuffle(requests)
        plans.append(requests)
    return hot, plans, to_draw


def _gap(got: np.ndarray, ref: np.ndarray) -> float:
    """Max |got - ref| over the finite entries; both must be finite (or padding, -inf) in the same places."""
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(got))
    return float(np.max(np.abs(got[finite] - ref[finite]), initial=0.0))


def _same_scores(got: list, ref: list) -> float:
    """Max |delta log-prob| over every array; asserts the top-K ids agree up to ties within SCORE_ATOL."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert g.topk_ids.shape == r.topk_ids.shape
        worst = max(worst, _gap(g.topk_logprobs, r.topk_logprobs))
        last = r.topk_ids.shape[1] - 1
        for row, col in zip(*np.nonzero(g.topk_ids != r.topk_ids)):
            twin = np.flatnonzero(r.topk_ids[row] == g.topk_ids[row, col])
            if twin.size:  # the same id one place off: a near-tie swapped by rounding
                assert abs(r.topk_logprobs[row, twin[0]] - g.topk_logprobs[row, col]) <= SCORE_ATOL
            else:  # an id in or out of the last place: it tied with the K+1-th
                assert col == last and abs(r.topk_logprobs[row, col] - g.topk_logprobs[row, col]) <= SCORE_ATOL
        assert (g.candidate_logprobs is None) == (r.candidate_logprobs is None)
        if g.candidate_logprobs is not None:
            worst = max(worst, _gap(g.candidate_logprobs, r.candidate_logprobs))
    return worst


def test_four_concurrent_clients_get_what_one_client_gets(forks: ForkServer, toy_teacher_dir: Path,
                                                          tokenizer: Any, tmp_path: Path) -> None:
    hot, plans, to_draw = _plans(tokenizer, random.Random(SEED))
    server = Teacher(forks, toy_teacher_dir, tmp_path / "cache", tmp_path / "serve.log",
                     ["sampling.max_new_tokens=16", "sampling.temperature=1.0"])
    results: list[list[Any]] = [[None] * REQUESTS for _ in range(CLIENTS)]
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)
    try:
        with TeacherClient(server.address, timeout_s=CALL_TIMEOUT_S) as warm:
            prewarmed = list(warm.get_candidates(hot, logprob_k=16))
            assert len(prewarmed) == len(hot) and not any(r.cache_hit for r in prewarmed)

        def client(c: int) -> None:
            try:
                with TeacherClient(server.address, timeout_s=CALL_TIMEOUT_S, retries=0) as teacher:
                    start.wait(timeout=60)
                    for i, request in enumerate(plans[c]):
                        results[c][i] = _run(teacher, request)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not errors, errors[0]
        # some replies were drawn by this very call (a miss for its asker; the server's count below says each
        # missing entry was drawn once however many asked at the same time)
        drew = [hit for c in range(CLIENTS) for i, r in enumerate(plans[c]) if r[0] == "candidates"
                for hit, _ in results[c][i]]
        assert drew.count(False) >= 1

        worst = 0.0
        with TeacherClient(server.address, timeout_s=CALL_TIMEOUT_S, retries=0) as alone:
            for c in range(CLIENTS):
                for i, request in enumerate(plans[c]):
                    ref = _run(alone, request)
                    if request[0] == "candidates":
                        assert all(hit for hit, _ in ref)  # everything exists by now
                        assert [key for _, key in results[c][i]] == [key for _, key in ref], (c, i)
                    else:
                        worst = max(worst, _same_scores(results[c][i], ref))
        counts = server.stop()
    finally:
        if server.child.returncode is None:
            server.kill()
    print(f"Score: max |delta log-prob| concurrent vs alone = {worst:.3g}")
    assert worst <= SCORE_ATOL, worst
    assert counts["generated"] == 2 * len(hot) + to_draw  # the prewarm, then each missing entry exactly once
    scores = sum(r[0] == "score" for plan in plans for r in plan)
    assert counts["score_batches"] < 2 * scores  # concurrent Score calls really shared scorer batches
