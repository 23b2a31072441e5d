"""The candidate cache across processes: a writer and a reader on one directory, and a writer killed with SIGKILL.

Real LMDB on disk and real subprocesses (``subprocess.Popen([sys.executable, script])``, no fork of this
process). The scripts live in ``cache_scripts/``: ``writer.py`` fills a ``CandidateCache`` over the test doubles
and prints one flushed line per committed get(); ``reader.py`` re-reads the whole cache in snapshots. Both start
with a small map so the writer really grows it (``MapFullError``) and the reader really meets
``MapResizedError``. The writers use the Qwen tokenizer's own ``tokenizers`` backend (see
``cache_scripts/cache_proc_common.py``) so a restart costs ~1 s instead of a torch import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).parent
SCRIPTS = HERE / "cache_scripts"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SCRIPTS))
import cache_proc_common as common  # noqa: E402  (cache_scripts/cache_proc_common.py)

_spec = importlib.util.spec_from_file_location("brts_cache_test_reader", SCRIPTS / "reader.py")
_reader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reader)
one_pass = _reader.one_pass  # the reader script's snapshot check, reused after each kill

from brts.server.cache import CandidateCache, admin  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.server.cache.store import LmdbStore  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SMALL_MAP = 64 << 10
BATCH = 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tokenizer_json(qwen_tokenizer, tmp_path_factory) -> Path:
    """The real Qwen tokenizer's backend, serialized for the writer subprocesses."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(qwen_tokenizer.backend_tokenizer.to_str())
    return path


