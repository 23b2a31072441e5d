"""`brts demo --teachers 2` for real at a tiny budget: two servers, prewarm, eval, BRTS, OPD and pooled BRTS runs,
report, table; then run again.

The models are the session's fitted toy teacher and a cached fit of the toy student, copied into the demo's folder
(their fit markers make the demo reuse them), so the test pays for the pipeline, not for fitting. The second teacher
is the toy student's fit too (``second_fit`` names its recipe, so its marker matches): a weaker teacher, as in
``teacher_pair``. The one-teacher demo is this run less the second server and the pooled method.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import pytest

from brts.demo import SECOND_QUALITY, DemoPaths, DemoSettings, _write_problems, _write_train_configs, run_demo
from brts.demo_runs import DemoError, train_command
from brts.toy import QUALITIES

TINY = DemoSettings(problems=8, held_out=4, steps=2, prompts_per_step=4, eval_n=2, teachers=2,
                    second_fit=asdict(QUALITIES["student"]))
ROWS = ["before (untrained student)", "after OPD (student-only)", "after BRTS", "after BRTS, 2-teacher pool"]


@pytest.fixture(scope="module")
def demo_out(toy_teacher_dir, toy_student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    shutil.copytree(toy_teacher_dir, out / "models" / "teacher")
    shutil.copytree(toy_student_dir, out / "models" / "student")
    shutil.copytree(toy_student_dir, out / "models" / SECOND_QUALITY)
    said: list[str] = []
    first = run_demo(out, seeds=1, settings=TINY, say=said.append)
    return out, first, said


def test_the_demo_runs_end_to_end_and_prints_the_table(demo_out):
    out, summary, said = demo_out
    assert list(summary["accuracy"]) == ["problems", "held_out"]
    for acc in summary["accuracy"].values():
        assert list(acc) == ROWS
        for row in acc.values():
            assert len(row["per_seed"]) == 1 and 0.0 <= row["mean"] <= 1.0
    before = json.loads((out / "eval-before" / "seed0" / "summary.json").read_text())["benchmarks"]
    assert before["held_out"]["size"] == TINY.held_out and before["problems"]["size"] == TINY.problems
    tiers = summary["tiers"]
    assert sum(tiers.values()) == pytest.approx(1.0)
    assert summary["prewarm"]["prompts"] == TINY.problems and summary["prewarm"]["cache_hits"] == 0
    assert summary["prewarm"]["tokens_generated"] > 0
    assert summary["train_cache_hit_rate"] == 1.0  # every training request was prewarmed
    printed = "\n".join(said)
    assert "BRTS - OPD:" in printed and "Tier composition" in printed and "outputs in" in printed
    assert "held-out problems: BRTS - OPD:" in printed and "never trained on" in printed
    assert (out / "summary.md").read_text().count("|") >= 12
    assert json.loads((out / "summary.json").read_text())["settings"]["steps"] == TINY.steps
    for name in ("losses.png", "tiers.png", "cache_hits.png", "eval.png", "summary.md"):
        assert (out / "report" / name).stat().st_size > 0, name
    for method in ("brts", "opd", "brts-pool"):
        lines = [json.loads(x) for x in (out / "runs" / f"{method}-seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2] and all(m in lines[-1] for m in TINY.metrics)
    opd_lines = (out / "runs" / "opd-seed0" / "metrics.jsonl").read_text()
    assert '"loss/teacher_context": 0.0' in opd_lines  # the baseline really has no teacher branch
    assert "chosen/" not in (out / "runs" / "brts-seed0" / "metrics.jsonl").read_text()  # one teacher: no pool


def test_the_pooled_run_chooses_among_both_teachers_and_the_table_says_how_often(demo_out):
    out, summary, said = demo_out
    pool = summary["pool"]
    assert pool["train_hit_rate"] == 1.0  # the second teacher's Tier-1 windows were prewarmed too
    second = pool["second_prewarm"]
    assert second["prompts"] == TINY.problems and second["tier2_tried"] == 0 and second["tokens_generated"] > 0
    shares = pool["shares"]
    assert set(shares) == {"default", "second"}
    assert sum(x["all"] for x in shares.values()) == pytest.approx(1.0)
    decided = TINY.steps * TINY.prompts_per_step * (1 - pool["tiers"]["skip"])
    assert sum(x["chosen"] for x in shares.values()) == pytest.approx(decided)
    config = (out / "configs" / "brts-pool.yaml").read_text()
    assert "candidate_teachers:" in config and "\nserver:" not in config
    printed = "\n".join(said)
    assert "Which teacher wrote the candidate" in printed and "| second" in printed and "| default" in printed
    assert "pool - BRTS:" in printed and "Second teacher's cache: prewarm found 0/8" in printed
    assert "`second` the toy second teacher ('3+4=7. \\boxed{7}', fitted to 30% exact match)" in printed
    assert (out / "report" / "teachers.png").stat().st_size > 0


def test_running_again_reuses_everything_and_shows_the_warm_cache(demo_out):
    out, first, _ = demo_out
    metrics_before = {m: (out / "runs" / f"{m}-seed0" / "metrics.jsonl").read_text()
                      for m in ("brts", "opd", "brts-pool")}
    said: list[str] = []
    second = run_demo(out, seeds=1, settings=TINY, say=said.append)
    assert second["prewarm"]["cache_hits"] == TINY.problems and second["prewarm"]["tokens_generated"] == 0
    assert second["pool"]["second_prewarm"]["cache_hits"] == TINY.problems
    assert second["accuracy"] == first["accuracy"]
    for m, text in metrics_before.items():
        assert (out / "runs" / f"{m}-seed0" / "metrics.jsonl").read_text() == text  # not retrained
    assert f"{TINY.problems}/{TINY.problems} prompts already cached" in "\n".join(said)


def test_other_settings_in_the_same_folder_are_refused(demo_out):
    out, _, _ = demo_out
    with pytest.raises(DemoError, match="other settings"):
        run_demo(out, seeds=1, settings=DemoSettings(steps=3))
    with pytest.raises(DemoError, match="other settings"):
        run_demo(out, seeds=1, settings=replace(TINY, teachers=1))


def test_each_run_is_skipped_resumed_or_started_fresh(tmp_path):
    paths = DemoPaths(tmp_path)
    configs = {"brts": tmp_path / "brts.yaml", "opd": tmp_path / "opd.yaml", "brts-pool": tmp_path / "pool.yaml"}
    one, two = {"default": "127.0.0.1:1"}, {"default": "127.0.0.1:2", "second": "127.0.0.1:3"}
    run = paths.run_dir("brts", 0)
    fresh = train_command(paths, TINY, configs, "brts", 0, one)
    assert fresh is not None and "--config" in fresh and "seed=0" in fresh and f"run_dir={run}" in fresh
    assert fresh[-1] == "server=127.0.0.1:1"
    pooled = train_command(paths, TINY, configs, "brts-pool", 0, two)
    assert pooled[-2:] == ["teachers.default.address=127.0.0.1:2", "teachers.second.address=127.0.0.1:3"]
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    resume = train_command(paths, TINY, configs, "brts", 0, {"default": "127.0.0.1:2"})
    assert resume is not None and resume[-3:] == ["--resume", str(run), "server=127.0.0.1:2"]
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2, **{m: 0.5 for m in TINY.metrics}}) + "\n")
    assert train_command(paths, TINY, configs, "brts", 0, {"default": "127.0.0.1:2"}) is None
    (run / "metrics.jsonl").write_text(  # the held-out set was never evaluated: not finished
        json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2, TINY.metric: 0.5}) + "\n")
    assert train_command(paths, TINY, configs, "brts", 0, {"default": "127.0.0.1:2"}) is not None
    other = paths.run_dir("opd", 0)
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")  # no checkpoint: nothing worth keeping
    assert "--config" in train_command(paths, TINY, configs, "opd", 0, {"default": "127.0.0.1:2"})
    assert not other.exists()


def test_held_out_problems_are_disjoint_fixed_and_of_the_same_generator(tmp_path):
    from brts.toy_task import parse_problem

    settings = DemoSettings(problems=25, held_out=20, max_operand=4)  # 50 problems in all: collisions are certain
    paths = DemoPaths(tmp_path)
    _write_problems(paths, settings)
    train = [json.loads(x) for x in paths.problems.read_text().splitlines()]
    held = [json.loads(x) for x in paths.held_out.read_text().splitlines()]
    assert len(train) == 25 and len(held) == 20
    texts = [r["problem"] for r in train], [r["problem"] for r in held]
    assert len(set(texts[0])) == 25 and len(set(texts[1])) == 20 and not set(texts[0]) & set(texts[1])
    assert all(max(parse_problem(t)[0], parse_problem(t)[2]) <= 4 for t in texts[0] + texts[1])
    first = paths.held_out.read_text()
    _write_problems(paths, settings)
    assert paths.held_out.read_text() == first  # fixed by problem_seed
    _write_problems(paths, DemoSettings(problems=25, held_out=20, max_operand=4, problem_seed=7))
    assert paths.held_out.read_text() != first


@pytest.mark.parametrize("kwargs, message", [
    ({"held_out": -1}, "held_out: must be >= 0"),
    ({"problems": 0}, "problems: must be >= 1"),
    ({"teachers": 3}, "teachers: must be 1 or 2, got 3"),
    ({"problems": 40, "held_out": 20, "max_operand": 4}, "problems \\+ held_out: 60 distinct problems asked of a task "
                                                          "with 50"),
])
def test_impossible_demo_settings_are_refused(kwargs, message):
    with pytest.raises(DemoError, match=message):
        DemoSettings(**kwargs)


def test_named_tasks_are_distinct_demos_with_the_same_held_out_evaluation():
    from brts.demo_tasks import TASKS, task_settings

    settings = [s for _, s in TASKS.values()]
    assert len({s.key() for s in settings}) == len(settings)  # each task gets its own folder key
    assert {(s.held_out, s.eval_n, s.eval_temperature, s.problem_seed) for s in settings} == {(64, 4, 0.7, 100)}
    assert task_settings("default") == DemoSettings()
    assert task_settings("styles", tails=True).tails and task_settings("styles", tails=True).teacher_fit == {
        "styles": ["work", "answer", "boxed"]}
    with pytest.raises(ValueError, match="--task: must be one of default"):
        task_settings("calculus")


def test_the_demo_writes_the_pool_config_only_with_two_teachers_and_it_loads(tmp_path):
    from brts.trainer.config import load_train_config

    assert set(_write_train_configs(DemoPaths(tmp_path / "one"), replace(TINY, teachers=1))) == {"brts", "opd"}
    two = _write_train_configs(DemoPaths(tmp_path / "two"), TINY)
    assert list(two) == ["brts", "opd", "brts-pool"]
    pool, _ = load_train_config(str(two["brts-pool"]), ("teachers.second.address=127.0.0.1:9",))
    assert pool.candidate_teachers == ("default", "second") and list(pool.teacher_entries()) == ["default", "second"]
    assert pool.teachers["second"].address == "127.0.0.1:9" and pool.teacher_branch
    brts, _ = load_train_config(str(two["brts"]), ())
    assert brts.candidate_teachers == () and list(brts.teacher_entries()) == ["default"]
