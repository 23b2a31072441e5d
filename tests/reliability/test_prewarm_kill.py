"""kill -9 the teacher server at ten random moments of a `brts prewarm`, restarting it on the same LMDB cache.

Why: the README promises that a kill -9 loses at most the batch being written, and that a restarted server
finishes the work without drawing anything twice. One kill (the old test_server_ops test) hits one phase of the
server's work; ten, at seeded random moments after the restarted server has committed something, land in
generation, scoring, the LMDB commit, snapshot reads and streaming, and half of them also kill the prewarm (a
machine that goes down whole) while the other half let it ride through the restart (its client retries and
resumes the prompts not yet received).

"No pool generated twice" is proved two ways: every entry ever seen committed keeps its stored creation time to
the end (a regenerated entry is rewritten with a new one), and the last server's "generated" counter equals the
entries that appeared while it ran. Completeness: every Tier-1 pool holds its n_tier1 entries and every Tier-2
pool its n_tier2, `brts prewarm --check` finds every prompt fully cached, a rerun draws nothing, and
`brts cache verify` is clean.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from forkserver import Child, ForkServer, Teacher  # noqa: E402
from server_proc import BRTS, free_port  # noqa: E402

from brts.server.toy import TOY_CHAT_TEMPLATE, make_problems  # noqa: E402

SEED = 20240610  # the kill moments and which kills also take the prewarm down
KILLS = 10
PROMPTS, N_TIER1, N_TIER2 = 40, 2, 1  # ten kills consume 13-20 prompts (one or two commits of <= 2 prompts each)

def _entries(cache: Path) -> dict[bytes, float]:
    """Every committed entry's key and stored creation time, read like `brts cache` reads (read-only snapshot)."""
    from brts.server.cache.codec import decode_entry
    from brts.server.cache.store import LmdbStore

    if not (cache / "data.mdb").exists():
        return {}
    with LmdbStore(cache, readonly=True) as store, store.read() as txn:
        return {bytes(k): decode_entry(v).created for k, v in txn.cursor(db=store.db["entries"])}


def _count(cache: Path) -> int:
    from brts.server.cache.store import LmdbStore

    if not (cache / "data.mdb").exists():
        return 0
    with LmdbStore(cache, readonly=True) as store, store.read() as txn:
        return int(txn.stat(store.db["entries"])["entries"])


def _brts(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*BRTS, *args], capture_output=True, text=True, timeout=timeout)


def _gave_up_on_unavailable(prewarm: Child) -> None:
    """A prewarm that ran out of retries while the server was down says UNAVAILABLE; anything else is a bug."""
    out = prewarm.output()
    assert prewarm.returncode == 1 and "UNAVAILABLE" in out, out[-3000:]


def _until(condition: Callable[[], bool], timeout: float, what: str, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_kill_9_at_ten_random_moments_of_a_prewarm_then_every_pool_complete_none_drawn_twice(
        forks: ForkServer, toy_teacher_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    plan = [(rng.uniform(0.0, 0.4), rng.random() < 0.5) for _ in range(KILLS)]  # (delay, kill the prewarm too)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n"
                            for p in make_problems(PROMPTS, seed=77)))
    cache, port = tmp_path / "cache", free_port()
    serve_args = ["sampling.max_new_tokens=16", "sampling.temperature=1.0"]
    prewarm_args = ["prewarm", "--server", f"127.0.0.1:{port}", "--dataset", str(data), "--n-tier1", str(N_TIER1),
                    "--n-tier2", str(N_TIER2), "--concurrency", "2", "--chat-template", TOY_CHAT_TEMPLATE,
                    "--no-progress", "prompt.instruction_suffix="]
    runs: list[Child] = []

    def prewarm(*extra: str) -> Child:
        # one prompt per call while the kills go on: small commits, so ten kills leave work for the last server
        args = [*prewarm_args, *(extra or ["prompts_per_call=1"])]
        runs.append(forks.start(args, tmp_path / f"prewarm-{len(runs)}.log"))
        return runs[-1]

    seen: dict[bytes, float] = {}
    client: Child | None = None
    server: Teacher | None = None
    continued = 0  # kills the prewarm rode through: its client reconnected and resumed on the next server
    try:
        for n, (delay, with_client) in enumerate(plan):
            before, started = _count(cache), len(runs)
            server = Teacher(forks, toy_teacher_dir, cache, tmp_path / f"serve-{n}.log", serve_args, port=port)
            if client is None or client.returncode is not None:
                if client is not None and client.returncode != -9:
                    _gave_up_on_unavailable(client)
                client = prewarm()

            def alive() -> None:
                nonlocal client
                assert server is not None and server.child.returncode is None, server.child.output()[-3000:]
                assert client is not None
                if client.returncode is not None:  # it must not be done: the kill has to land mid-prewarm
                    _gave_up_on_unavailable(client)
                    client = prewarm()

            _until(lambda: _count(cache) > before, 120, f"server {n}'s first commit", alive)
            continued += len(runs) == started
            time.sleep(delay)  # the random moment (not a synchronisation: any moment is a valid kill point)
            alive()
            server.kill()
            if with_client:
                client.kill()
            committed = _entries(cache)
            assert len(committed) < PROMPTS * N_TIER1, "the prewarm finished before the last kill: add prompts"
            rewritten = [k.hex() for k, created in seen.items() if committed.get(k) != created]
            assert not rewritten, f"after kill {n + 1}: committed entries regenerated or lost: {rewritten[:3]}"
            seen.update(committed)
        assert continued >= 1, "no kill was ridden through by a running prewarm"

        before = _count(cache)
        server = Teacher(forks, toy_teacher_dir, cache, tmp_path / "serve-final.log", serve_args, port=port)
        assert client is not None
        if client.returncode is None:
            client.kill()  # the rest in one call: batched, it takes seconds instead of a minute
        elif client.returncode != -9:
            _gave_up_on_unavailable(client)
        client = prewarm("prompts_per_call=64")
        assert client.wait(300) == 0, client.output()[-3000:]
        assert f"brts prewarm: prompts {PROMPTS}" in client.output()
        after = _count(cache)
        check = forks.start([*prewarm_args, "--check"], tmp_path / "check.log")
        assert check.wait(120) == 0, check.output()
        assert f"{PROMPTS}/{PROMPTS} sampled prompts fully cached (100%)" in check.output(), check.output()
        rerun = prewarm("prompts_per_call=64")
        assert rerun.wait(300) == 0, rerun.output()[-3000:]
        assert f"({PROMPTS} already cached" in rerun.output(), rerun.output()
        counts = server.stop()
        server = None
    finally:
        if server is not None:
            server.kill()
        for child in runs:
            child.kill()
    assert counts["generated"] == after - before  # the last server drew only what was missing
    final = _entries(cache)
    assert len(final) == after
    assert all(final[k] == created for k, created in seen.items())  # nothing committed was ever drawn again
    stats = json.loads(_brts("cache", "stats", str(cache), "--json").stdout)
    (row,) = stats["teachers"].values()
    assert row["pools_tier1"] == PROMPTS and row["entries_tier1"] == PROMPTS * N_TIER1
    assert row.get("entries_tier2", 0) == row.get("pools_tier2", 0) * N_TIER2
    assert stats["damaged"] == 0
    verify = _brts("cache", "verify", str(cache))
    assert verify.returncode == 0, verify.stdout + verify.stderr