def _start_writer(cache_dir: Path, log: Path, tokenizer_json: Path, start: int, batches: int,
                  go_file: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPTS / "writer.py"), str(cache_dir), "--start", str(start), "--batches",
           str(batches), "--batch-size", str(BATCH), "--map-size", str(SMALL_MAP), "--tokenizer-json",
           str(tokenizer_json)]
    if go_file is not None:
        cmd += ["--go-file", str(go_file)]
    with log.open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV)


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Path, timeout: float = 600.0) -> None:
    """Poll ``ready`` until it holds; ``timeout`` is a hang guard only (pytest-timeout backs it)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            err = log.with_suffix(".err").read_text() if log.with_suffix(".err").exists() else ""
            pytest.fail(f"{what}: the process exited ({proc.returncode}) first:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def _committed(log: Path) -> list[tuple[int, int, str]]:
    """(first prompt number, count, digest) of each batch the writer reported as committed."""
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("COMMITTED "):
            _, first, count, digest, *_ = line.split()
            out.append((int(first), int(count), digest))
    return out


def _snapshot(cache_dir: Path) -> dict:
    with LmdbStore(cache_dir, readonly=True) as store:
        return one_pass(store, common.N_TIER1)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_reader_process_sees_whole_batches_while_writer_grows_the_map(tmp_path, tokenizer_json):
    cache_dir, go, ready, stop = tmp_path / "cache", tmp_path / "go", tmp_path / "reader-ready", tmp_path / "stop"
    batches = 40
    wlog, rlog = tmp_path / "writer.log", tmp_path / "reader.log"
    writer = _start_writer(cache_dir, wlog, tokenizer_json, 0, batches, go_file=go)
    reader = None
    try:
        _wait_for(writer, lambda: wlog.read_text().startswith("READY"), "writer READY", wlog)
        with rlog.open("w") as out, rlog.with_suffix(".err").open("w") as err:
            reader = subprocess.Popen(
                [sys.executable, str(SCRIPTS / "reader.py"), str(cache_dir), "--map-size", str(SMALL_MAP),
                 "--n-tier1", str(common.N_TIER1), "--ready-file", str(ready), "--stop-file", str(stop),
                 "--max-seconds", "1200"],
                stdout=out, stderr=err, env=ENV)
        _wait_for(reader, ready.exists, "reader's first pass", rlog)
        go.touch()  # the reader has its small map open before the writer grows it
        assert writer.wait(timeout=1200) == 0, wlog.with_suffix(".err").read_text()[-3000:]
        stop.touch()
        assert reader.wait(timeout=600) == 0, rlog.with_suffix(".err").read_text()[-3000:]
    finally:
        _stop(writer, *([reader] if reader else []))
    committed = _committed(wlog)
    assert [c[0] for c in committed] == [b * BATCH for b in range(batches)]
    lines = rlog.read_text().splitlines()
    assert lines[-1].startswith("SUMMARY "), lines[-5:]
    summary = json.loads(lines[-1].removeprefix("SUMMARY "))
    assert summary["corrupt"] == 0 and summary["torn"] == 0, summary["examples"]
    assert not summary["timed_out"]
    counts = summary["counts"]
    total = batches * BATCH * common.N_TIER1
    assert counts[-1] == total  # the final pass (begun after the writer exited) sees everything
    assert counts == sorted(counts) and len(counts) >= 4  # it watched the cache grow, batch by batch
    assert all(c % (BATCH * common.N_TIER1) == 0 for c in counts)  # only whole batches were ever visible
    assert summary["resized"] >= 1  # MapResizedError really happened in the reader and was handled
    assert summary["first_map_size"] == SMALL_MAP and summary["map_size"] > 4 * SMALL_MAP
    result = admin.verify(cache_dir)
    assert result["ok"] and result["checked"] == total + total // common.N_TIER1, result["problems"][:5]


def test_writer_killed_at_random_moments_leaves_every_committed_batch_intact(tmp_path, tokenizer_json,
                                                                           qwen_tokenizer):
    """Ten kills -9 at seeded moments, chosen by progress: after a seeded number (1-3) of reported commits, then a
    seeded fraction of run 0's batch time into the next batch (mid-draw, mid-transaction, mid-map-growth or
    between batches). The writer has 100,000 batches to go, so every kill lands mid-work on any machine, and the
    kills together see at least as many commits as they waited for."""
    cache_dir = tmp_path / "cache"
    rng = random.Random(4242)
    runs = 10
    start = 0  # each restart continues where the killed writer's last reported batch ended
    reported: list[tuple[int, int, str]] = []
    entries_after: list[int] = []
    waited_for = 0
    batch_s = 0.0  # run 0's time between commits
    for run in range(runs):
        log = tmp_path / f"writer{run}.log"
        writer = _start_writer(cache_dir, log, tokenizer_json, start, batches=100_000)
        commits = 3 if run == 0 else rng.randint(1, 3)
        try:
            # from its first commit on (a restart that cannot write, e.g. on a dead writer's lock, fails here)
            _wait_for(writer, lambda: log.read_text().count("\nCOMMITTED ") >= 1, f"run {run}: first commit", log)
            t0 = time.monotonic()
            _wait_for(writer, lambda: log.read_text().count("\nCOMMITTED ") >= commits, f"run {run}: commits", log)
            if run == 0:
                batch_s = (time.monotonic() - t0) / (commits - 1)
            time.sleep(rng.uniform(0.0, 1.5) * batch_s)  # spreads the moments over the next batch's phases
            os.kill(writer.pid, signal.SIGKILL)
            assert writer.wait(timeout=60) == -signal.SIGKILL, log.with_suffix(".err").read_text()[-3000:]
        finally:
            _stop(writer)
        waited_for += commits
        committed = _committed(log)
        assert [c[0] for c in committed] == [start + b * BATCH for b in range(len(committed))]
        reported += committed
        snap = _snapshot(cache_dir)
        assert snap["corrupt"] == [] and snap["torn"] == [], (run, snap["corrupt"][:3], snap["torn"][:3])
        # the cache holds the prompts [0, new start) (all reported, some by an earlier run), plus all or none of
        # the batch in flight at the kill: never a part of it
        new_start = start + len(committed) * BATCH
        assert snap["entries"] in (new_start * common.N_TIER1, (new_start + BATCH) * common.N_TIER1), \
            (run, start, len(committed), snap["entries"])
        entries_after.append(snap["entries"])
        start = new_start
    assert len(reported) >= waited_for  # every kill came after the commits it waited for
    assert entries_after == sorted(entries_after) and entries_after[-1] > entries_after[0] > 0

    result = admin.verify(cache_dir)
    assert result["ok"] and result["checked"] > 0, result["problems"][:5]
    # every batch reported as committed is there, byte-identical to the reply the writer got before the kill;
    # the prompt ids come from the real HF tokenizer here, so a tokenizer mismatch would show as missing entries
    with CandidateCache(cache_dir, common.TEACHER, readonly=True) as cache:
        for first, count, digest in reported:
            jobs = [common.prompt_job(qwen_tokenizer, n) for n in range(first, first + count)]
            served = cache.get(jobs, common.sampling(), seed=common.SEED, k=common.K, generate=False)
            assert [p.missing for p in served] == [0] * count, first
            assert common.digest(served) == digest, first
    # the cache holds exactly the prompts [0, start), plus at most the last writer's batch in flight
    assert entries_after[-1] in (start * common.N_TIER1, (start + BATCH) * common.N_TIER1)
    assert admin.stats(cache_dir)["entries"] == entries_after[-1]
