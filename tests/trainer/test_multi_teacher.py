"""Several teachers for real: two `brts serve` processes of different strength (``teacher_pair``), prompts routed by
a dataset column, the weak teacher's prompts prewarmed with ``brts prewarm --route``, a 2-step run on 2 gloo ranks,
checked through each server's own counters and cache, then an exact resume and a resume against another set of
teachers (refused).

Why counters and caches and not the trainer's word: the trainer's per-teacher metrics could be right while the
requests went elsewhere. Each server counts every prompt it answered (``brts_prompts``: the start-up check's
cache-only requests, the prewarm's and the run's), and its cache names every prompt it generated for, so both must
match the routing rule exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from brts.trainer.config import load_train_config
from brts.trainer.launch import launch
from brts.trainer.routing import problems_of
from brts.trainer.step_prompts import first_steps_requests, prompt_spec_of

sys.path.insert(0, str(Path(__file__).parent))
from train_env import (  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
    BRTS,
    HANG_S,
    REPO,
    TRAIN_ENV,
    metrics,
    one_line,
    train,
    write_config,
)

WEAK_MAX_NEW_TOKENS = 20  # the weak teacher's own sampling override (the run's is 24): it enters its pool keys


def _write_routed_problems(path, n: int = 24):
    """Toy problems with a data_source column: "weak" (the weak teacher), "arith" (no teacher of that name: the
    default) and none at all (the default)."""
    from brts.toy import make_problems

    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(make_problems(n, seed=5)):
            row = {"id": p.id, "problem": p.problem, "answer": p.answer}
            if i % 3 != 2:
                row["data_source"] = "weak" if i % 3 == 0 else "arith"
            f.write(json.dumps(row) + "\n")
    return path


def _prompts(counters: dict[str, float]) -> float:
    """Every prompt the server answered in GetCandidates (cache hit, miss, or absent from a cache-only request)."""
    return sum(v for k, v in counters.items() if k.startswith("brts_prompts_total{"))


def _cached_problem_ids(cache) -> tuple[set[str], set[str]]:
    """(problem ids named in the server's cache, the max_new_tokens of its pools) from its own LMDB."""
    from brts.server.cache.admin import export_rows

    ids, budgets = set(), set()
    for row in export_rows(cache):
        ids |= {name.split("@")[0] for name in row["prompt_names"]}
        budgets.add(json.loads(row["sampling"])["max_new_tokens"])
    return ids, budgets


@pytest.fixture(scope="module")
def routed(e2e_env, teacher_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    problems = _write_routed_problems(root / "problems.jsonl")
    teachers = {"default": {"address": teacher_pair["strong"]["address"]},
                "weak": {"address": teacher_pair["weak"]["address"],
                         "sampling": {"max_new_tokens": WEAK_MAX_NEW_TOKENS}}}
    cfg = write_config(root / "routed.yaml", student=str(e2e_env["student"]), dataset=str(problems),
                       run_dir=str(root / "run"), teachers=teachers, teacher_route="data_source", save_every=1,
                       max_steps=2)
    data = yaml.safe_load(cfg.read_text())
    del data["server"]  # the teachers section replaces it
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    before = {name: _prompts(t["metrics"]()) for name, t in teacher_pair.items()}
    prewarm = subprocess.run([*BRTS, "prewarm", "--config", str(cfg), "--route", "weak", "--no-progress"],
                             capture_output=True, text=True, timeout=HANG_S, env=TRAIN_ENV, cwd=REPO)
    assert prewarm.returncode == 0, prewarm.stderr[-3000:]
    warmed = {name: _prompts(t["metrics"]()) for name, t in teacher_pair.items()}
    run = train("--config", str(cfg))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    after = {name: _prompts(t["metrics"]()) for name, t in teacher_pair.items()}
    return {"cfg": cfg, "root": root, "before": before, "warmed": warmed, "after": after, "prewarm": prewarm,
            "run": run}


def test_each_prompt_goes_to_its_teacher_by_each_servers_own_counters(routed, teacher_pair):
    config, _ = load_train_config(routed["cfg"])
    from brts.shared.data import load_dataset

    problems = load_dataset(config.dataset, config.teacher_route)
    names = config.teacher_entries()
    weak_ids = {p.id for p in problems_of(problems, names, "weak")}
    default_ids = {p.id for p in problems_of(problems, names, "default")}
    assert len(weak_ids) == 8 and len(default_ids) == 16  # "arith" and no value both go to default

    # the route-aware prewarm asked only the weak teacher, for exactly its prompts
    assert "brts prewarm: prompts 8 (0 already cached" in routed["prewarm"].stdout
    assert routed["warmed"]["weak"] - routed["before"]["weak"] == 8
    assert routed["warmed"]["strong"] == routed["before"]["strong"]

    recs = metrics(routed["root"] / "run")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["teacher/default/prompts"] + r["teacher/weak/prompts"] == r["prompts"]
        # the weak teacher's prompts were all prewarmed, with its own sampling: every request is a hit
        assert r["teacher/weak/prompts"] == 0 or r["teacher/weak/cache_hit_rate"] == 1.0
    assert sum(r["teacher/weak/prompts"] for r in recs) > 0 and sum(r["teacher/default/prompts"] for r in recs) > 0
    assert any(r["time/score/weak"] > 0 for r in recs) and any(r["time/score/default"] > 0 for r in recs)
    assert "prompts per teacher: default 16, weak 8" in routed["run"].stdout

    # each server's own count: the start-up check's requests routed to it, then the run's
    first = first_steps_requests(config, problems, prompt_spec_of(config), 4)  # the launcher's: min(4, max_steps)
    for server, teacher in (("strong", "default"), ("weak", "weak")):
        asked = routed["after"][server] - routed["warmed"][server]
        assert asked == len(first[teacher]) + sum(r[f"teacher/{teacher}/prompts"] for r in recs), server

    # and each cache holds only its own teacher's prompts, drawn with its own sampling
    strong_ids, strong_budgets = _cached_problem_ids(teacher_pair["strong"]["cache"])
    weak_cached, weak_budgets = _cached_problem_ids(teacher_pair["weak"]["cache"])
    assert weak_cached == weak_ids and weak_budgets == {WEAK_MAX_NEW_TOKENS}
    assert strong_ids and strong_ids <= default_ids and strong_budgets == {config.sampling.max_new_tokens}


def test_routed_run_resumes_exactly_and_refuses_another_set_of_teachers(routed, teacher_pair, capsys):
    run = routed["root"] / "run"
    resumed_dir = routed["root"] / "resumed"
    again = train("--resume", str(run / "checkpoints" / "step_000001"), f"run_dir={resumed_dir}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    a, b = metrics(run), metrics(resumed_dir)
    assert [x["step"] for x in b] == [2]
    for key in ("loss", "loss/student_context", "loss/teacher_context", "grad_norm", "teacher/weak/prompts"):
        assert b[0][key] == pytest.approx(a[1][key], rel=1e-4, abs=1e-6), key
        assert key.startswith("teacher/") or a[1][key] != pytest.approx(a[0][key], rel=1e-4, abs=1e-6), key

    # a third name (a replica of the strong teacher: allowed in a fresh run) is not the set the run trained with;
    # refused by the launcher before any rank starts (run in-process: no rank is started to wait for)
    extra = f"teachers.extra.address={teacher_pair['strong']['address']}"
    capsys.readouterr()
    assert launch(None, [extra, f"run_dir={routed['root'] / 'other'}"], resume=str(run)) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("brts train: the checkpoint was trained against teachers default=") and \
        "extra=" in line and "resume against the same teachers" in line
    assert not (routed["root"] / "other").exists()


def test_unroutable_prompts_and_a_pinned_fingerprint_that_differs_are_refused_at_start(routed, tmp_path, capsys):
    """Both refused by the launcher before any rank starts (in-process: no rank is started to wait for)."""
    cfg = yaml.safe_load(routed["cfg"].read_text())
    cfg["teachers"] = {"weak": cfg["teachers"]["weak"], "strong": cfg["teachers"]["default"]}
    cfg["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "no-default.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    assert launch(str(path), []) == 1
    assert one_line(capsys.readouterr().err) == (
        "brts train: teacher_route column 'data_source': 16 prompts route to no teacher and there is no 'default' "
        "teacher: values '(none)' (8), 'arith' (8); teachers: strong, weak (add a teacher of that name or one named "
        "'default')")
    assert launch(str(routed["cfg"]), [f"run_dir={tmp_path / 'pinned'}",
                                       "teachers.weak.expected_fingerprint=not-the-weak-teacher"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("brts train: teacher weak: teacher server ") and "expected not-the-weak-teacher" in line \
        and "teachers.weak.expected_fingerprint" in line


# ---------------------------------------------------------------------------------------- the cross-teacher pool

POOL = "candidate_teachers=[default, weak]"


def _pool_prompts(config, problems, wrong_truth: bool):
    """Requests for ``problems`` as the trainer builds them; ``wrong_truth``: a ground truth no candidate can match,
    so that every teacher's window is all wrong."""
    from brts.shared.client import Prompt

    ids = prompt_spec_of(config).encode_batch([p.problem for p in problems])
    return [Prompt(f"{p.id}@pool", tuple(i), "987654321" if wrong_truth else p.answer, config.n_candidates,
                   config.n_tier2) for p, i in zip(problems, ids)]


def test_a_cross_teacher_pool_keeps_each_teachers_top_k_and_draws_tier2_only_when_all_are_wrong(routed,
                                                                                                 teacher_pair):
    from brts.shared.data import load_dataset
    from brts.trainer.routing import teacher_of
    from brts.trainer.teacher_link import TeacherLink

    config, _ = load_train_config(routed["cfg"], [POOL])
    problems = load_dataset(config.dataset, config.teacher_route)
    names = config.teacher_entries()
    picked = problems_of(problems, names, "weak")[:2] + problems_of(problems, names, "default")[:2]
    routes = [teacher_of(p.route, names) for p in picked]
    def attempts() -> dict[str, float]:
        return {n: t["metrics"]().get("brts_tier2_total{event=attempt}", 0.0) for n, t in teacher_pair.items()}

    link = TeacherLink(config)
    try:
        before = attempts()
        wrong = link.candidates(_pool_prompts(config, picked, True), routes).wait("GetCandidates")
        drawn = {n: v - before[n] for n, v in attempts().items()}
        right = link.candidates(_pool_prompts(config, picked, False), routes).wait("GetCandidates")
        # each candidate's top-K is its own teacher's: Score at the teacher that wrote it gives its numbers back
        for cand, prompt in ((c, p) for res, p in zip(right, _pool_prompts(config, picked, False))
                             for c in res.candidates[::2]):
            seq = [[*prompt.prompt_ids, *cand.token_ids.tolist()]]
            own, = link.clients[cand.teacher].score(seq, [len(prompt.prompt_ids)], [cand.topk_ids], config.logprob_k)
            other_name = "weak" if cand.teacher == "default" else "default"
            other, = link.clients[other_name].score(seq, [len(prompt.prompt_ids)], [cand.topk_ids], config.logprob_k)
            # the cache stores log-probs in float16: equal to its relative precision
            np.testing.assert_allclose(own.candidate_logprobs, cand.topk_logprobs, rtol=2e-3, atol=1e-4)
            assert np.abs(other.candidate_logprobs - cand.topk_logprobs).max() > 1e-2
    finally:
        link.close()
    n = config.n_candidates
    for res, route in zip(wrong + right, routes + routes):
        assert [c.teacher for c in res.candidates if c.tier == 1] == ["default"] * n + ["weak"] * n
        assert {c.teacher for c in res.candidates if c.tier == 2} <= {route}
    for res in wrong:  # every window wrong: the routed teacher drew Tier 2 in round 2
        assert res.tier2_drawn > 0 and not any(c.correct for c in res.candidates if c.tier == 1)
    for res in right:
        if any(c.correct for c in res.candidates if c.tier == 1):  # a correct one anywhere in the union: no Tier 2
            assert res.tier2_drawn == 0 and not [c for c in res.candidates if c.tier == 2]
    # by each server's own counter: it drew the Tier 2 of the all-wrong prompts routed to it (fresh: a ground truth
    # never asked before), n_tier2 each, and none for the prompts routed to the other teacher
    for server, teacher in (("strong", "default"), ("weak", "weak")):
        assert drawn[server] == routes.count(teacher) * config.n_tier2 == 2 * config.n_tier2, (server, drawn)


def test_a_run_with_the_cross_teacher_pool_trains_and_resumes_exactly(routed, tmp_path):
    from brts.trainer.report import write_report

    # each listed teacher prewarmed for the pool: its own prompts (with Tier 2), then its windows of the others'
    for name, own in (("default", 16), ("weak", 8)):
        warm = subprocess.run([*BRTS, "prewarm", "--config", str(routed["cfg"]), "--route", name, "--no-progress",
                               POOL], capture_output=True, text=True, timeout=HANG_S, env=TRAIN_ENV, cwd=REPO)
        assert warm.returncode == 0, warm.stderr[-3000:]
        assert f"brts prewarm: prompts {own} (" in warm.stdout, warm.stdout
        assert f"brts prewarm: the other teachers' prompts, Tier 1 for the pool: prompts {24 - own} (" in warm.stdout
    run = tmp_path / "pool"
    first = train("--config", str(routed["cfg"]), POOL, f"run_dir={run}", "max_steps=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    recs = metrics(run)
    for r in recs:
        assert r["cache_hit_rate"] == 1.0  # every pool request (both rounds) was prewarmed with the same keys
        shares = [r["chosen/default/share"], r["chosen/weak/share"]]
        assert sum(s or 0.0 for s in shares) == pytest.approx(1.0)
        assert r["tier/skip"] == 0.0 or r["tier/skip"] is None
    again = train("--resume", str(run / "checkpoints" / "step_000001"), f"run_dir={tmp_path / 'again'}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = metrics(tmp_path / "again")
    assert [r["step"] for r in resumed] == [2]
    for key in ("loss", "loss/student_context", "loss/teacher_context", "grad_norm", "chosen/weak/share"):
        assert resumed[0][key] == pytest.approx(recs[1][key], rel=1e-4, abs=1e-6), key
    assert "teachers.png" in [p.name for p in write_report([run], tmp_path / "report")]
