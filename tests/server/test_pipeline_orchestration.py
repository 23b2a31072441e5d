"""The tier rules (``brts.server.pipeline``), as tables and brute force, and as production runs them: through
``CandidateCache.get`` on a real LMDB in a tmp dir, with test doubles at the engine boundary.

The scripted engine answers from a table keyed by whether the prompt carries the hint or the perturbation, so
every branch (Tier-1 correct, Tier-2 rescue, Tier-2 leak, Tier-2 wrong, all-fail) is reached deterministically.
"""

from itertools import product

import numpy as np
import pytest

from brts.server.cache import CandidateCache
from brts.server.cache.keys import pool_address, sampling_key
from brts.server.pipeline import (
    DRAW,
    RESCORE,
    TIER1,
    TIER2,
    CandidatePipeline,
    PromptJob,
    entry_work,
    judged_when_drawn,
    perturbed_index,
    pool_sample_seed,
    scored_when_drawn,
    tier1_slots,
    tier2_fires,
    tier2_indices,
    tier2_kept,
)
from brts.shared.engines.base import Generation, SamplingParams, ScoreOutput
from brts.shared.hints import build_hint
from brts.shared.topk import TopK

PERTURB = " Think twice."
TEACHER, SEED, K = "teacher-scripted", 3, 4
SAMPLING = SamplingParams()


# -- the rules, pure ---------------------------------------------------------------------------------------------
def test_tier1_slots_are_the_window_with_one_perturbed_slot_brute_force():
    for n_tier1, offset, perturbation in product(range(1, 6), range(5), (None, PERTURB)):
        for slot in range(n_tier1) if perturbation else (0,):
            job = PromptJob("x", (1,), "1", n_tier1=n_tier1, pool_offset=offset, perturbation=perturbation,
                            perturb_slot=slot)
            slots = tier1_slots(job)
            assert [i for i, _ in slots] == list(range(offset, offset + n_tier1))
            flagged = [i for i, perturbed in slots if perturbed]
            assert flagged == ([] if perturbation is None else [offset + slot])
            assert perturbed_index(job) == (flagged[0] if flagged else None)


def test_tier2_indices_start_at_zero_whatever_the_window():
    for n_tier2, offset in product(range(4), range(3)):
        job = PromptJob("x", (1,), "1", n_tier1=2, n_tier2=n_tier2, pool_offset=offset)
        assert list(tier2_indices(job)) == list(range(n_tier2))


def test_tier2_fires_iff_asked_and_no_served_tier1_is_correct_brute_force():
    for n_tier2, size in product(range(3), range(5)):
        job = PromptJob("x", (1,), "1", n_tier1=1, n_tier2=n_tier2)
        for verdicts in product((False, True), repeat=size):
            expected = n_tier2 >= 1 and verdicts.count(True) == 0  # an empty window (nothing served) fires too
            assert tier2_fires(job, verdicts) is expected
            assert tier2_fires(job, iter(verdicts)) is expected  # a generator is enough


def test_what_is_judged_and_scored_when_drawn_table():
    table = [  # tier, verdict (None: not judged), judged, scored
        (TIER1, None, False, True),
        (TIER2, False, True, False),
        (TIER2, True, True, True),
    ]
    for tier, correct, judged, scored in table:
        assert judged_when_drawn(tier) is judged
        assert scored_when_drawn(tier, correct) is scored


def test_tier2_kept_truth_table_and_only_scored_attempts_are_kept():
    kept_rows = {(True, False, True, False), (True, False, True, True), (True, True, True, True)}
    for correct, leaked, scored, keep_leaked in product((False, True), repeat=4):
        kept = tier2_kept(correct, leaked, scored, keep_leaked)
        assert kept is ((correct, leaked, scored, keep_leaked) in kept_rows)
        if kept:  # "a Tier-2 attempt is scored only when it can be kept": whatever can be kept was scored
            assert scored_when_drawn(TIER2, correct)


def test_entry_work_table():
    table = [  # stored, stored top-K width (None: stored unscored), asked K, work
        (False, None, 4, DRAW),
        (True, None, 4, None),  # an unscored Tier-2 attempt stays unscored
        (True, 2, 4, RESCORE),
        (True, 4, 4, None),
        (True, 8, 4, None),  # the widest stored K is sliced
    ]
    for stored, stored_k, k, work in table:
        assert entry_work(stored, stored_k, k) == work


