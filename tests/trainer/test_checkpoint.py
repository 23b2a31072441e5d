"""Checkpoints (checkpoint, checkpoint_manager, export in brts.trainer) on CPU/gloo with real torchrun runs of
the tiny Qwen2 (ckpt_worker.py).

Three launches, shared by the tests (module fixtures; a launch costs ~10-20 s, mostly imports):
- ``first`` (2 ranks): an uninterrupted 4-step run, then in the same processes a fresh run of 2 steps saved at 2;
- ``second`` (2 ranks, new processes): resumes the run directory (``latest`` = step 2), runs steps 3-4 (compared
  with the uninterrupted run), keeps going with a sleep per step and is stopped by SIGTERM to the launcher;
- ``third`` (1 rank): resumes the world-2 step-2 checkpoint (DCP reshards).
The rest runs in this process without a process group (load into an unsharded wrapper, export, crash mid-save,
the ``CheckpointManager``'s cadence and stop, ``RUN/checkpoints/latest`` as ``brts train`` prints it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brts.trainer import checkpoint as ck
from brts.trainer import export
from brts.trainer.checkpoint_manager import CheckpointManager, SigtermCheckpointer

SCRIPTS = Path(__file__).parent / "dist_scripts"
WORKER = SCRIPTS / "ckpt_worker.py"
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: torchrun's 30 s default grace after a SIGTERM is a race on a loaded core
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
           TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
HANG_S = 1200.0  # hang guards only (pytest-timeout backs them)


def _cmd(world: int, out: Path, *args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(WORKER),
            str(out), *map(str, args)]


def _run(world: int, out: Path, *args: object) -> dict:
    r = subprocess.run(_cmd(world, out, *args), capture_output=True, text=True, timeout=HANG_S, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _train_config(run_dir: str, **kw):
    from brts.shared.config import TrainConfig

    return TrainConfig(student="tiny-qwen2", run_dir=run_dir, lr=1e-3, lam=0.5, token_budget=64, **kw)


def _update_worker():
    spec = importlib.util.spec_from_file_location("update_worker_for_ckpt", SCRIPTS / "update_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _tiny_model(tied: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def _assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, w in a.items():
        assert torch.equal(w, b[name]), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ckpt")
    run_dir = d / "run"
    first = _run(2, d / "first.pt", "--run-dir", run_dir, "--baseline-steps", 4, "--steps", 2, "--save-at", 2)
    progress, out = d / "progress", d / "second.pt"
    proc = subprocess.Popen(_cmd(2, out, "--run-dir", run_dir, "--resume", run_dir, "--steps", 1000, "--dump-at", 4,
                                 "--sleep", 0.15, "--progress", progress, "--bad-config-resume"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + HANG_S

    def reached() -> int:
        try:
            return int(progress.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    while reached() < 5:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"second run did not reach step 5: {proc.communicate()[0][-4000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to the ranks
    log = proc.communicate(timeout=HANG_S)[0]
    assert out.exists(), log[-4000:]
    return {"dir": d, "run_dir": run_dir, "first": first, "second": torch.load(out, weights_only=False), "log": log}


def test_resume_continues_exactly(runs):
    baseline, saved, resumed = runs["first"]["baseline"], runs["first"]["run"], runs["second"]["run"]
    assert [s["loss"] for s in saved["stats"]] == [s["loss"] for s in baseline["stats"][:2]]
    assert resumed["resumed_step"] == 2 and resumed["resumed_train_state"] == {"sampler": {"position": 2}}
    _assert_equal_weights(resumed["loaded_weights"], saved["weights"])
    for a, b in zip(baseline["stats"][2:4], resumed["stats"][:2]):  # steps 3 and 4
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    assert baseline["draws"][2:4] == resumed["draws"][:2]  # every rank's torch/random/numpy draws continue
    assert baseline["draws"][2] != baseline["draws"][0]
    _assert_equal_weights(resumed["dumps"][4], baseline["weights"])
    assert baseline["stats"][0]["loss"] != baseline["stats"][3]["loss"]


def test_bf16_masters_train_on_two_ranks_and_resume_exactly(tmp_path):
    """Issue #23: ``master_dtype: bfloat16`` (the authors' bf16 parameters and AdamW state) on 2 gloo ranks; a DCP
    resume after step 2 continues bit for bit like the uninterrupted 4 steps."""
    run_dir = tmp_path / "run"
    first = _run(2, tmp_path / "first.pt", "--run-dir", run_dir, "--baseline-steps", 4, "--steps", 2, "--save-at", 2,
                 "--master-dtype", "bfloat16")
    second = _run(2, tmp_path / "second.pt", "--run-dir", run_dir, "--resume", run_dir, "--steps", 4,
                  "--master-dtype", "bfloat16")
    baseline, saved, resumed = first["baseline"], first["run"], second["run"]
    assert {w.dtype for w in baseline["weights"].values()} == {torch.bfloat16}
    assert baseline["optimizer_dtypes"] == resumed["optimizer_dtypes"] == ["torch.bfloat16"]
    _assert_equal_weights(resumed["loaded_weights"], saved["weights"])
    assert [(s["loss"], s["grad_norm"]) for s in resumed["stats"]] == [
        (s["loss"], s["grad_norm"]) for s in baseline["stats"][2:4]]
    _assert_equal_weights(resumed["weights"], baseline["weights"])
    assert baseline["stats"][0]["loss"] != baseline["stats"][3]["loss"]  # bf16 steps still move the weights


def test_sigterm_saves_a_complete_checkpoint_that_resumes(runs):
    from brts.trainer.fsdp import StudentLogProbs
    from brts.trainer.update import UpdateConfig, Updater, make_optimizer

    second = runs["second"]["run"]
    step = second["final_step"]
    assert second["stopped"] and step >= 5, runs["log"][-3000:]
    root = runs["run_dir"] / "checkpoints"
    ckpt = root / f"step_{step:06d}"
    assert (ckpt / "COMPLETE").is_file() and (root / "latest").read_text().strip() == ckpt.name
    assert not list(root.glob(".tmp-*"))
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == step and meta["world_size"] == 2 and meta["train_state"] == {"sampler": {"position": step}}
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]

    # resume it here: one process, no process group, an unsharded wrapper (DCP reshards 2 -> 1)
    torch.manual_seed(123)
    wrapper = StudentLogProbs(_tiny_model(), chunk_size=16)
    opt = make_optimizer(wrapper, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    cfg = _train_config(str(runs["dir"] / "elsewhere"), max_steps=99, save_every=3)  # allowed to differ
    with pytest.warns(UserWarning, match="world size 2, resuming at 1"):
        got_step, train_state = ck.load_checkpoint(runs["run_dir"], wrapper, opt, config_dict=cfg.to_dict())
    assert got_step == step and train_state == {"sampler": {"position": step}}
    _assert_equal_weights(wrapper.state_dict(), second["weights"])
    assert all(int(s["step"]) == step for s in opt.state.values()) and len(opt.state) == len(second["weights"])
    uw = _update_worker()
    stats = Updater(wrapper, opt, UpdateConfig(lam=0.5, grad_clip=1.0, token_budget=64), torch.device("cpu")).step(
        uw.batch(100 + step, 7), uw.batch(200 + step, 5))
    assert not stats.skipped and stats.loss == stats.loss

    # and a single-process save of the continued run loads back bit-exactly
    path = ck.save_checkpoint(runs["dir"] / "single", step + 1, wrapper, opt, {"sampler": {"position": step + 1}},
                              cfg.to_dict())
    assert ck.is_complete(path) and json.loads((path / "meta.json").read_text())["world_size"] == 1
    fresh = StudentLogProbs(_tiny_model(), chunk_size=16)
    fresh_opt = make_optimizer(fresh, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    assert ck.load_checkpoint(path, fresh, fresh_opt)[0] == step + 1
    _assert_equal_weights(fresh.state_dict(), wrapper.state_dict())


def test_resume_at_world_size_one(runs):
    d = runs["dir"]
    ckpt = runs["run_dir"] / "checkpoints" / "step_000002"
    third = _run(1, d / "third.pt", "--run-dir", d / "run1", "--resume", ckpt, "--steps", 4)["run"]
    baseline, saved = runs["first"]["baseline"], runs["first"]["run"]
    assert third["resumed_step"] == 2 and third["resumed_train_state"] == {"sampler": {"position": 2}}
    _assert_equal_weights(third["loaded_weights"], saved["weights"])
    for a, b in zip(baseline["stats"][2:4], third["stats"]):  # 1 rank vs 2: same computation up to float order
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    for name, w in baseline["weights"].items():
        torch.testing.assert_close(third["weights"][name], w, atol=1e-5, rtol=0)


def test_different_config_names_the_keys(runs, tmp_path):
    err = runs["second"]["run"]["bad_config_error"]
    assert err is not None and "lr: 0.001 in the checkpoint, 0.002 now" in err and "logprob_k" in err, err
    assert "max_steps" not in err.split("):")[0]
    saved = _train_config("a", max_steps=5).to_dict()
    now = _train_config("b", max_steps=9, save_every=1, server="10.0.0.1:1").to_dict()
    assert ck.config_diff(saved, now) == {}
    now["sampling"]["seed"] = 3
    now["betas"] = (0.9, 0.99)
    assert ck.config_diff(saved, now) == {"betas": ([0.9, 0.999], [0.9, 0.99]), "sampling.seed": (0, 3)}
    assert list(ck.config_diff(saved, now, ignore=(*ck.RESUME_MUTABLE_KEYS, "sampling"))) == ["betas"]


def test_export_hf_round_trip(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    base, out = tmp_path / "base", tmp_path / "export"
    torch.manual_seed(7)
    _tiny_model().save_pretrained(base)  # the architecture (its weights are not the checkpoint's)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    ckpt = runs["run_dir"] / "checkpoints" / "step_000002"
    full = export.load_full_model_state(ckpt)
    saved = runs["first"]["run"]["weights"]
    _assert_equal_weights({f"model.{k}": v for k, v in full.items()}, saved)
    export.export_hf(ckpt, base, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    _assert_equal_weights({f"model.{k}": v for k, v in model.state_dict().items()}, saved)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 128}
    assert json.loads((out / "brts_export.json").read_text())["step"] == 2


def test_export_hf_tied_embeddings_in_base_dtype(tmp_path):
    """Qwen2.5's small models tie the LM head to the embeddings and ship in bf16: "auto" exports bf16."""
    from transformers import AutoModelForCausalLM

    from brts.trainer.fsdp import StudentLogProbs

    torch.manual_seed(3)
    student = _tiny_model(tied=True)
    wrapper = StudentLogProbs(student, chunk_size=16)
    path = ck.save_checkpoint(tmp_path / "run", 5, wrapper, None, {}, {})
    base = tmp_path / "base"
    _tiny_model(tied=True).to(torch.bfloat16).save_pretrained(base)
    export.export_hf(tmp_path / "run", base, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    want = student.state_dict()
    for name, w in model.state_dict().items():
        assert torch.equal(w, want[name].to(torch.bfloat16)), name
    assert ck.is_complete(path)


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from brts.trainer.fsdp import StudentLogProbs

    torch.manual_seed(0)
    wrapper = StudentLogProbs(_tiny_model(), chunk_size=16)
    opt = torch.optim.AdamW(wrapper.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    first = ck.save_checkpoint(tmp_path, 1, wrapper, opt, {"pos": 1}, {"lr": 1})  # no optimizer state yet: model only
    assert not opt.state and json.loads((first / "meta.json").read_text())["optimizer"] is False

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_rng_state", boom)  # dies after the DCP shards, before the RNG states and meta
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, wrapper, opt, {"pos": 2}, {"lr": 1})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_000002").is_dir() and not (root / "step_000002").exists()
    assert ck.resolve_checkpoint(tmp_path) == first
    (root / "step_000003").mkdir()  # a directory without COMPLETE is never taken
    (root / "latest").unlink()
    assert ck.resolve_checkpoint(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.resolve_checkpoint(root / "step_000003")
    with torch.no_grad():
        for p in wrapper.parameters():
            p.zero_()
    assert ck.load_checkpoint(tmp_path, wrapper, opt, config_dict={"lr": 1})[1] == {"pos": 1}
    _assert_equal_weights(wrapper.state_dict(), before)
    ck.save_checkpoint(tmp_path, 4, wrapper, opt, {"pos": 4}, {"lr": 1}, keep_last=1)  # cleans the crashed temp dir
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000004"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path / "nothing-here")


def test_sigterm_flag_without_process_group():
    previous = signal.getsignal(signal.SIGTERM)
    stopper = SigtermCheckpointer().install()
    try:
        assert not stopper.should_stop()
        signal.raise_signal(signal.SIGTERM)  # the handler has run when this returns: no sleep, no race
        assert stopper.requested and stopper.should_stop()
    finally:
        stopper.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous


def _resumable_student():
    from brts.trainer.fsdp import StudentLogProbs
    from brts.trainer.update import make_optimizer

    wrapper = StudentLogProbs(_tiny_model(), chunk_size=16)
    return wrapper, make_optimizer(wrapper, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)


def test_export_and_resume_take_the_latest_file_a_run_prints(runs, tmp_path, monkeypatch):
    """A run ends printing ``checkpoint RUN/checkpoints/latest``: ``brts train export`` and ``--resume`` take it."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from brts.cli import main as cli

    second = runs["second"]["run"]
    latest = runs["run_dir"] / "checkpoints" / "latest"
    final = runs["run_dir"] / "checkpoints" / f"step_{second['final_step']:06d}"
    assert ck.resolve_checkpoint(latest) == ck.resolve_checkpoint(runs["run_dir"]) == final

    base, out = tmp_path / "base", tmp_path / "export"
    _tiny_model().save_pretrained(base)
    result = CliRunner().invoke(cli, ["train", "export", str(latest), str(out), "--base-model", str(base)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    _assert_equal_weights({f"model.{k}": v for k, v in model.state_dict().items()}, second["weights"])

    # --resume: the CLI takes the file and the launcher reads the run's saved config beside it (this run has none)
    result = CliRunner().invoke(cli, ["train", "--resume", str(latest)])
    assert result.exit_code == 1 and f"{runs['run_dir'] / 'config.yaml'}: does not exist" in result.output, \
        result.output

    # ... and the ranks load it (one process here: DCP reshards 2 -> 1)
    wrapper, opt = _resumable_student()
    with pytest.warns(UserWarning, match="world size 2, resuming at 1"):
        step, state = ck.load_checkpoint(latest, wrapper, opt, config_dict=_train_config("x").to_dict())
    assert step == second["final_step"] and state == {"sampler": {"position": step}}
    _assert_equal_weights(wrapper.state_dict(), second["weights"])


def test_manager_saves_each_step_once_and_stops_on_sigterm(runs, tmp_path, monkeypatch):
    """Cadence, last-step, SIGTERM and teacher-down saves never write one step twice, nor the resumed one."""
    import brts.trainer.checkpoint_manager as cm

    saves: list[int] = []
    real_save = cm.save_checkpoint
    monkeypatch.setattr(cm, "save_checkpoint", lambda run_dir, step, *a, **k: saves.append(step)
                        or real_save(run_dir, step, *a, **k))
    step = runs["second"]["run"]["final_step"]
    cfg = _train_config(str(tmp_path / "cont"), max_steps=step + 3, save_every=step + 2)
    manager = CheckpointManager(cfg, torch.device("cpu"))
    manager.refuse_overwrite(None)  # the new run_dir is empty
    wrapper, opt = _resumable_student()
    with pytest.warns(UserWarning, match="world size 2"):
        got, state = manager.restore(str(runs["run_dir"] / "checkpoints" / "latest"), wrapper, opt)
    assert got == step and state == {"sampler": {"position": step}}
    manager.train_state = state
    manager.save_unsaved(step)  # a teacher outage right after resuming: the resumed step is on disk already
    manager.after_step(step + 1)  # neither the cadence nor the last step
    assert saves == []
    previous = signal.getsignal(signal.SIGTERM)
    manager.watch_signals()
    try:
        assert not manager.stop_requested(step + 1)
        signal.raise_signal(signal.SIGTERM)
        assert manager.stop_requested(step + 1) and saves == [step + 1]  # the stop saves the step
        manager.save_unsaved(step + 1)
        manager.after_step(step + 2)  # the cadence
        manager.after_step(step + 3)  # the last step
        assert manager.stop_requested(step + 3) and saves == [step + 1, step + 2, step + 3]
        manager.save_unsaved(step + 3)
    finally:
        manager.close()
    assert saves == [step + 1, step + 2, step + 3] and signal.getsignal(signal.SIGTERM) == previous
    assert [p.name for p in ck.list_checkpoints(cfg.run_dir)] == [f"step_{s:06d}" for s in saves]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        manager.refuse_overwrite(None)
    manager.refuse_overwrite(cfg.run_dir)  # resuming it is fine
