"""The training loop's parts on their own: sampler, freshness windows, the student's no-grad top-K, rollouts with a
weight push, the metrics file on resume. (The choice against the live student is tested beside the rule, in
test_selection.py; the micro-batch alignment in test_microbatch.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from brts.trainer.sampler import PromptSampler, keyed_seed, pool_offset

# ------------------------------------------------------------------------------------------------ sampler


def test_sampler_shards_partition_each_step_and_epochs_cover_the_dataset():
    n, per_step, world = 10, 4, 3
    full = PromptSampler(n, per_step, seed=5)
    for step in range(6):
        shards = [PromptSampler(n, per_step, 5, r, world).draw(step) for r in range(world)]
        merged = sorted((d.position, d.item) for s in shards for d in s)
        assert merged == sorted((d.position, d.item) for d in full.draw_all(step))
        assert [d.position for d in full.draw_all(step)] == list(range(step * per_step, (step + 1) * per_step))
    stream = [d for step in range(5) for d in full.draw_all(step)]  # 20 positions = 2 epochs
    for epoch in (0, 1):
        assert sorted(d.item for d in stream if d.epoch == epoch) == list(range(n))
    assert [d.item for d in stream[:n]] != [d.item for d in stream[n:]]  # a fresh permutation per epoch
    assert PromptSampler(n, per_step, 5).draw_all(3) == full.draw_all(3)  # pure in (seed, step)
    assert PromptSampler(n, per_step, 6).draw_all(0) != full.draw_all(0)


def test_sampler_rejects_bad_arguments_by_name():
    with pytest.raises(ValueError, match="dataset"):
        PromptSampler(0, 4, 0)
    with pytest.raises(ValueError, match="prompts_per_step"):
        PromptSampler(4, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        PromptSampler(4, 4, 0, rank=2, world_size=2)


def test_pool_windows_follow_the_freshness_policy():
    assert pool_offset("cached", 4, epoch=3, step=9) == 0
    assert pool_offset("per_epoch", 4, epoch=3, step=9) == 12
    assert pool_offset("per_step", 4, epoch=3, step=9) == 36
    with pytest.raises(ValueError, match="freshness"):
        pool_offset("sometimes", 4, 0, 0)
    assert keyed_seed(1, "rollout", 2, 3) == keyed_seed(1, "rollout", 2, 3) != keyed_seed(1, "rollout", 2, 4)
    assert 0 <= keyed_seed("x") < 2**63


# ------------------------------------------------------------------------------------------------ student top-K


def test_teacher_requests_carry_the_paper_settings():
    """Issue #23: the trainer always sends perturb_position and tier2_keep_leaked (the server's unset values mean
    the old behaviour, so the trainer's own defaults must travel explicitly)."""
    from brts.shared.config import TrainConfig
    from brts.shared.data import Problem
    from brts.trainer.sampler import PromptDraw
    from brts.trainer.step_prompts import StepPrompt, teacher_requests

    sp = StepPrompt(PromptDraw(item=0, position=3, epoch=0), Problem("p0", "What is 1+1?", "2", "toy"), (1, 2, 3))
    (default,) = teacher_requests([sp], TrainConfig(student="s", n_candidates=2, perturbation="Think."), step=0)
    assert (default.perturb_position, default.tier2_keep_leaked, default.perturbation, default.perturb_slot) == (
        "user", False, "Think.", 1)
    config = TrainConfig(student="s", n_candidates=2, perturb_position="after_template", tier2_keep_leaked=True)
    (other,) = teacher_requests([sp], config, step=0)
    assert (other.perturb_position, other.tier2_keep_leaked, other.perturbation) == ("after_template", True, "")


def test_student_topk_matches_a_plain_forward(tiny_qwen2_local):
    from brts.trainer.fsdp import StudentLogProbs
    from brts.trainer.student_forward import student_topk

    model = tiny_qwen2_local
    wrapper = StudentLogProbs(model, chunk_size=3)
    seqs = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    starts = [2, 1, 4]
    out = student_topk(wrapper, seqs, starts, k=4, budget=8, device=torch.device("cpu"))  # several micro-batches
    for seq, start, (ids, lps) in zip(seqs, starts, out):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
        want = logits[start - 1 : len(seq) - 1].topk(4)
        assert ids.shape == (len(seq) - start, 4)
        assert torch.equal(ids, want.indices)
        torch.testing.assert_close(lps, want.values, atol=1e-5, rtol=0)


@pytest.fixture
def tiny_qwen2_local():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------------ rollouts


def test_hf_rollouts_are_seeded_and_follow_pushed_weights(tmp_path, tiny_qwen2_local):
    from brts.trainer.rollout import HFRollouts

    model = tiny_qwen2_local
    model.generation_config.eos_token_id = 3
    model.save_pretrained(tmp_path / "m")
    engine = HFRollouts(tmp_path / "m", "cpu", "float32")
    prompts, seeds = [[1, 2, 5], [7, 8]], [[11, 12], [13]]
    a = engine.generate(prompts, seeds, 6, 1.0)
    assert [len(x) for x in a] == [2, 1]
    assert engine.generate(prompts, seeds, 6, 1.0) == a  # reproducible from the seeds
    assert engine.generate(prompts[::-1], seeds[::-1], 6, 1.0) == a[::-1]  # whatever the batch
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"].zero_()
    state["model.embed_tokens.weight"].zero_()
    engine.push_weights(state)
    assert torch.equal(engine.model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert engine.generate(prompts, seeds, 6, 1.0) != a
    with pytest.raises(KeyError, match="lacks"):
        engine.push_weights({"model.norm.weight": state["model.norm.weight"]})


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_file_drops_steps_after_the_resumed_checkpoint(tmp_path):
    from brts.trainer.metrics import MetricsWriter

    w = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        w.write({"step": step, "loss": float(step)})
    w.close()
    w = MetricsWriter(tmp_path, resume_step=2)  # step 3 was logged but its checkpoint never landed
    w.write({"step": 3, "loss": 30.0})
    w.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
