"""kill -9 the teacher server at ten moments of a `brts prewarm`, restarting it on the same LMDB cache.

Why: the README promises that a kill -9 loses at most the batch being written, and that a restarted server
finishes the work without drawing anything twice. One kill hits one phase of the server's work; ten, at seeded
moments after the restarted server has committed something, land in generation, scoring, the LMDB commit,
snapshot reads and streaming, and half of them also kill the prewarm (a machine that goes down whole) while the
other half let it ride through the restart (its client retries and resumes the prompts not yet received).

Every kill lands mid-prewarm by construction, on any machine, because the kill moments are defined by progress,
not by the clock: server n is killed after its first commit and before a later one is seen (the test polls the
cache and kills at once when a second commit appears; otherwise at a seeded fraction of server 0's batch time,
which only spreads the moments over the phases of the next batch). Server 0 is killed at its third commit: the
time between its commits is that batch time. The client asks one prompt per call, two calls at a time, so a
commit holds at most two prompts and a server completes at most ``2 * CONCURRENCY`` Tier-1 pools before its kill
(server 0: 6): ten kills complete at most 42 of the ``PROMPTS`` pools. The test's own waits scale with what
server 0 took, plus the client's documented retry window.

"No pool generated twice" is proved two ways: every entry ever seen committed keeps its stored creation time to
the end (a regenerated entry is rewritten with a new one), and the last server's "generated" counter equals the
entries that appeared while it ran. Completeness: every Tier-1 pool holds its n_tier1 entries and every Tier-2
pool its n_tier2, `brts prewarm --check` finds every prompt fully cached, a rerun draws nothing, and
`brts cache verify` is clean.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from forkserver import Child, ForkServer, Teacher  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from server_proc import free_port  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.shared.client import TeacherClient  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.toy import TOY_CHAT_TEMPLATE, make_problems  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SEED = 20240610  # the kill moments and which kills also take the prewarm down
KILLS = 10
CONCURRENCY = 2  # prewarm calls in flight, one prompt each, while the kills go on
PROMPTS, N_TIER1, N_TIER2 = 48, 2, 1
MOST_PER_KILL = 2 * CONCURRENCY  # Tier-1 pools a server can complete before its kill: two commits of <= 2 prompts
assert KILLS * MOST_PER_KILL + CONCURRENCY < PROMPTS  # (server 0 makes three) every kill lands mid-prewarm

# The client retries UNAVAILABLE with jittered backoff (shared/client.py): the longest a riding-through prewarm
# may wait before it reconnects to the next server, or gives up (then the test starts a new one).
_CLIENT = TeacherClient.__dataclass_fields__
RETRY_WINDOW_S = 1.5 * sum(min(_CLIENT["backoff_s"].default * 2**a, 10.0) for a in range(_CLIENT["retries"].default))


def _budget(measured_s: float) -> float:
    """A wait's limit from what the same work took on this machine earlier in the test: generous, and it grows
    with the machine's slowness instead of being one machine's guess."""
    return 30.0 + 20.0 * measured_s


def _entries(cache: Path) -> dict[bytes, float]:
    """Every committed entry's key and stored creation time, read like `brts cache` reads (read-only snapshot)."""
    from brts.server.cache.codec import decode_entry
    from brts.server.cache.store import LmdbStore

    if not (cache / "data.mdb").exists():
        return {}
    with LmdbStore(cache, readonly=True) as store, store.read() as txn:
        return {bytes(k): decode_entry(v).created for k, v in txn.cursor(db=store.db["entries"])}


def _count(cache: Path) -> int:
    """Committed entries (any tier): it moves with every commit, so it marks the commits of a server."""
    from brts.server.cache.store import LmdbStore

    if not (cache / "data.mdb").exists():
        return 0
    with LmdbStore(cache, readonly=True) as store, store.read() as txn:
        return int(txn.stat(store.db["entries"])["entries"])


def _complete_tier1(cache: Path) -> int:
    """Tier-1 pools holding all their N_TIER1 entries: the prewarm's progress, read the way `brts cache` reads."""
    from brts.server.cache.codec import decode_pool
    from brts.server.cache.keys import split_entry_key
    from brts.server.cache.store import LmdbStore

    if not (cache / "data.mdb").exists():
        return 0
    with LmdbStore(cache, readonly=True) as store, store.read() as txn:
        tier1 = {bytes(k) for k, v in txn.cursor(db=store.db["pools"]) if decode_pool(v).kind == "tier1"}
        held = Counter(split_entry_key(k)[0] for k in txn.cursor(db=store.db["entries"]).iternext(values=False))
    return sum(held[pool] == N_TIER1 for pool in tier1)


