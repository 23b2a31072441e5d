"""Cache housekeeping (``brts.server.cache.admin`` and ``brts cache ...``) on a real LMDB with two teachers.

The cache is built once per module from the engine-boundary doubles (``cache_doubles``): teacher-a holds plain
Tier-1 pools, a perturbed slot and a Tier-2 pool (problem 99 is always wrong without the hint), teacher-b two
Tier-1 pools, one on the same prompt as teacher-a. Every test works on its own copy of that directory and checks
the numbers against what ``CandidateCache.get`` returned when the cache was built.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from cache_doubles import job, make_pipeline  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.cli import main  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.server.cache import CandidateCache, CorruptEntryError, admin  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.server.cache.store import LmdbStore  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.shared.engines.base import SamplingParams  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.shared.tokenizer import bundled_tokenizer_dir  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=32)
A, B = "teacher-a", "teacher-b"
STORE_K = 16


def _jobs(tok):
    jobs_a = [
        job(tok, 3, 4, n_tier1=4),
        job(tok, 5, 6, n_tier1=3),
        job(tok, 99, 1, n_tier1=2, n_tier2=8),  # always wrong without the hint: a Tier-2 pool (one attempt leaks)
        job(tok, 8, 9, n_tier1=3, perturbation=" Check the sum twice.", perturb_slot=1),  # one perturbed slot
    ]
    jobs_b = [job(tok, 3, 4, n_tier1=2), job(tok, 7, 8, n_tier1=2)]
    return jobs_a, jobs_b


class Built:
    def __init__(self, path: Path, jobs: dict, served: dict) -> None:
        self.path, self.jobs, self.served = path, jobs, served


@pytest.fixture(scope="module")
def built(qwen_tokenizer, tmp_path_factory) -> Built:
    path = tmp_path_factory.mktemp("pristine") / "cache"
    jobs_a, jobs_b = _jobs(qwen_tokenizer)
    served = {}
    for teacher, jobs in ((A, jobs_a), (B, jobs_b)):
        with CandidateCache(path, teacher, make_pipeline(qwen_tokenizer), store_k=STORE_K) as cache:
            served[teacher] = cache.get(jobs, SAMPLING, seed=0, k=8)
    hard = served[A][2]
    assert hard.tier2_drawn == 8 and not any(c.correct for c in hard.candidates if c.tier == 1)
    return Built(path, {A: jobs_a, B: jobs_b}, served)


@pytest.fixture()
def cache_dir(built, tmp_path) -> Path:
    """A private copy of the built cache (tests damage, gc and compact it)."""
    dst = tmp_path / "work" / "cache"
    shutil.copytree(built.path, dst)
    return dst


def _cli(*args: str):
    return CliRunner().invoke(main, ["cache", *map(str, args)])


def _stored(prompt) -> list[tuple]:
    """Everything of a served prompt that comes from the stored bytes (not the cached flag)."""
    return [(c.tier, c.index, c.token_ids.tobytes(), c.topk.ids.tobytes() if c.topk is not None else None,
             c.topk.logprobs.tobytes() if c.topk is not None else None, c.answer, c.correct, c.leaked,
             c.perturbed, c.finish_reason) for c in prompt.candidates + prompt.tier2_attempts]


def _stored_entries(prompt) -> list:
    """The distinct stored entries behind a served prompt: its Tier-1 window and every Tier-2 attempt."""
    return [c for c in prompt.candidates if c.tier == 1] + list(prompt.tier2_attempts)


# -- stats ----------------------------------------------------------------------------------------------------------
def test_stats_counts_per_teacher_and_tier(built, cache_dir):
    s = admin.stats(cache_dir)
    served_a, served_b = built.served[A], built.served[B]
    row_a, row_b = s["teachers"][A], s["teachers"][B]
    assert set(s["teachers"]) == {A, B} and s["damaged"] == 0
    # teacher-a: 4 + 3 + 2 + 2 plain Tier-1 entries, 1 perturbed, 8 Tier-2 attempts; 4 + 1 + 1 pools
    assert (
        row_a["entries"], row_a["entries_tier1"], row_a["entries_perturbed"], row_a["entries_tier2"]
    ) == (20, 11, 1, 8)
    assert (row_a["pools_tier1"], row_a["pools_perturbed"], row_a["pools_tier2"]) == (4, 1, 1)
    attempts = served_a[2].tier2_attempts
    assert row_a["tier2_with_topk"] == sum(c.topk is not None for c in attempts) == 8  # hinted: all correct
    assert row_a["tier2_leaked"] == sum(c.leaked for c in attempts) and 0 < row_a["tier2_leaked"] < 8
    assert row_a["tokens"] == sum(c.token_ids.size for p in served_a for c in _stored_entries(p))
    assert row_a["max_k"] == STORE_K
    assert (row_b["entries"], row_b["entries_tier1"], row_b["pools_tier1"]) == (4, 4, 2)
    assert "entries_tier2" not in row_b and "pools_tier2" not in row_b
    assert row_b["tokens"] == sum(c.token_ids.size for p in served_b for c in _stored_entries(p))
    assert (s["pools"], s["entries"], s["tokens"]) == (8, 24, row_a["tokens"] + row_b["tokens"])
    assert s["prompt_names"] == 8  # (prompt id, pool) rows: p99_1 and p8_9 have two pools each under teacher-a
    assert s["disk_bytes"] > 0 and s["map_size"] >= s["disk_bytes"]
    assert row_a["bytes_per_token"] == round(row_a["value_bytes"] / row_a["tokens"], 2)
    for row, served in ((row_a, served_a), (row_b, served_b)):  # the doubles' numbers are the scorer's
        with_topk = [c for p in served for c in _stored_entries(p) if c.topk is not None]
        assert row["sources"] == {"scorer": {"entries": len(with_topk), "tokens": sum(c.token_ids.size
                                                                                       for c in with_topk)}}
    assert s["sources"] == {"scorer": {k: row_a["sources"]["scorer"][k] + row_b["sources"]["scorer"][k]
                                       for k in ("entries", "tokens")}}


def _mark_sources(path: Path, teacher: str, sources: list[str]) -> dict[str, dict[str, int]]:
    """Rewrite ``teacher``'s entries with a top-K, in key order, as if their numbers had come from ``sources``
    (cycled); returns the split ``stats`` should report."""
    from brts.server.cache.codec import decode_entry, decode_pool, encode_entry
    from brts.server.cache.keys import POOL_KEY_BYTES

    expected: dict[str, dict[str, int]] = {}
    with LmdbStore(path) as store:
        with store.read() as txn:
            pools = {bytes(k) for k, v in txn.cursor(db=store.db["pools"]) if decode_pool(v).teacher == teacher}
            entries = [(bytes(k), decode_entry(v)) for k, v in txn.cursor(db=store.db["entries"])
                       if bytes(k)[:POOL_KEY_BYTES] in pools]
        values = []
        for n, (key, entry) in enumerate(e for e in entries if e[1].topk is not None):
            entry.source = sources[n % len(sources)]
            row = expected.setdefault(entry.source, {"entries": 0, "tokens": 0})
            row["entries"] += 1
            row["tokens"] += int(entry.token_ids.size)
            values.append((key, encode_entry(entry, entry.topk.logprobs.dtype.name)))
        store.write(lambda txn: [txn.put(k, v, db=store.db["entries"]) for k, v in values])
    return expected


def test_stats_split_entries_with_a_topk_by_source(built, cache_dir):
    engine = ["engine-decode", "engine-decode", "engine-prefill", "scorer"]
    expected = _mark_sources(cache_dir, A, engine)
    s = admin.stats(cache_dir)
    assert s["teachers"][A]["sources"] == expected and list(expected) == ["engine-decode", "engine-prefill", "scorer"]
    assert list(s["teachers"][A]["sources"]) == ["scorer", "engine-decode", "engine-prefill"]  # one order always
    assert set(s["teachers"][B]["sources"]) == {"scorer"}
    assert s["sources"]["engine-decode"] == expected["engine-decode"]
    assert s["sources"]["scorer"]["entries"] == expected["scorer"]["entries"] + s["teachers"][B]["entries"]
    text = _cli("stats", cache_dir)
    assert text.exit_code == 0, text.output
    d, p = expected["engine-decode"], expected["engine-prefill"]
    assert (f"engine-decode {d['entries']} entries ({d['tokens']} tokens), engine-prefill {p['entries']} entries "
            f"({p['tokens']} tokens)") in text.output, text.output
    assert admin.verify(cache_dir)["ok"]  # rewritten entries are whole entries


# -- verify ---------------------------------------------------------------------------------------------------------
def _damage_one_entry(path: Path) -> bytes:
    """Flip one byte of one stored entry value (written back through LMDB); returns the entry's key."""
    with LmdbStore(path) as store:
        with store.read() as txn:
            key, value = next(iter(txn.cursor(db=store.db["entries"])))
            key, value = bytes(key), bytearray(value)
        value[len(value) // 2] ^= 0x40
        store.write(lambda txn: txn.put(key, bytes(value), db=store.db["entries"]))
    return key


def test_verify_finds_a_flipped_byte_and_the_cli_exits_1(built, cache_dir, qwen_tokenizer):
    clean = admin.verify(cache_dir)
    assert clean["ok"] and clean["problems"] == [] and clean["checked"] == 8 + 24  # pools + entries
    ok = _cli("verify", cache_dir)
    assert ok.exit_code == 0 and "no damage" in ok.output
    key = _damage_one_entry(cache_dir)
    report = admin.verify(cache_dir)
    assert not report["ok"] and len(report["problems"]) == 1
    assert key.hex() in report["problems"][0] and "checksum" in report["problems"][0]
    bad = _cli("verify", cache_dir)
    assert bad.exit_code == 1 and key.hex() in bad.output and "1 problems" in bad.output
    bad_json = _cli("verify", cache_dir, "--json")
    assert bad_json.exit_code == 1 and json.loads(bad_json.stdout)["problems"] == report["problems"]
    assert admin.stats(cache_dir)["damaged"] == 1
    # a damaged entry is refused, never served: whichever teacher's request reads it fails loudly
    errors = []
    for teacher in (A, B):
        with CandidateCache(cache_dir, teacher, readonly=True) as cache:
            try:
                cache.get(built.jobs[teacher], SAMPLING, seed=0, k=8, generate=False)
            except CorruptEntryError as exc:
                errors.append(str(exc))
    assert len(errors) == 1 and key.hex() in errors[0]


# -- inspect --------------------------------------------------------------------------------------------------------
def test_inspect_shows_a_prompts_pools_with_decoded_text(built, cache_dir, qwen_tokenizer):
    hard = built.served[A][2]
    pools = admin.inspect(cache_dir, prompt_id="p99_1", tokenizer=qwen_tokenizer)
    assert sorted(p["kind"] for p in pools) == ["tier1", "tier2"] and {p["teacher"] for p in pools} == {A}
    by_kind = {p["kind"]: p for p in pools}
    assert by_kind["tier2"]["ground_truth"] == "100" and by_kind["tier1"]["ground_truth"] == ""
    assert "PROBLEM: 99+1" in by_kind["tier1"]["prompt"]
    t1 = [c for c in hard.candidates if c.tier == 1]
    assert [(e["index"], e["answer"], e["text"]) for e in by_kind["tier1"]["entries"]] == \
        [(c.index, c.answer, qwen_tokenizer.decode(c.token_ids.tolist())) for c in t1]
    assert [(e["leaked"], e["k"]) for e in by_kind["tier2"]["entries"]] == \
        [(c.leaked, STORE_K) for c in hard.tier2_attempts]

    out = _cli("inspect", cache_dir, "--prompt-id", "p99_1", "--tokenizer", bundled_tokenizer_dir())
    assert out.exit_code == 0, out.output
    assert "tier2" in out.output and "ground truth '100'" in out.output and "PROBLEM: 99+1" in out.output
    assert repr(qwen_tokenizer.decode(t1[0].token_ids.tolist())) in out.output
    as_json = _cli("inspect", cache_dir, "--prompt-id", "p99_1", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == admin.inspect(cache_dir, prompt_id="p99_1")
    assert all("text" not in e for p in json.loads(as_json.stdout) for e in p["entries"])  # no tokenizer given
    by_text = _cli("inspect", cache_dir, "--text", "PROBLEM: 3+4", "--json")  # both teachers' pools of 3+4
    assert by_text.exit_code == 0 and sorted(p["teacher"] for p in json.loads(by_text.stdout)) == [A, B]
    missing = _cli("inspect", cache_dir, "--prompt-id", "nope")
    assert missing.exit_code == 1 and "no pool found" in missing.output and "'nope'" in missing.output
    both = _cli("inspect", cache_dir)
    assert both.exit_code == 1 and "--prompt-id" in both.output


# -- gc -------------------------------------------------------------------------------------------------------------
def test_gc_keeps_one_teacher_and_serves_it_byte_identically(built, cache_dir):
    out = _cli("gc", cache_dir, "--keep-teacher", A, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"pools_removed": 2, "entries_removed": 4, "kept_teacher": A}
    s = admin.stats(cache_dir)
    assert set(s["teachers"]) == {A} and (s["pools"], s["entries"], s["prompt_names"]) == (6, 20, 6)
    assert admin.verify(cache_dir)["ok"]
    with CandidateCache(cache_dir, A, readonly=True) as cache:
        again = cache.get(built.jobs[A], SAMPLING, seed=0, k=8, generate=False)
    assert [p.missing for p in again] == [0] * 4 and all(p.cache_hit for p in again)
    assert [_stored(p) for p in again] == [_stored(p) for p in built.served[A]]
    with CandidateCache(cache_dir, B, readonly=True) as cache:
        gone = cache.get(built.jobs[B], SAMPLING, seed=0, k=8, generate=False)
    assert [(p.candidates, p.missing) for p in gone] == [([], 2), ([], 2)]
    # a second gc finds nothing more to drop
    assert admin.gc(cache_dir, A) == {"pools_removed": 0, "entries_removed": 0, "kept_teacher": A}


def test_gc_with_an_unknown_teacher_fails_and_changes_nothing(cache_dir):
    before = list(admin.export_rows(cache_dir))
    out = _cli("gc", cache_dir, "--keep-teacher", "teacher-zzz")
    assert out.exit_code == 1
    assert "--keep-teacher" in out.output and "teacher-zzz" in out.output and f"{A}, {B}" in out.output
    with pytest.raises(ValueError, match="--keep-teacher"):
        admin.gc(cache_dir, "")
    assert list(admin.export_rows(cache_dir)) == before


# -- compact --------------------------------------------------------------------------------------------------------
def test_compact_to_a_new_directory_and_in_place(cache_dir, tmp_path):
    rows = list(admin.export_rows(cache_dir))
    assert len(rows) == 24
    out = tmp_path / "compacted"
    r = _cli("compact", cache_dir, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["to"] == str(out) and result["bytes_after"] <= result["bytes_before"]
    assert result["bytes_after"] == (out / "data.mdb").stat().st_size
    assert list(admin.export_rows(out)) == rows and admin.verify(out)["ok"]
    again = _cli("compact", cache_dir, "--out", out)  # not empty now
    assert again.exit_code == 1 and "--out" in again.output and str(out) in again.output

    # after a gc the freed pages are left in the file; compaction gives them back
    admin.gc(cache_dir, A)
    kept = list(admin.export_rows(cache_dir))
    size = sum(f.stat().st_size for f in cache_dir.glob("*.mdb"))
    r = _cli("compact", cache_dir, "--replace", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["to"] == str(cache_dir) and result["bytes_before"] == size
    assert result["bytes_after"] < result["bytes_before"]
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == ["cache"]  # no .compact or .old-* left behind
    assert list(admin.export_rows(cache_dir)) == kept and len(kept) == 20
    assert admin.verify(cache_dir)["ok"]


# -- export ---------------------------------------------------------------------------------------------------------
def _expected_rows(built) -> dict[tuple, dict]:
    """What each stored entry must export as, from the replies get() gave when the cache was built."""
    want = {}
    for teacher in (A, B):
        for job_, prompt in zip(built.jobs[teacher], built.served[teacher]):
            for c in _stored_entries(prompt):
                kind = "tier2" if c.tier == 2 else "perturbed" if c.perturbed else "tier1"
                want[(teacher, kind, job_.prompt_id, c.index)] = {
                    "tier": c.tier, "token_ids": c.token_ids.tolist(), "answer": c.answer, "correct": c.correct,
                    "leaked": c.leaked, "perturbed": c.perturbed, "finish_reason": c.finish_reason,
                    "topk_k": STORE_K, "ground_truth": job_.ground_truth,
                }
    return want


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_round_trips(built, cache_dir, tmp_path, suffix):
    out = tmp_path / f"rows{suffix}"
    r = _cli("export", cache_dir, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"rows": 24, "out": str(out)}
    assert not list(tmp_path.glob("*.partial"))
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    assert rows == list(admin.export_rows(cache_dir))
    want = _expected_rows(built)
    got = {}
    for row in rows:
        (name,) = row["prompt_names"]  # one request recorded per pool here
        got[(row["teacher"], row["kind"], name, row["index"])] = {k: row[k] for k in next(iter(want.values()))}
    assert got == want  # 24 rows: token ids, answers, flags, and correctness judged against the recorded truth
    assert sum(r["correct"] is True for r in rows if r["tier"] == 1) == \
        sum(c.correct for t in (A, B) for p in built.served[t] for c in p.candidates if c.tier == 1)
    hard_prompt = next(r for r in rows if r["kind"] == "tier2")["prompt_ids"]
    np.testing.assert_array_equal(hard_prompt, built.jobs[A][2].prompt_ids)
    assert {json.loads(r["sampling"])["temperature"] for r in rows} == {0.7}


def test_export_rejects_a_bad_suffix(cache_dir, tmp_path):
    r = _cli("export", cache_dir, tmp_path / "rows.csv")
    assert r.exit_code == 1 and "OUT" in r.output and "rows.csv" in r.output
    assert not (tmp_path / "rows.csv").exists()
    with pytest.raises(ValueError, match="OUT"):
        admin.export(cache_dir, tmp_path / "rows.txt")


# -- CLI smoke ------------------------------------------------------------------------------------------------------
def test_cli_stats_text_and_json(built, cache_dir):
    text = _cli("stats", cache_dir)
    assert text.exit_code == 0, text.output
    assert "8 pools, 24 entries" in text.output and f"teacher {A}: 20 entries" in text.output
    assert "tier2 8 of which 8 correct" in text.output and f"teacher {B}: 4 entries" in text.output
    as_json = _cli("stats", cache_dir, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == admin.stats(cache_dir)


def test_cli_missing_or_non_cache_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    for args in (["stats", missing], ["verify", missing], ["inspect", missing, "--prompt-id", "x"],
                 ["gc", missing, "--keep-teacher", A], ["compact", missing], ["export", missing, tmp_path / "x.jsonl"]):
        r = _cli(*args)
        assert r.exit_code == 2 and "does not exist" in r.output and "nowhere" in r.output, (args, r.output)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["stats", empty], ["verify", empty], ["export", empty, tmp_path / "x.jsonl"]):
        r = _cli(*args)
        assert r.exit_code == 1 and "no data.mdb" in r.output, (args, r.output)
    assert not list(empty.iterdir())  # read-only tools never create a cache
