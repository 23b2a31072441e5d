"""`brts cache verify --live N --server HOST:PORT`, both ways, for real: a cache written by the toy teacher matches
a live server of the same teacher, and does not match another teacher served under the same
`--teacher-fingerprint` name; a server whose tokenizer is not the one the cache was written with is refused with
one line before any comparison; a cache from before the tokenizer record compares only when told to.

The servers are real gRPC servers of real engines, run in this process (``RunningServer`` on a ``build_runtime``,
a second each); the cache under test is only ever read by the command (LMDB refuses one process two handles on a
folder, so each live server has a scratch cache of its own).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from brts.cli import main
from brts.server.app import RunningServer
from brts.server.cache.faithful import TOKENIZER_KEY, drift_report, recorded_tokenizer
from brts.server.cache.store import LmdbStore
from brts.server.runtime import build_runtime
from brts.shared.client import Prompt, Sampling, TeacherClient
from brts.shared.config import SamplingConfig, ServerConfig
from brts.shared.engines.base import ENGINE_TOLERANCE
from brts.toy import make_problems, toy_prompt_spec

NAME = "teacher-under-a-name"


class LiveServer:
    """``build_runtime`` + ``RunningServer`` on 127.0.0.1 (fp32 CPU, 16 new tokens), as ``brts serve`` builds them."""

    def __init__(self, model: Path, cache: Path) -> None:
        config = ServerConfig(model=str(model), cache_dir=str(cache), port=0, device="cpu", dtype="float32",
                              sampling=SamplingConfig(max_new_tokens=16, temperature=1.0))
        self.running = RunningServer(config).start().attach(build_runtime(config, teacher_override=NAME))
        self.address = self.running.address

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.running.stop(grace_s=5)


@pytest.fixture(scope="module")
def written(toy_teacher_dir: Path, tmp_path_factory, qwen_tokenizer) -> Path:
    """A cache the toy teacher wrote under NAME: 4 prompts x 2 Tier-1 samples, Tier 2 where all failed."""
    cache = tmp_path_factory.mktemp("live") / "cache"
    spec = toy_prompt_spec(qwen_tokenizer)
    prompts = [Prompt(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=2, n_tier2=1)
               for p in make_problems(4, seed=3)]
    with LiveServer(toy_teacher_dir, cache) as server, TeacherClient(server.address) as client:
        assert len(list(client.get_candidates(prompts, Sampling(), logprob_k=8))) == 4
    return cache


def _verify(cache: Path, server: LiveServer, *extra: str) -> Any:
    return CliRunner().invoke(main, ["cache", "verify", str(cache), "--live", "6", "--server", server.address,
                                     "--seed", "1", *extra])


def _copy_teacher(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_the_same_teacher_is_faithful(written: Path, toy_teacher_dir: Path, tmp_path: Path) -> None:
    with LiveServer(toy_teacher_dir, tmp_path / "scratch") as server:
        result = _verify(written, server, "--json")
    assert result.exit_code == 0, result.output
    live = json.loads(result.stdout)["live"]
    print(live["line"])  # shown with -s: the figure for the notes
    assert live["faithful"] and live["candidates"] == 6 and live["positions"] > 6
    assert live["drift"] <= live["tolerance"] and live["rounding"] > 0  # float16 storage: its rounding is allowed


def test_another_teacher_under_the_same_name_is_caught(written: Path, toy_teacher_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    other = _copy_teacher(toy_teacher_dir, tmp_path / "other-teacher")
    model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # a retrained teacher: same shapes and tokenizer, other numbers
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    with LiveServer(other, tmp_path / "scratch") as server:
        result = _verify(written, server)
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("live:")]
    assert f"of teacher {NAME}" in line and "DRIFTED" in line, line


def test_a_server_with_another_tokenizer_is_refused_without_comparing(written: Path, toy_teacher_dir: Path,
                                                                      tmp_path: Path) -> None:
    from brts.shared.tokenizer import load_tokenizer

    other = _copy_teacher(toy_teacher_dir, tmp_path / "other-tokenizer")
    # a copy of the teacher's (loaded tokenizers are shared per path: never change one, and never load `other`
    # before its files are final, or the server would be handed the cached, unchanged one)
    tokenizer = copy.deepcopy(load_tokenizer(toy_teacher_dir))
    tokenizer.add_tokens(["<brts-extra-token>"])
    tokenizer.save_pretrained(other)
    with LiveServer(other, tmp_path / "scratch") as server:
        result = _verify(written, server)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "the server's tokenizer" in result.stderr and "nothing compared" in result.stderr, result.stderr
    assert "live:" not in result.stdout


def test_a_cache_without_the_tokenizer_record_compares_only_when_told(written: Path, toy_teacher_dir: Path,
                                                                      tmp_path: Path) -> None:
    older = shutil.copytree(written, tmp_path / "older")
    with LmdbStore(older) as store:  # as a brts from before the record wrote it
        store.write(lambda txn: txn.delete(TOKENIZER_KEY + NAME.encode(), db=store.db["meta"]))
    assert recorded_tokenizer(older, NAME) is None and recorded_tokenizer(written, NAME) is not None
    with LiveServer(toy_teacher_dir, tmp_path / "scratch") as server:
        refused = _verify(older, server)
        told = _verify(older, server, "--assume-tokenizer-matches")
    assert refused.exit_code == 1 and "no tokenizer record" in refused.stderr and "live:" not in refused.stdout
    assert told.exit_code == 0 and "faithful" in told.stdout, told.output


def test_drift_report_allows_the_stored_rounding_and_the_control_spread_only() -> None:
    import numpy as np

    ids = [np.array([[3, 9, -1]])]
    stored = [np.array([[-0.5, -8.0, -np.inf]], dtype=np.float16)]
    half_ulp = np.spacing(np.float16(8.0)) / 2  # 0.00390625 / 2 at |-8|
    within = [np.array([[-0.5, -8.0 + float(half_ulp), -np.inf]], dtype=np.float32)]
    assert drift_report(stored, ids, within, within)["faithful"]
    beyond = [np.array([[-0.5, -8.0 + 3 * float(half_ulp), -np.inf]], dtype=np.float32)]
    report = drift_report(stored, ids, beyond, beyond)
    assert not report["faithful"] and report["drift"] == pytest.approx(2 * float(half_ulp))
    # the same drift passes when the live teacher itself moves that much between two scorings (the control)
    assert drift_report(stored, ids, beyond, within)["faithful"]
    assert not drift_report(stored, ids, beyond, [beyond[0] - 0.5 * float(half_ulp)])["faithful"]



# -- engine-sourced entries: held to the engine tolerance of the live teacher's dtype --------------------------------
def _rescored_as(src: Path, dst: Path, client: TeacherClient, source: str, shift: float) -> Path:
    """A copy of ``src`` whose top-K entries hold the live teacher's own numbers at their ids plus ``shift`` (float32,
    so the stored rounding is ~1e-7) and say they came from ``source``: an entry exactly ``shift`` off."""
    import numpy as np

    from brts.server.cache.codec import decode_entry, decode_pool, encode_entry
    from brts.server.cache.keys import POOL_KEY_BYTES
    from brts.shared.topk import TopK

    shutil.copytree(src, dst)
    with LmdbStore(dst) as store:
        with store.read() as txn:
            headers = {bytes(k): decode_pool(v) for k, v in txn.cursor(db=store.db["pools"])}
            entries = [(bytes(k), decode_entry(v)) for k, v in txn.cursor(db=store.db["entries"])]
        values = []
        for key, entry in entries:
            if entry.topk is None or entry.token_ids.size == 0:
                continue
            prompt = headers[key[:POOL_KEY_BYTES]].prompt_ids
            ids = np.asarray(entry.topk.ids)
            (live,) = client.score([prompt.tolist() + entry.token_ids.tolist()], [prompt.size], [ids])
            moved = np.where(ids >= 0, live.candidate_logprobs.astype(np.float64) + shift, -np.inf)
            entry.topk, entry.source = TopK.trusted(ids, moved.astype(np.float32)), source
            values.append((key, encode_entry(entry, "float32")))
        store.write(lambda txn: [txn.put(k, v, db=store.db["entries"]) for k, v in values])
    return dst


def test_engine_entries_get_the_engine_tolerance_and_scorer_entries_do_not(written: Path, toy_teacher_dir: Path,
                                                                           tmp_path: Path) -> None:
    shift = 6e-5  # float32 teacher: beyond spread + SLACK (1e-5), within it + the engine tolerance (1e-3)
    with LiveServer(toy_teacher_dir, tmp_path / "scratch") as server, TeacherClient(server.address) as client:
        engine = _rescored_as(written, tmp_path / "engine", client, "engine-decode", shift)
        scorer = _rescored_as(written, tmp_path / "scorer", client, "scorer", shift)
        passed, failed = _verify(engine, server, "--json"), _verify(scorer, server, "--json")
    assert passed.exit_code == 0, passed.output
    live = json.loads(passed.stdout)["live"]
    row = live["by_source"]["engine-decode"]
    assert list(live["by_source"]) == ["engine-decode"] and live["faithful"] and live["dtype"] == "float32"
    assert row["drift"] == pytest.approx(shift, rel=0.05) and row["allowance"] == ENGINE_TOLERANCE["float32"]
    print(live["line"])
    assert f"engine-decode (6) {row['drift']:.2e} of {row['tolerance']:.1e} allowed" in live["line"], live["line"]
    assert f"{ENGINE_TOLERANCE['float32']:.1e} more for float32" in live["line"], live["line"]
    assert failed.exit_code == 1, failed.output
    live = json.loads(failed.stdout)["live"]
    assert not live["faithful"] and list(live["by_source"]) == ["scorer"] and "DRIFTED" in live["line"]


def _check_config() -> Any:
    from brts.shared.config import PrewarmConfig, PromptConfig
    from brts.toy import TOY_CHAT_TEMPLATE

    prompt = PromptConfig(chat_template=TOY_CHAT_TEMPLATE, instruction_suffix="", max_prompt_len=256)
    return PrewarmConfig(n_tier1=2, n_tier2=1, logprob_k=8, prompt=prompt)


def test_prewarm_check_widens_the_tolerance_by_the_candidates_source(written: Path, toy_teacher_dir: Path,
                                                                    tmp_path: Path) -> None:
    import dataclasses

    from brts.server.prewarm import check, check_cached

    widened = 1e-4 + ENGINE_TOLERANCE["float32"]  # the agreement tolerance + the engine tolerance
    shift = 1.5e-4  # float32 teacher: beyond the agreement tolerance (1e-4), within it + the engine tolerance (1e-3)
    with LiveServer(toy_teacher_dir, tmp_path / "scratch") as server, TeacherClient(server.address) as client:
        cache = _rescored_as(written, tmp_path / "engine", client, "engine-decode", shift)
    with LiveServer(toy_teacher_dir, cache) as server, TeacherClient(server.address) as client:
        r = check(_check_config(), client, problems=make_problems(4, seed=3))
        assert r["complete"] == 4 and r["agreement"].ok
        cached = r["cached"]
        assert cached["source"] == "engine-decode" and cached["ok"], cached  # the server says where they came from
        assert r["cached_vs_score"] == pytest.approx(shift, rel=0.05) and r["tolerance"] == pytest.approx(widened)
        assert "engine-decode log-probs" in cached["line"] and f"tolerance {widened:.1e}" in cached["line"], \
            cached["line"]
        # the same numbers said to be the scorer's (or an older server's "") are held to the agreement tolerance
        (result,) = client.get_candidates([_first_prompt()], Sampling(), 8, cache_only=True)
        candidate = next(c for c in result.candidates if c.topk_ids is not None)
        for source, ok in (("scorer", False), ("", False), ("engine-prefill", True)):
            got = check_cached(client, _first_prompt(), dataclasses.replace(candidate, logprob_source=source),
                               1e-4, "float32")
            assert got["ok"] is ok and got["source"] == (source or "scorer"), got


def _first_prompt() -> Prompt:
    from brts.toy import toy_prompt_spec

    p = make_problems(4, seed=3)[0]
    return Prompt(p.id, tuple(toy_prompt_spec().encode(p.problem)), p.answer, n_tier1=2, n_tier2=1)
