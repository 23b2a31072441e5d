"""The toy arithmetic task and its fitted teacher: deterministic data, short prompts, real accuracy, caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from brts.shared.answers import extract_boxed
from brts.shared.data import Problem
from brts.shared.engines.base import SamplingParams
from brts.shared.hints import hinted_prompt_ids
from brts.toy import (
    QUALITIES,
    TOY_SOURCE,
    TOY_VOCAB_SIZE,
    evaluate_toy,
    fit_info,
    fit_toy_model,
    make_problems,
    parse_problem,
    toy_prompt_spec,
    toy_response,
)


def test_problems_are_deterministic_and_right() -> None:
    a, b = make_problems(50, seed=4), make_problems(80, seed=4)
    assert a == b[:50] and a != make_problems(50, seed=5)
    assert all(isinstance(p, Problem) and p.source == TOY_SOURCE for p in a)
    assert len({p.id for p in b}) == 80
    for p in b:
        x, op, y = parse_problem(p)
        assert 0 <= x <= 20 and 0 <= y <= 20 and int(p.answer) == (x + y if op == "+" else x - y)
        assert extract_boxed(toy_response(p)) == p.answer
    assert {parse_problem(p)[1] for p in b} == {"+", "-"} and any(int(p.answer) < 0 for p in b)
    assert toy_response(Problem("x", "What is 12-17?", "-5", TOY_SOURCE)) == "12-17=-5. \\boxed{-5}"
    with pytest.raises(ValueError, match="problem"):
        parse_problem("What is 2*3?")


def test_prompt_is_short_and_takes_a_hint(qwen_tokenizer: Any) -> None:
    spec = toy_prompt_spec(qwen_tokenizer)
    text = spec.render("What is 3+4?")
    assert text == "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    ids = spec.encode("What is 13+14?")
    assert len(ids) <= 20
    hinted = qwen_tokenizer.decode(hinted_prompt_ids(ids, "27", qwen_tokenizer))
    assert "VALIDATION_KEY" in hinted and hinted.endswith("<|im_start|>assistant\n")


def test_teacher_reaches_its_target_and_boxes(toy_teacher_dir: Path, hf_engine: Any, toy_tokenizer: Any) -> None:
    info = fit_info(toy_teacher_dir)
    assert info["exact_match"] >= QUALITIES["teacher"].target_accuracy
    problems = make_problems(64, seed=2024)  # not the fit's eval sample
    greedy = evaluate_toy(hf_engine, toy_tokenizer, problems, SamplingParams(temperature=0.0, max_new_tokens=24))
    assert greedy.boxed == 1.0
    assert greedy.accuracy >= 0.7, greedy
    # ... and imperfect: a random guess would be right ~1/80 of the time; the teacher is not an oracle either
    assert greedy.accuracy < 1.0 or info["exact_match"] < 1.0


def test_saved_teacher_is_a_full_vocabulary_model(toy_teacher_dir: Path, hf_engine: Any, toy_tokenizer: Any) -> None:
    model = hf_engine.model
    assert model.config.vocab_size == TOY_VOCAB_SIZE == hf_engine.vocab_size
    assert model.config.tie_word_embeddings and len(toy_tokenizer) <= TOY_VOCAB_SIZE
    spec = toy_prompt_spec(toy_tokenizer)
    p = make_problems(1, seed=9)[0]
    prompt = spec.encode(p.problem)
    response = toy_tokenizer.encode(toy_response(p), add_special_tokens=False) + [hf_engine.eos_token_ids[0]]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), -1)
    rows = logp[len(prompt) - 1 : -1]
    # ids the task never uses keep all-zero embedding rows (logit exactly 0); their total mass is small because
    # the fit's loss was the full-vocabulary one (a loss over the used ids only would leave them ~99.9%)
    active = model.get_input_embeddings().weight.abs().sum(-1) > 0
    assert 20 < int(active.sum()) < 1000 and set(prompt + response) <= set(active.nonzero().flatten().tolist())
    inactive_mass = rows[:, ~active].exp().sum(-1)
    assert float(inactive_mass.max()) < 0.01, inactive_mass
    assert float(rows.gather(1, torch.tensor(response)[:, None]).exp().min()) > 0.05  # it also knows the answer


def test_fit_is_cached_and_keyed_by_settings(tmp_path: Path) -> None:
    out = fit_toy_model(tmp_path / "s", quality="student", steps=6, eval_every=3, eval_size=8, batch_size=8)
    marker = json.loads((out / "toy_fit.json").read_text())
    assert marker["steps_run"] == 6 and marker["settings"]["hidden_size"] == QUALITIES["student"].hidden_size
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {"model.safetensors", "toy_fit.json"} <= set(written)
    # the same settings again: the fit is reused, nothing in the folder is written again (a re-fit rewrites both
    # the weights and the marker, so this holds on any machine, however fast the fit)
    assert fit_toy_model(tmp_path / "s", quality="student", steps=6, eval_every=3, eval_size=8, batch_size=8) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    # the folder loads as a normal checkpoint with its tokenizer and EOS ids
    from brts.shared.engines.hf import HFEngine

    engine = HFEngine.from_pretrained(out, device="cpu", dtype="float32")
    assert engine.eos_token_ids == (151645, 151643) and engine.vocab_size == TOY_VOCAB_SIZE
    assert QUALITIES["teacher"].key() != QUALITIES["student"].key()
    with pytest.raises(ValueError, match="quality"):
        fit_toy_model(tmp_path / "x", quality="oracle")
    with pytest.raises(ValueError, match="target_accuracy"):
        fit_toy_model(tmp_path / "x", target_accuracy=1.5)
    assert np.isfinite(marker["fit_seconds"])


def test_styles_render_the_same_answer_in_other_forms() -> None:
    from brts.toy_task import STYLES

    p = Problem("x", "What is 12-17?", "-5", TOY_SOURCE)
    texts = {style: toy_response(p, style) for style in STYLES}
    assert texts == {"work": "12-17=-5. \\boxed{-5}", "answer": "The answer is -5. \\boxed{-5}", "boxed": "\\boxed{-5}"}
    assert all(extract_boxed(t) == "-5" for t in texts.values())
    with pytest.raises(ValueError, match="style: must be distinct names from work, answer, boxed"):
        toy_response(p, "poem")
    with pytest.raises(ValueError, match="styles: must be distinct names"):
        fit_toy_model("/nonexistent", styles=("work", "work"))


def test_a_fit_in_several_styles_is_keyed_apart_and_one_style_keeps_the_old_key(tmp_path: Path) -> None:
    from brts.toy import ToyFitSettings, _encode_task

    # the keys every fit made before styles existed carries (the suite's cached fits): one style must not change them
    assert QUALITIES["teacher"].key().startswith("67f3f74c7217") and QUALITIES["student"].key().startswith("ef2e8f74")
    several = ToyFitSettings(styles=["work", "boxed"], max_operand=3)
    assert several.styles == ("work", "boxed") and several.key() != ToyFitSettings(max_operand=3).key()
    task = _encode_task(several)
    assert len(task.responses) == 2 and task.responses[0] != task.responses[1]
    out = fit_toy_model(tmp_path / "s", styles=("work", "answer"), max_operand=3, steps=4, eval_every=2, eval_size=8,
                        batch_size=8)
    marker = fit_info(out)
    assert marker["settings"]["styles"] == ["work", "answer"] and marker["steps_run"] == 4
