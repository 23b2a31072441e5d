"""`brts serve` (toy teacher, hf engine) and `brts train` (2 gloo ranks, tiny student) as real processes.

Covers issue #8's end-to-end list: 3 steps with every metric and a checkpoint; two concurrent runs with different
seeds share the cache; a server that is down, a tokenizer mismatch and a malformed config each end with one line and
exit 1; a server that dies mid-run ends the run with exit 3 and a checkpoint of the last finished step. A run killed
(SIGTERM, then -9) and resumed is tests/reliability/test_trainer_kill.py; it compares with the same uninterrupted
run (the session fixture ``uninterrupted`` of tests/conftest.py, so the run happens once per session).
"""

from __future__ import annotations

import copy
import math
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_env import (  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
    HANG_S,
    ServerProcess,
    free_port,
    kill_group,
    make_student,
    metrics,
    one_line,
    start_train,
    train,
    wait_for_step,
    write_problems,
)

METRIC_KEYS = {
    "loss", "loss/student_context", "loss/teacher_context", "grad_norm", "tier/1", "tier/2", "tier/3", "tier/skip",
    "tier1_any_correct", "tier2/drawn", "tier2/rescued", "tier2/leaked", "overlap/chosen", "overlap/others",
    "overlap/teacher_student_topk", "length/rollout", "length/chosen", "cache_hit_rate", "tokens_per_s",
    "time/rollout", "time/teacher_wait", "time/score_wait", "time/selection_forward", "time/student_topk",
    "time/update", "time/weight_push", "time/step",
    # issue #24: Fig. 5's catch rate against the i.i.d. prediction, and the top-K masses of both branches
    "tier1_candidate_accuracy", "tier1_catch_rate_iid", "sc_student_mass", "sc_teacher_mass", "tc_teacher_mass",
    "tc_student_mass",
}


@pytest.fixture
def env(e2e_env):
    """The session's shared server, student and problems (tests/conftest.py; tests/reliability uses them too)."""
    return e2e_env


def _config(env, name: str, **values) -> Path:
    return env["config"](name, **values)