def test_pool_sample_seed_is_pinned():
    """Stored entries hold these seeds: a change here redraws every cache."""
    assert [pool_sample_seed(0, b"k", 1), pool_sample_seed(1, b"k", 1), pool_sample_seed(0, b"k", 2),
            pool_sample_seed(7, bytes(range(16)), 0), pool_sample_seed(2**40, "pool", 3)] == [
        1714078725, 955548925, 202390799, 371455258, 1721386394]
    assert pool_sample_seed(5, "pool", 9) == pool_sample_seed(5, b"pool", 9)
    assert all(0 <= pool_sample_seed(s, b"k", i) < 2**31 for s in range(4) for i in range(64))


def test_bad_jobs_name_the_problem():
    with pytest.raises(ValueError, match="prompt_ids must not be empty"):
        PromptJob("x", (), "1", n_tier1=1)
    with pytest.raises(ValueError, match="ground_truth is required"):
        PromptJob("x", (1,), "", n_tier1=1, n_tier2=1)
    with pytest.raises(ValueError, match="perturb_slot"):
        PromptJob("x", (1,), "1", n_tier1=2, perturbation="t", perturb_slot=2)
    with pytest.raises(ValueError, match="n_tier1"):
        PromptJob("x", (1,), "1", n_tier1=0)


# -- the rules through the cache ---------------------------------------------------------------------------------
class ScriptedEngine:
    name, vocab_size, max_context = "scripted", 151_936, 4096

    def __init__(self, tokenizer, tier1: dict, tier2: dict, eos: int):
        self.tok, self.tier1, self.tier2, self.eos = tokenizer, tier1, tier2, eos
        self.eos_token_ids = (eos,)
        self.calls: list[list] = []

    def generate(self, requests, sampling):
        self.calls.append(list(requests))
        out = []
        for req in requests:
            text = self.tok.decode(list(req.prompt_ids))
            hinted = "SILENT_VALIDATION_KEY" in text
            problem = text.split("PROBLEM:")[1].split("<|im_end|>")[0].strip()
            perturbed = PERTURB.strip() in text  # after the template (the end) or in the user turn
            problem = problem.removesuffix(PERTURB.strip()).strip()
            table = self.tier2 if hinted else self.tier1
            gens = []
            for seed in req.seeds:
                answer = table[problem](seed, perturbed)
                ids = tuple(self.tok.encode(answer, add_special_tokens=False)) + (self.eos,)
                gens.append(Generation(ids, "stop"))
            out.append(gens)
        return out

    def close(self):
        pass


class RecordingScorer:
    vocab_size = 151_936

    def __init__(self):
        self.items = []

    def score(self, items, k):
        self.items.extend(items)
        outs = []
        for item in items:
            rows = len(item.token_ids) - item.response_start
            ids = np.tile(np.arange(k, dtype=np.int32), (rows, 1))
            lps = np.tile(-np.arange(1, k + 1, dtype=np.float32), (rows, 1))
            outs.append(ScoreOutput(TopK(ids, lps), None))
        return outs


@pytest.fixture()
def setup(qwen_tokenizer, tmp_path):
    tok = qwen_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def prompt(problem):
        text = f"<|im_start|>user\nPROBLEM: {problem}<|im_end|>\n<|im_start|>assistant\n"
        return tuple(tok.encode(text, add_special_tokens=False))

    tier1 = {
        "easy": lambda seed, p: r"so \boxed{4}",  # always right
        "hard": lambda seed, p: r"so \boxed{0}",  # always wrong
        "leaky": lambda seed, p: r"so \boxed{1}",
        "stubborn": lambda seed, p: r"so \boxed{2}",
        "perturbed": lambda seed, p: r"\boxed{7}" if p else r"\boxed{8}",
    }
    tier2 = {
        "hard": lambda seed, p: r"careful algebra gives \boxed{9}",  # rescued
        "leaky": lambda seed, p: r"the validation key says 5, so \boxed{5}",  # correct but leaks
        "stubborn": lambda seed, p: r"still \boxed{3}",  # wrong even with the hint
        "easy": lambda seed, p: pytest.fail("Tier 2 must not run for a prompt with a correct Tier-1 sample"),
        "perturbed": lambda seed, p: r"\boxed{7}",
    }
    engine = ScriptedEngine(tok, tier1, tier2, eos)
    scorer = RecordingScorer()
    caches = []

    def cache(name="cache", keep_leaked=False):
        pipe = CandidatePipeline(engine, scorer, tok, SAMPLING, logprob_k=K, keep_leaked=keep_leaked)
        caches.append(CandidateCache(tmp_path / name, TEACHER, pipe, store_k=K))
        return caches[-1]

    yield tok, prompt, engine, scorer, cache
    for c in caches:
        c.close()


