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