def _gave_up_on_unavailable(prewarm: Child) -> None:
    """A prewarm that ran out of retries while the server was down says UNAVAILABLE; anything else is a bug."""
    out = prewarm.output()
    assert prewarm.returncode == 1 and "UNAVAILABLE" in out, out[-3000:]


def _until(condition: Callable[[], bool], timeout: float, what: str, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        check()
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({timeout:.0f} s)"
        time.sleep(0.005)


class KilledPrewarm:
    """One prewarm client at a time against server after server on one port and one cache: the test's moving parts
    (``server``, ``client``, every child it started) and server 0's measured times that scale the later waits."""

    def __init__(self, forks: ForkServer, model: Path, tmp_path: Path) -> None:
        self.forks, self.model, self.tmp = forks, model, tmp_path
        self.cache, self.port = tmp_path / "cache", free_port()
        data = tmp_path / "toy.jsonl"
        data.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n"
                                for p in make_problems(PROMPTS, seed=77)))
        self.prewarm_args = ["prewarm", "--server", f"127.0.0.1:{self.port}", "--dataset", str(data), "--n-tier1",
                             str(N_TIER1), "--n-tier2", str(N_TIER2), "--concurrency", str(CONCURRENCY),
                             "--chat-template", TOY_CHAT_TEMPLATE, "--no-progress", "prompt.instruction_suffix="]
        self.children: list[Child] = []
        self.server: Teacher | None = None
        self.client: Child | None = None
        self.ready_s = self.batch_s = 0.0  # server 0's start and its batch time (between commits)
        self.continued = 0  # kills the prewarm rode through: its client reconnected and resumed on the next server

    def start_server(self, name: str, timeout: float) -> float:
        """Start ``brts serve`` on the cache; the seconds it took to listen."""
        t0 = time.monotonic()
        self.server = Teacher(self.forks, self.model, self.cache, self.tmp / f"serve-{name}.log",
                              ["sampling.max_new_tokens=16", "sampling.temperature=1.0"], port=self.port,
                              timeout=timeout)
        return time.monotonic() - t0

    def prewarm(self, *extra: str) -> Child:
        """A new `brts prewarm`; one prompt per call while the kills go on (small commits), unless told."""
        args = [*self.prewarm_args, *(extra or ["prompts_per_call=1"])]
        self.children.append(self.forks.start(args, self.tmp / f"prewarm-{len(self.children)}.log"))
        return self.children[-1]

    def alive(self) -> None:
        """The server must be up; a prewarm that gave up while no server was up is replaced by a new one."""
        assert self.server is not None and self.server.child.returncode is None, self.server.child.output()[-3000:]
        if self.client is None or self.client.returncode is not None:
            if self.client is not None and self.client.returncode != -9:
                _gave_up_on_unavailable(self.client)
            self.client = self.prewarm()

    def kill_once(self, n: int, fraction: float, with_client: bool) -> str:
        """Start server n, let it commit, kill it at the planned moment (and the prewarm too); what happened."""
        before, started = _count(self.cache), len(self.children)
        ready = self.start_server(str(n), 600.0 if n == 0 else _budget(self.ready_s))
        self.alive()
        first_wait = 600.0 if n == 0 else _budget(self.ready_s + self.batch_s) + RETRY_WINDOW_S
        _until(lambda: _count(self.cache) > before, first_wait, f"server {n}'s first commit", self.alive)
        self.continued += n > 0 and len(self.children) == started
        first, t0 = _count(self.cache), time.monotonic()
        if n == 0:  # server 0 measures the batch time: the mean time between its commits, up to its third
            _until(lambda: _count(self.cache) > first, 600.0, "server 0's second commit", self.alive)
            second = _count(self.cache)
            _until(lambda: _count(self.cache) > second, 600.0, "server 0's third commit", self.alive)
            self.ready_s, self.batch_s, early = ready, (time.monotonic() - t0) / 2, True
        else:  # a seeded point of the next batch (its generation, scoring, commit, or the streaming of the last),
            # never past the next commit: at most two commits per server, whatever the machine's speed
            deadline = t0 + fraction * self.batch_s
            while time.monotonic() < deadline and _count(self.cache) == first:
                self.alive()
                time.sleep(0.002)
            early = _count(self.cache) != first
        assert self.server is not None and self.client is not None
        self.server.kill()
        if with_client:
            self.client.kill()
        complete = _complete_tier1(self.cache)
        assert complete <= (n + 1) * MOST_PER_KILL + CONCURRENCY < PROMPTS, (n, complete)  # by construction
        moment = "at the next commit" if early else f"{fraction:.2f} x {self.batch_s:.2f} s"
        return f"kill {n + 1}: {moment}{' + prewarm' if with_client else ''}, {complete}/{PROMPTS} pools complete"

    def finish(self) -> tuple[int, dict[str, int], dict]:
        """A last server and one batched prewarm for the rest, --check, a rerun and the cache's stats and verify:
        (entries before the last server, its counts, `brts cache stats --json`)."""
        before = _count(self.cache)
        self.start_server("final", _budget(self.ready_s))
        assert self.client is not None
        if self.client.returncode is None:
            self.client.kill()  # the rest in one call: batched, it takes seconds instead of a minute
        elif self.client.returncode != -9:
            _gave_up_on_unavailable(self.client)
        whole = _budget(self.batch_s * PROMPTS)  # every prompt one at a time: far more than the batched rest takes
        done = self.prewarm("prompts_per_call=64")
        assert done.wait(whole) == 0, done.output()[-3000:]
        assert f"brts prewarm: prompts {PROMPTS}" in done.output()
        check = self.forks.start([*self.prewarm_args, "--check"], self.tmp / "check.log")
        assert check.wait(whole) == 0, check.output()
        assert f"{PROMPTS}/{PROMPTS} sampled prompts fully cached (100%)" in check.output(), check.output()
        # --check also checks the teacher: its agreement with itself, and one cached candidate against Score
        assert "teacher agreement: one sequence" in check.output(), check.output()
        assert "one cached candidate's top-K vs Score on the same tokens" in check.output(), check.output()
        rerun = self.prewarm("prompts_per_call=64")
        assert rerun.wait(whole) == 0, rerun.output()[-3000:]
        assert f"({PROMPTS} already cached" in rerun.output(), rerun.output()
        assert self.server is not None
        counts = self.server.stop(_budget(self.ready_s))
        self.server = None
        stats = self.forks.start(["cache", "stats", str(self.cache), "--json"], self.tmp / "stats.log")
        assert stats.wait(whole) == 0, stats.output()
        verify = self.forks.start(["cache", "verify", str(self.cache)], self.tmp / "verify.log")
        assert verify.wait(whole) == 0, verify.output()
        text = stats.output()
        return before, counts, json.loads(text[text.index("{\n"):])  # the log also holds the child's stderr

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
        for child in self.children:
            child.kill()