def _get(cache, jobs, k=K):
    return cache.get(jobs, SAMPLING, seed=SEED, k=k)


def _ids(cand):
    return tuple(int(t) for t in cand.token_ids)


def test_tiers_are_reached_as_the_rules_say(setup):
    tok, prompt, engine, scorer, cache = setup
    jobs = [
        PromptJob("e", prompt("easy"), "4", n_tier1=2, n_tier2=1),
        PromptJob("h", prompt("hard"), "9", n_tier1=2, n_tier2=2),
        PromptJob("l", prompt("leaky"), "5", n_tier1=2, n_tier2=1),
    ]
    easy, hard, leaky = _get(cache(), jobs)
    assert [c.correct for c in easy.candidates] == [True, True] and easy.tier2_drawn == 0
    assert [(c.tier, c.correct) for c in hard.candidates] == [(1, False), (1, False), (2, True), (2, True)]
    assert hard.tier2_drawn == 2 and hard.tier2_leaked == 0
    assert [c.tier for c in leaky.candidates] == [1, 1]  # the leaking rescue is recorded, not kept
    assert leaky.tier2_drawn == 1 and leaky.tier2_leaked == 1 and leaky.tier2_attempts[0].correct
    # one generation call for all of Tier 1, one for all of Tier 2 (only the all-wrong prompts)
    assert len(engine.calls) == 2 and len(engine.calls[0]) == 3 and len(engine.calls[1]) == 2
    assert all(c.answer is not None and c.topk is not None for r in (easy, hard) for c in r.candidates)


def test_scoring_context_is_the_original_prompt(setup):
    tok, prompt, engine, scorer, cache = setup
    job = PromptJob("h", prompt("hard"), "9", n_tier1=1, n_tier2=1)
    (result,) = _get(cache(), [job])
    hinted_text = tok.decode(list(engine.calls[1][0].prompt_ids))
    assert build_hint("9") in hinted_text  # the hint went to generation ...
    assert len(scorer.items) == 2
    for item, cand in zip(scorer.items, result.candidates):
        assert item.token_ids[: item.response_start] == job.prompt_ids  # ... never to scoring
        assert item.token_ids[item.response_start :] == _ids(cand)
        assert cand.topk.length == cand.token_ids.size and cand.topk.k == K


def test_perturbation_goes_to_one_slot_and_never_to_scoring(setup):
    tok, prompt, engine, scorer, cache = setup
    job = PromptJob("p", prompt("perturbed"), "7", n_tier1=3, n_tier2=1, perturbation=PERTURB, perturb_slot=1)
    (result,) = _get(cache(), [job])
    assert [(c.index, c.perturbed, c.correct) for c in result.candidates] == [
        (0, False, False), (1, True, True), (2, False, False)]
    assert result.tier2_drawn == 0  # the perturbed slot was right, so no rescue
    perturbed = [r for r in engine.calls[0] if tok.decode(list(r.prompt_ids)).endswith(PERTURB)]
    assert len(perturbed) == 1 and len(perturbed[0].seeds) == 1
    assert all(item.token_ids[: item.response_start] == job.prompt_ids for item in scorer.items)


def test_a_perturbation_in_the_user_turn_has_its_own_pool(setup):
    """Issue #23: perturb_position "user" puts the instruction after the user's content, before <|im_end|>; its
    pool is not the after_template pool (whose key, and so every existing cache, is unchanged)."""
    tok, prompt, engine, scorer, cache = setup
    c = cache()
    after = PromptJob("p", prompt("perturbed"), "7", n_tier1=2, perturbation=PERTURB, perturb_slot=1)
    user = PromptJob("p", prompt("perturbed"), "7", n_tier1=2, perturbation=PERTURB, perturb_slot=1,
                     perturb_position="user")
    (first,) = _get(c, [after])
    calls = len(engine.calls)
    (second,) = _get(c, [user])
    assert [(x.perturbed, x.correct, x.cached) for x in second.candidates] == [(False, False, True),
                                                                              (True, True, False)]
    (drawn,) = engine.calls[calls:]  # one new draw: the user-turn slot; the plain slot came from the cache
    assert len(drawn) == 1 and len(drawn[0].seeds) == 1
    assert tok.decode(list(drawn[0].prompt_ids)) == (
        "<|im_start|>user\nPROBLEM: perturbed Think twice.<|im_end|>\n<|im_start|>assistant\n")
    assert all(item.token_ids[: item.response_start] == user.prompt_ids for item in scorer.items)
    samp = sampling_key(SAMPLING, SEED)
    old = pool_address("perturbed", TEACHER, after.prompt_ids, samp, perturbation=PERTURB)
    assert pool_address("perturbed", TEACHER, after.prompt_ids, samp, perturbation=PERTURB,
                        perturb_position="after_template").key == old.key
    placed = pool_address("perturbed", TEACHER, after.prompt_ids, samp, perturbation=PERTURB, perturb_position="user")
    assert placed.key != old.key and not placed.header.matches(old.header)
    with pytest.raises(ValueError, match="perturb_position"):
        PromptJob("x", (1,), "1", n_tier1=2, perturbation="t", perturb_slot=1, perturb_position="system")


