"""Candidate pipeline orchestration with test doubles at the engine boundary (the real engines run elsewhere).

The scripted engine answers from a table keyed by whether the prompt carries the hint or the perturbation, so
every branch (Tier-1 correct, Tier-2 rescue, Tier-2 leak, all-fail) is reached deterministically.
"""

import numpy as np
import pytest

from brts.shared.engines.base import Generation, SamplingParams, ScoreOutput
from brts.server.pipeline import CandidatePipeline, PromptJob, derive_seed
from brts.shared.hints import build_hint
from brts.shared.topk import TopK

PERTURB = " Think twice."


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
            table = self.tier2 if hinted else self.tier1
            gens = []
            for seed in req.seeds:
                answer = table[problem](seed, text.endswith(PERTURB))
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
def setup(qwen_tokenizer):
    tok = qwen_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def prompt(problem):
        text = f"<|im_start|>user\nPROBLEM: {problem}<|im_end|>\n<|im_start|>assistant\n"
        return tuple(tok.encode(text, add_special_tokens=False))

    tier1 = {
        "easy": lambda seed, p: r"so \boxed{4}",  # always right
        "hard": lambda seed, p: r"so \boxed{0}",  # always wrong
        "leaky": lambda seed, p: r"so \boxed{1}",
        "perturbed": lambda seed, p: r"\boxed{7}" if p else r"\boxed{8}",
    }
    tier2 = {
        "hard": lambda seed, p: r"careful algebra gives \boxed{9}",  # rescued
        "leaky": lambda seed, p: r"the validation key says 5, so \boxed{5}",  # correct but leaks
        "easy": lambda seed, p: pytest.fail("Tier 2 must not run for a prompt with a correct Tier-1 sample"),
        "perturbed": lambda seed, p: r"\boxed{7}",
    }
    engine = ScriptedEngine(tok, tier1, tier2, eos)
    scorer = RecordingScorer()
    pipe = CandidatePipeline(engine, scorer, tok, SamplingParams(), logprob_k=4, seed=3)
    return tok, prompt, engine, scorer, pipe


def test_tiers_are_reached_as_the_rules_say(setup):
    tok, prompt, engine, scorer, pipe = setup
    jobs = [
        PromptJob("e", prompt("easy"), "4", n_tier1=2, n_tier2=1),
        PromptJob("h", prompt("hard"), "9", n_tier1=2, n_tier2=2),
        PromptJob("l", prompt("leaky"), "5", n_tier1=2, n_tier2=1),
    ]
    easy, hard, leaky = pipe.run(jobs)
    assert [c.correct for c in easy.candidates] == [True, True] and easy.tier2_drawn == 0
    assert [(c.tier, c.correct) for c in hard.candidates] == [(1, False), (1, False), (2, True), (2, True)]
    assert hard.tier2_drawn == 2 and hard.tier2_leaked == 0
    assert [c.tier for c in leaky.candidates] == [1, 1]  # the leaking rescue is recorded, not kept
    assert leaky.tier2_drawn == 1 and leaky.tier2_leaked == 1 and leaky.tier2_attempts[0].correct
    # one generation call for all of Tier 1, one for all of Tier 2 (only the all-wrong prompts)
    assert len(engine.calls) == 2 and len(engine.calls[0]) == 3 and len(engine.calls[1]) == 2
    assert all(c.answer is not None and c.topk is not None for r in (easy, hard) for c in r.candidates)


def test_scoring_context_is_the_original_prompt(setup):
    tok, prompt, engine, scorer, pipe = setup
    job = PromptJob("h", prompt("hard"), "9", n_tier1=1, n_tier2=1)
    (result,) = pipe.run([job])
    hinted_text = tok.decode(list(engine.calls[1][0].prompt_ids))
    assert build_hint("9") in hinted_text  # the hint went to generation ...
    assert len(scorer.items) == 2
    for item, cand in zip(scorer.items, result.candidates):
        assert item.token_ids[: item.response_start] == job.prompt_ids  # ... never to scoring
        assert item.token_ids[item.response_start :] == cand.token_ids
        assert cand.topk.length == len(cand.token_ids) and cand.topk.k == 4


def test_perturbation_goes_to_one_slot_and_never_to_scoring(setup):
    tok, prompt, engine, scorer, pipe = setup
    job = PromptJob("p", prompt("perturbed"), "7", n_tier1=3, n_tier2=1, perturbation=PERTURB, perturb_slot=1)
    (result,) = pipe.run([job])
    assert [(c.index, c.perturbed, c.correct) for c in result.candidates] == [(0, False, False), (1, True, True), (2, False, False)]
    assert result.tier2_drawn == 0  # the perturbed slot was right, so no rescue
    assert all(item.token_ids[: item.response_start] == job.prompt_ids for item in scorer.items)


def test_seeds_depend_on_pool_index_not_on_batch(setup):
    tok, prompt, engine, scorer, pipe = setup
    alone = PromptJob("e", prompt("easy"), "4", n_tier1=2, pool_offset=2)
    pipe.run([alone])
    seeds_alone = engine.calls[-1][0].seeds
    pipe.run([PromptJob("h", prompt("hard"), "9", n_tier1=1), PromptJob("e", prompt("easy"), "4", n_tier1=4)])
    seeds_window = engine.calls[-1][1].seeds
    assert seeds_alone == seeds_window[2:4]  # entries 2,3 of the pool are the same draws either way
    assert len(set(seeds_window)) == 4
    assert derive_seed(0, b"k", 1) != derive_seed(1, b"k", 1) != derive_seed(0, b"k", 2)


def test_bad_jobs_name_the_problem():
    with pytest.raises(ValueError, match="prompt_ids must not be empty"):
        PromptJob("x", (), "1", n_tier1=1)
    with pytest.raises(ValueError, match="ground_truth is required"):
        PromptJob("x", (1,), "", n_tier1=1, n_tier2=1)
    with pytest.raises(ValueError, match="perturb_slot"):
        PromptJob("x", (1,), "1", n_tier1=2, perturbation="t", perturb_slot=2)
    with pytest.raises(ValueError, match="n_tier1"):
        PromptJob("x", (1,), "1", n_tier1=0)