def test_kill_9_at_ten_moments_of_a_prewarm_then_every_pool_complete_none_drawn_twice(
        forks: ForkServer, toy_teacher_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    # (how far into server n's next batch, as a fraction of server 0's batch time; kill the prewarm too)
    plan = [(rng.uniform(0.0, 1.2), rng.random() < 0.5) for _ in range(KILLS)]
    assert {with_client for _, with_client in plan} == {True, False}  # both kinds of kill
    run = KilledPrewarm(forks, toy_teacher_dir, tmp_path)
    seen: dict[bytes, float] = {}
    moments: list[str] = []
    try:
        for n, (fraction, with_client) in enumerate(plan):
            moments.append(run.kill_once(n, fraction, with_client))
            committed = _entries(run.cache)
            rewritten = [k.hex() for k, created in seen.items() if committed.get(k) != created]
            assert not rewritten, f"after kill {n + 1}: committed entries regenerated or lost: {rewritten[:3]}"
            seen.update(committed)
        print("\n".join(moments))  # shown with -s, and on a failure below
        assert run.continued >= 1, "no kill was ridden through by a running prewarm"
        before, counts, stats = run.finish()
    finally:
        run.close()
    final = _entries(run.cache)
    assert counts["generated"] == len(final) - before  # the last server drew only what was missing
    assert all(final[k] == created for k, created in seen.items())  # nothing committed was ever drawn again
    (row,) = stats["teachers"].values()
    assert row["pools_tier1"] == PROMPTS and row["entries_tier1"] == PROMPTS * N_TIER1
    assert row.get("entries_tier2", 0) == row.get("pools_tier2", 0) * N_TIER2
    assert stats["damaged"] == 0
    assert _complete_tier1(run.cache) == PROMPTS