def test_a_wrong_tier2_attempt_is_stored_unscored_and_never_kept(setup):
    tok, prompt, engine, scorer, cache = setup
    c = cache()
    job = PromptJob("s", prompt("stubborn"), "6", n_tier1=1, n_tier2=2)
    (result,) = _get(c, [job])
    assert result.tier2_drawn == 2 and not any(a.correct or a.leaked for a in result.tier2_attempts)
    assert all(a.topk is None for a in result.tier2_attempts)  # stored without a top-K ...
    assert len(scorer.items) == 1 and [cand.tier for cand in result.candidates] == [TIER1]  # ... never scored
    (wider,) = _get(c, [job], k=2 * K)  # a wider K rescores the Tier-1 entry only: the attempts stay unscored
    assert c.rescored == 1 and len(engine.calls) == 2 and all(a.topk is None for a in wider.tier2_attempts)


def test_a_leaked_rescue_is_scored_and_kept_only_by_a_server_that_keeps_leaks(setup):
    tok, prompt, engine, scorer, cache = setup
    job = PromptJob("l", prompt("leaky"), "5", n_tier1=1, n_tier2=1)
    strict = cache("shared")
    (served,) = _get(strict, [job])
    assert [cand.tier for cand in served.candidates] == [TIER1] and served.tier2_attempts[0].topk is not None
    strict.close()  # another server on the same directory (LMDB is opened once per process)
    calls = len(engine.calls)
    (kept,) = _get(cache("shared", keep_leaked=True), [job])
    assert [(cand.tier, cand.leaked, cand.cached) for cand in kept.candidates] == [
        (TIER1, False, True), (TIER2, True, True)]
    assert len(engine.calls) == calls and kept.cache_hit  # served as stored: nothing drawn or scored again


def test_a_request_that_keeps_leaks_gets_the_leaked_rescue_from_a_strict_server(setup):
    """Issue #23: tier2_keep_leaked is per request; the stored entries do not change (the leak flag is stored), so
    the same cache serves both countings, and leaks are counted either way."""
    tok, prompt, engine, scorer, cache = setup
    c = cache()
    strict = PromptJob("l", prompt("leaky"), "5", n_tier1=1, n_tier2=1)
    keeping = PromptJob("l", prompt("leaky"), "5", n_tier1=1, n_tier2=1, keep_leaked=True)
    (kept,) = _get(c, [keeping])
    calls = len(engine.calls)
    (dropped,) = _get(c, [strict])
    assert [(x.tier, x.leaked) for x in kept.candidates] == [(TIER1, False), (TIER2, True)]
    assert [x.tier for x in dropped.candidates] == [TIER1]
    assert kept.tier2_leaked == dropped.tier2_leaked == 1 and len(engine.calls) == calls


def test_seeds_depend_on_pool_index_not_on_batch(setup):
    tok, prompt, engine, scorer, cache = setup
    alone = PromptJob("e", prompt("easy"), "4", n_tier1=2, pool_offset=2)
    _get(cache("alone"), [alone])
    seeds_alone = engine.calls[-1][0].seeds
    window = [PromptJob("h", prompt("hard"), "9", n_tier1=1), PromptJob("e", prompt("easy"), "4", n_tier1=4)]
    _get(cache("window"), window)
    seeds_window = engine.calls[-1][1].seeds
    assert seeds_alone == seeds_window[2:4]  # entries 2,3 of the pool are the same draws either way
    assert len(set(seeds_window)) == 4
    key = pool_address("tier1", TEACHER, alone.prompt_ids, sampling_key(SAMPLING, SEED)).key
    assert seeds_window == tuple(pool_sample_seed(SEED, key, i) for i in range(4))