def test_three_steps_two_ranks_log_every_metric_and_checkpoint(uninterrupted):
    r, run = uninterrupted
    assert "tokenizer and vocabulary match" in r.stdout and "2 rank(s) on cpu" in r.stdout
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
    recs = metrics(run)
    assert [x["step"] for x in recs] == [1, 2, 3]
    for rec in recs:
        missing = METRIC_KEYS - set(rec)
        assert not missing, missing
        assert rec["prompts"] == 4 and rec["rows"] == 4
        assert math.isfinite(rec["loss"]) and rec["loss/student_context"] > 0 and rec["loss/teacher_context"] > 0
        assert rec["tokens/teacher_context"] > 0 and rec["tokens/student_context"] > 0
        assert abs(rec["tier/1"] + rec["tier/2"] + rec["tier/3"] + rec["tier/skip"] - 1) < 1e-9
        assert rec["time/step"] >= rec["time/update"] > 0 and rec["tokens_per_s"] > 0
        for key in ("tier1_candidate_accuracy", "tier1_catch_rate_iid", "sc_student_mass", "sc_teacher_mass",
                    "tc_teacher_mass", "tc_student_mass"):
            assert 0.0 <= rec[key] <= 1.0 + 1e-6, (key, rec[key])
    assert recs[0]["loss"] != recs[-1]["loss"]
    # in-training evaluation at the last step (eval_every=3): the same code as `brts eval`, merged into the line
    assert "eval/amc23/mean@2" in recs[2] and "eval/amc23/maj@2_bootstrap" in recs[2]
    assert not any(k.startswith("eval/") for k in recs[1])
    evaluated = (run / "eval" / "step_000003.jsonl").read_text().splitlines()
    assert len(evaluated) == 2 * 2 and "brts train: eval amc23/mean@2" in r.stdout
    assert (run / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()


def test_two_concurrent_runs_share_one_server_and_its_cache(env, tmp_path):
    """The second run starts after the first's step 1 and trains all its 3 steps while the first is still
    training: the first is given far more steps than it gets (a SIGTERM stops it once the second is done), so the
    overlap is built, not a race between two runs' speeds."""
    problems = write_problems(tmp_path / "small.jsonl", 8, seed=7)  # 4 prompts a step from 8: the runs share them
    common = {"dataset": str(problems), "sampling": {"max_new_tokens": 20}}  # a key space no other test used
    first = start_train("--config", str(_config(env, "con-1", seed=1, max_steps=1000, **common)),
                        log=tmp_path / "1.log")
    second = None
    try:
        wait_for_step(env["root"] / "con-1", 1, first)
        second = start_train("--config", str(_config(env, "con-2", seed=2, **common)), log=tmp_path / "2.log")
        assert second.wait(timeout=HANG_S) == 0, (tmp_path / "2.log").read_text()[-3000:]
        assert first.poll() is None, (tmp_path / "1.log").read_text()[-3000:]  # really concurrent throughout
        first.send_signal(signal.SIGTERM)  # the launcher passes it on; the ranks checkpoint and stop
        assert first.wait(timeout=HANG_S) == 0, (tmp_path / "1.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                kill_group(proc)
    one, two = metrics(env["root"] / "con-1"), metrics(env["root"] / "con-2")
    assert [x["step"] for x in two] == [1, 2, 3]
    assert [x["step"] for x in one] == list(range(1, len(one) + 1)) and len(one) < 1000
    assert one[0]["cache_hit_rate"] == 0.0  # nobody had asked for these before
    assert sum(x["cache_hit_rate"] for x in two) > 0  # the second run reads what the first made the server generate


def test_startup_problems_end_with_one_line(env, uninterrupted, tmp_path, capsys):
    """The command itself once (a subprocess: its stderr is the one line); the other refusals in-process, since the
    launcher refuses them before starting any rank (the same code path, without an interpreter start each)."""
    from brts.trainer.launch import launch

    down = train("--config", str(_config(env, "down", server=f"127.0.0.1:{free_port()}")))
    assert down.returncode == 1 and "not reachable" in one_line(down.stderr)

    def refused(config: str | None, *overrides: str, resume: str | None = None) -> str:
        capsys.readouterr()
        assert launch(config, list(overrides), resume) == 1
        return one_line(capsys.readouterr().err)

    from brts.shared.tokenizer import load_tokenizer

    other = copy.deepcopy(load_tokenizer("qwen2.5-instruct"))  # the loaded one is shared: never change it
    other.add_tokens(["<brts-extra-token>"])
    odd = make_student(tmp_path / "odd-student", tokenizer=other)
    assert "tokenizer mismatch" in refused(str(_config(env, "mismatch", student=str(odd))))
    assert "train.lr: must be > 0" in refused(str(_config(env, "bad")), "lr=-1")
    assert "overlap_mode" in refused(str(_config(env, "bad", overlap_mode="diagonal")))
    assert not (env["root"] / "bad" / "checkpoints").exists()

    _, run_a = uninterrupted  # a resume may change max_steps, save_every, server, ... but not the algorithm
    saved = (run_a / "config.yaml").read_text()
    changed = refused(None, "max_steps=4", "lr=0.5", resume=str(run_a))
    assert "different config: lr: 0.0001 in the checkpoint, 0.5 now" in changed
    assert (run_a / "config.yaml").read_text() == saved  # still the resumable config
    assert "no-such-run" in refused(None, resume=str(tmp_path / "no-such-run"))


def test_server_dying_mid_run_checkpoints_and_exits_3(toy_teacher_dir, env, tmp_path):
    server = ServerProcess(toy_teacher_dir, tmp_path / "cache")
    run = tmp_path / "run"
    cfg = _config(env, "dies", server=server.address, run_dir=str(run), server_retries=0, max_steps=20)
    proc = start_train("--config", str(cfg), log=tmp_path / "log")
    try:
        wait_for_step(run, 1, proc)
        server.kill()
        code = proc.wait(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    log = (tmp_path / "log").read_text()
    assert code == 3, log[-3000:]
    last = [line for line in log.splitlines() if line.strip()][-1]
    assert "teacher server default at" in last and "stopped answering" in last and "--resume" in last
    done = max(x["step"] for x in metrics(run))
    assert (run / "checkpoints" / f"step_{done:06d}" / "COMPLETE").is_file()  # no finished step was lost


def _bf16_teacher(folder: Path) -> Path:
    """A random Qwen2 in bfloat16 wide enough (hidden 512) that its CPU kernels round a sequence differently in
    different batches (measured: ~8e-3 nats apart; at hidden 64 bf16 batchings agree bit for bit)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=[151645, 151643])
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [151645, 151643]
    model.save_pretrained(folder)
    load_tokenizer("qwen2.5-instruct").save_pretrained(folder)
    return folder


def test_a_teacher_that_disagrees_with_itself_is_refused(env, tmp_path):
    """The agreement check for real: a bf16 teacher passes at its dtype's default tolerance with the disagreement it
    measured, and `brts train` with a tolerance below that measurement refuses to start with one line."""
    from brts.trainer.config import load_train_config
    from brts.trainer.teacher_link import StartupError, check_server

    server = ServerProcess(_bf16_teacher(tmp_path / "bf16-teacher"), tmp_path / "cache", ["--dtype", "bfloat16"])
    try:
        cfg = _config(env, "agree", server=server.address)
        config, _ = load_train_config(cfg)
        (report,) = check_server(config, {})
        measured = report.agreement.disagreement
        print(report.agreement.line())  # shown with -s: the figure for the notes
        assert report.agreement.dtype == "bfloat16" and report.agreement.tolerance == 0.1 and report.agreement.ok
        assert 0 < measured < 0.1, report.line()
        with pytest.raises(StartupError, match="teacher agreement"):
            check_server(load_train_config(cfg, [f"teacher_agreement_tolerance={measured / 10!r}"])[0], {})
        refused = train("--config", str(cfg), f"teacher_agreement_tolerance={measured / 10!r}")
    finally:
        server.stop()
    assert refused.returncode == 1
    line = one_line(refused.stderr)
    assert "teacher agreement" in line and "disagrees by at most" in line and "teacher_agreement_tolerance" in line
    assert not (env["root"] / "agree" / "checkpoints").exists()


def _wider_teacher(toy_teacher_dir: Path, folder: Path, extra: int = 128) -> Path:
    """The toy teacher with ``extra`` more logits rows (151,936 + 128 = 152,064, the paper's 7B teacher's width):
    row 151,936 + j is half of the j-th used token's row, so these ids reach the teacher's top-K at most positions
    (half of a confident logit still beats the ~151k zero logits) while their sampling probability stays negligible."""
    import torch
    from transformers import AutoModelForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(toy_teacher_dir, dtype=torch.float32)
    old = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + extra, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight  # tied with the input embedding, as in the toy teacher
        used = (weight[:old].abs().sum(1) > 0).nonzero().flatten()
        weight[old:] = 0.5 * weight[used[torch.arange(extra) % len(used)]]
    model.save_pretrained(folder)
    load_tokenizer(toy_teacher_dir).save_pretrained(folder)
    return folder


def test_a_teacher_wider_than_the_student_trains_with_tails(toy_teacher_dir, env, tmp_path):
    """Issue #23, bug 3: a teacher whose logits dimension exceeds the student's (152,064 vs 151,936). Its cached
    top-K ids beyond the student's vocabulary become padding in the teacher-context rows (counted), instead of
    killing the step. The same run has both tail buckets on (issue #24: the padded ids' mass goes to the tails)
    and evaluates before its first step (eval_at_start: a step-0 record)."""
    teacher = _wider_teacher(toy_teacher_dir, tmp_path / "wide-teacher")
    server = ServerProcess(teacher, tmp_path / "cache")
    run = tmp_path / "run"
    try:
        cfg = _config(env, "wide", server=server.address, run_dir=str(run), max_steps=2, launch={"nproc": 1},
                      sc_tail=True, tc_tail=True, eval_at_start=True, eval_benchmarks=["amc23"], eval_limit=2,
                      eval_n=1, eval_max_new_tokens=8)
        r = train("--config", str(cfg))
    finally:
        server.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    start, *recs = metrics(run)
    assert start["step"] == 0 and "eval/amc23/mean@1" in start and "loss" not in start  # eval_at_start
    assert (run / "eval" / "step_000000.jsonl").is_file()
    assert [x["step"] for x in recs] == [1, 2]
    assert sum(x["teacher/topk_ids_beyond_student_vocab"] for x in recs) > 0  # the wide ids really came
    for rec in recs:
        assert math.isfinite(rec["loss/teacher_context"]) and rec["tokens/teacher_context"] > 0
        assert math.isfinite(rec["loss/student_context"]) and 0 < rec["tc_student_mass"] <= 1
