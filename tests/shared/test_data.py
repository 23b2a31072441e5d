"""brts.shared.data: bundled DAPO and eval sets (real counts and defects), generic loaders, length filter."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brts.shared.data import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    EVAL_SETS,
    DataFormatError,
    Problem,
    dedupe_problems,
    filter_by_prompt_length,
    load_dapo,
    load_dataset,
    load_eval,
    load_problems,
)
from brts.shared.tokenizer import bundled_data_dir

# sha256 from SOURCES.md / DATA.md: the bundled files must be byte-identical copies.
BUNDLED_SHA256 = {
    "train/dapo-math-17k.parquet": "039f3afd689c846985bd2bf58e55a2210a8b08a1a9e1f60dbc07107a5f341925",
    "eval/aime24.jsonl": "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "eval/aime25.jsonl": "b4e273c02d3e7fe1b74b59eae768fc8230bfb0f79539890cb56f4361caac0331",
    "eval/amc23.jsonl": "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4",
    "tokenizers/qwen2.5-instruct/vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "tokenizers/qwen2.5-instruct/merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
    "tokenizers/qwen2.5-instruct/tokenizer_config.json":
        "5b5d4f65d0acd3b2d56a35b56d374a36cbc1c8fa5cf3b3febbbfabf22f359583",
    "tokenizers/deepseek-r1-distill-qwen/tokenizer_config.json":
        "8ac8c85fb242563c2260baec0909debd69d718af6a0b3d90e6cab62b4d341cd5",
}

# The 7 problem texts of DAPO-Math-17k that appear with two different ground truths (extra_info.index, answer).
CONFLICTING_ROWS = [
    [("af9089ec-686b-4471-ae02-8d196030763b", "64"), ("636fae25-b6f0-4a94-a00d-2509b4617fb3", "6")],
    [("f09110c9-c0cc-4f50-ba00-07e47208efbf", "15"), ("1f36792a-8d4e-45f3-a493-f06d0a3895be", "25")],
    [("31aeb632-4fb7-47a6-9729-0ead200fca1b", "99"), ("f18a1884-02f0-4542-a146-fab0f5824f98", "21")],
    [("8790d8ae-ed1d-4ae3-a5dc-b3bff1d87e35", "36"), ("ed3bff68-6bb8-411f-828b-68b566c766e2", "248")],
    [("93811b75-3617-48c4-8f68-9ec28b123425", "239"), ("4df93721-c6c4-41c6-a211-a8a9ffb6d988", "48")],
    [("4b61ebe1-64b0-43ff-a434-0f65dc6e486e", "108"), ("9e826881-59a2-4e97-8291-a1a826cf4ab0", "180")],
    [("cc639dd4-3163-4d29-ab20-66dce003e4c1", "-2"), ("d11a854f-5c91-4052-b6a5-932fc868214c", "-1")],
]


@pytest.fixture(scope="module")
def dapo() -> list[Problem]:
    return load_dapo()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- bundled files


def test_bundled_files_are_byte_identical_copies():
    root = bundled_data_dir()
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert found == set(BUNDLED_SHA256)
    for rel, digest in BUNDLED_SHA256.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel


# ------------------------------------------------------------------------------------------------ DAPO


def test_dapo_rows_ids_and_first_row(dapo):
    assert len(dapo) == 17_917
    assert len({p.id for p in dapo}) == 17_917
    assert {p.source for p in dapo} == {"dapo-math-17k"}
    first = dapo[0]
    assert first.id == "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"
    assert first.answer == "34"
    assert first.problem.startswith("In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$")
    assert first.problem.endswith("find $a + b + c$.")


def test_dapo_wrapper_is_fully_stripped(dapo):
    assert not any("Solve the following math problem step by step" in p.problem for p in dapo)
    assert not any("Remember to put your answer on its own line" in p.problem for p in dapo)


def test_dapo_answers_are_exact_strings_beyond_int64(dapo):
    answers = [p.answer for p in dapo]
    assert all(isinstance(a, str) and a.lstrip("-").isdigit() for a in answers)
    assert sum(a.startswith("-") for a in answers) == 366
    huge = sorted((a for a in answers if abs(int(a)) > 2**63 - 1), key=int)
    # The largest is the decimal expansion of a float (upstream artefact), kept digit for digit.
    assert huge == ["2000000000000000000000", "20000000000000000000000", "22099999999999998951424"]


def test_dedupe_real_counts(dapo):
    report = dedupe_problems(dapo)
    assert len({(p.problem, p.answer) for p in dapo}) == 17_405
    assert len(report.kept) == 17_405
    assert report.removed == 17_917 - 17_405 == 512
    assert len(report.conflicting) == 7
    kept_ids = {p.id for p in report.kept}
    by_id = {p.id: p for p in dapo}
    for group in CONFLICTING_ROWS:
        texts = {by_id[pid].problem for pid, _ in group}
        assert len(texts) == 1 and texts <= set(report.conflicting)
        for pid, answer in group:
            assert pid in kept_ids and by_id[pid].answer == answer  # every conflicting answer survives


def test_load_dapo_dedupe_warns_about_conflicts():
    with pytest.warns(UserWarning, match=r"removed 512 .* kept all rows of 7 problem texts"):
        kept = load_dapo(dedupe=True)
    assert len(kept) == 17_405


def test_dedupe_keeps_first_and_order():
    rows = [
        Problem("a", "p1", "1", "t"),
        Problem("b", "p2", "2", "t"),
        Problem("c", "p1", "1", "t"),  # repeat of a
        Problem("d", "p1", "9", "t"),  # same text, other answer: kept and reported
    ]
    report = dedupe_problems(rows)
    assert [p.id for p in report.kept] == ["a", "b", "d"]
    assert report.removed == 1
    assert report.conflicting == ["p1"]


def _dapo_table(contents: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "prompt": [{"content": c, "role": "user"}],
                "reward_model": {"ground_truth": str(i), "style": "x"},
                "extra_info": {"index": f"id-{i}"},
            }
            for i, c in enumerate(contents)
        ]
    )


def test_load_dapo_rejects_a_row_with_another_wrapper(tmp_path):
    good = DAPO_PREFIX + "What is 2+2?" + DAPO_SUFFIX
    path = tmp_path / "dapo.parquet"
    pq.write_table(_dapo_table([good, good.replace("Remember", "Please remember"), good]), path)
    with pytest.raises(DataFormatError, match=r"row 1: prompt does not carry the DAPO wrapper"):
        load_dapo(path)
    pq.write_table(_dapo_table([good]), path)
    assert load_dapo(path) == [Problem("id-0", "What is 2+2?", "0", "dapo-math-17k")]


# ------------------------------------------------------------------------------------------------ eval


def test_eval_sizes_and_sources():
    assert dict(EVAL_SETS) == {"aime24": 30, "aime25": 30, "amc23": 40}
    for name, size in EVAL_SETS.items():
        problems = load_eval(name)
        assert len(problems) == size
        assert {p.source for p in problems} == {name}
        assert all(isinstance(p.answer, str) for p in problems)


def test_aime24_keeps_zero_padding_and_file_ids():
    problems = load_eval("aime24")
    assert [p.id for p in problems] == [str(i) for i in range(60, 90)]
    assert problems[7].answer == "025"
    assert sum(p.answer.startswith("0") for p in problems) == 7


def test_aime25_form_feeds_are_repaired():
    problems = load_eval("aime25")
    assert not any("\x0c" in p.problem for p in problems)
    by_id = {p.id: p for p in problems}
    assert "\\frac" in by_id["18"].problem and "\\frac" in by_id["27"].problem
    assert [p.answer for p in problems[:3]] == ["70", "588", "16"]
    assert by_id["29"].answer == "240"


def test_amc23_float_answers_become_integers():
    problems = load_eval("amc23")
    assert problems[0].answer == "27"
    assert "-1" in {p.answer for p in problems}
    assert not any(p.answer.endswith(".0") for p in problems)


def test_unknown_eval_name_lists_the_allowed():
    with pytest.raises(ValueError, match="aime24, aime25, amc23"):
        load_eval("math500")


# --------------------------------------------------------------------------------------------- generic


def test_load_problems_jsonl_detects_question_and_final_answer(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl", [{"question": "1+1?", "final_answer": 2}, {"question": "half?", "final_answer": 2.5}]
    )
    problems = load_problems(path)
    assert problems == [Problem("0", "1+1?", "2", "mine"), Problem("1", "half?", "2.5", "mine")]


def test_load_problems_answers_are_never_squeezed_through_int64(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"problem": "a", "answer": 22099999999999998951424}\n{"problem": "b", "answer": 1e22}\n\n')
    assert [p.answer for p in load_problems(path)] == ["22099999999999998951424", "10000000000000000000000"]


def test_load_problems_explicit_fields_and_source(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "1+1?", "gt": "2", "uid": 7, "problem": "ignored"}])
    [p] = load_problems(path, problem_field="q", answer_field="gt", id_field="uid", source="custom")
    assert p == Problem("7", "1+1?", "2", "custom")
    with pytest.raises(DataFormatError, match=r"answer_field 'nope' not found; columns: q, gt, uid, problem"):
        load_problems(path, answer_field="nope")


def test_load_problems_verl_parquet_strips_the_dapo_wrapper(tmp_path):
    path = tmp_path / "verl.parquet"
    pq.write_table(_dapo_table([DAPO_PREFIX + "What is 2+2?" + DAPO_SUFFIX, "Plain problem?"]), path)
    problems = load_problems(path)
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        ("id-0", "What is 2+2?", "0"), ("id-1", "Plain problem?", "1")
    ]


def test_load_problems_bundled_jsonl_uses_file_ids():
    problems = load_problems(bundled_data_dir() / "eval" / "aime24.jsonl")
    assert [p.id for p in problems] == [p.id for p in load_eval("aime24")]


def test_load_problems_errors_name_file_row_and_columns(tmp_path):
    with pytest.raises(DataFormatError, match=r"unsupported file type '.csv'; allowed: .jsonl, .parquet"):
        load_problems(tmp_path / "x.csv")
    with pytest.raises(DataFormatError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: invalid JSON"):
        load_problems(bad)
    no_answer = write_jsonl(tmp_path / "na.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(DataFormatError, match=r"row 1: .*answer is missing"):
        load_problems(no_answer)
    empty_answer = write_jsonl(tmp_path / "ea.jsonl", [{"problem": "a", "answer": "  "}])
    with pytest.raises(DataFormatError, match=r"row 0: .*answer is empty"):
        load_problems(empty_answer)
    wrong_cols = write_jsonl(tmp_path / "wc.jsonl", [{"text": "a", "answer": "1"}])
    with pytest.raises(DataFormatError, match=r"columns: text, answer; accepted: problem, question, prompt"):
        load_problems(wrong_cols)
    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}]
    )
    with pytest.raises(DataFormatError, match=r"id '1' .* repeats in rows 0 and 1"):
        load_problems(dup)
    not_object = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(DataFormatError, match=r"list.jsonl:1: expected a JSON object"):
        load_problems(not_object)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match="contains no rows"):
        load_problems(empty)


def test_problem_is_frozen_and_validated():
    p = Problem("1", "x", "2", "s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.answer = "3"  # type: ignore[misc]
    with pytest.raises(ValueError, match="Problem.answer"):
        Problem("1", "x", 2, "s")  # type: ignore[arg-type]


def test_load_dataset_names_and_paths(tmp_path):
    assert len(load_dataset("aime25")) == 30
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"}])
    assert load_dataset(str(path)) == [Problem("0", "a", "1", "d")]
    with pytest.raises(ValueError, match=r"not a bundled name \(dapo, dapo-math-17k, aime24, aime25, amc23\)"):
        load_dataset("gsm8k")


def test_load_dataset_dapo_alias(dapo):
    assert load_dataset("dapo-math-17k")[:3] == dapo[:3]


# ------------------------------------------------------------------------------------------ length filter


def test_filter_by_prompt_length_partitions_in_order(qwen_spec):
    problems = [p for name in EVAL_SETS for p in load_eval(name)]
    limit = 150
    kept, dropped = filter_by_prompt_length(problems, qwen_spec, max_len=limit)
    assert kept and dropped
    assert len(kept) + len(dropped) == len(problems)
    order = {id(p): i for i, p in enumerate(problems)}
    assert [order[id(p)] for p in kept] == sorted(order[id(p)] for p in kept)
    assert all(len(qwen_spec.encode_batch([p.problem], check_length=False)[0]) <= limit for p in kept)
    assert all(len(qwen_spec.encode_batch([p.problem], check_length=False)[0]) > limit for p in dropped)
    # the default limit is the spec's own (1024): every eval prompt fits
    assert filter_by_prompt_length(problems, qwen_spec) == (problems, [])
    with pytest.raises(ValueError, match="max_len"):
        filter_by_prompt_length(problems, qwen_spec, max_len=0)


def test_dapo_frac_form_feed_is_repaired():
    from brts.shared.data import load_dapo, repair_dapo_text

    assert repair_dapo_text("x = \x0crac{1}{2}") == "x = \\frac{1}{2}"
    problems = load_dapo()
    assert not any("\x0crac" in p.problem for p in problems)
    assert sum("\\frac" in p.problem for p in problems) > 600
