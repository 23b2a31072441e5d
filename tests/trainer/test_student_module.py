"""The student module the trainer differentiates (issue #23): training mode with dropout forced to 0, so that
activation checkpointing really runs and every forward of a step is the same function; and no KV cache built by
any training or no-grad forward."""

from __future__ import annotations

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from brts.trainer.fsdp import StudentLogProbs, train_mode_without_dropout


def _tiny(**overrides: float) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return Qwen2ForCausalLM(config).eval()  # eval mode, as from_pretrained returns it


def test_training_mode_with_dropout_forced_to_zero():
    model = _tiny(attention_dropout=0.25)
    model.model.layers[0].mlp.extra = torch.nn.Dropout(0.1)  # a dropout module as other architectures have
    forced = train_mode_without_dropout(model)
    assert model.training and all(m.training for m in model.modules())
    assert "config.attention_dropout=0.25" in forced
    assert any(name.endswith(".self_attn.attention_dropout=0.25") for name in forced)
    assert "model.layers.0.mlp.extra.p=0.1" in forced
    assert model.config.attention_dropout == 0.0 and model.model.layers[0].mlp.extra.p == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    ids = torch.randint(0, 200, (2, 12))
    a, b = model(ids).logits, model(ids).logits  # training mode, yet deterministic: nothing left to drop
    assert torch.equal(a, b)
    assert train_mode_without_dropout(_tiny()) == []  # Qwen2's defaults: nothing to force, nothing logged


def test_student_forward_builds_no_kv_cache(monkeypatch):
    made: list[int] = []
    original = DynamicCache.__init__

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - a pass-through spy
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "__init__", counting)
    model = _tiny()
    train_mode_without_dropout(model)
    ids = torch.randint(0, 200, (2, 10))
    model.model(input_ids=ids)  # the decoder's own default (config.use_cache=True) does build one: the spy works
    assert made, "the spy did not see the decoder's default cache"
    made.clear()
    wrapper = StudentLogProbs(model, chunk_size=4)
    attention, positions = torch.ones_like(ids), torch.arange(3, 9).expand(2, -1)
    lp = wrapper(ids, attention, positions, torch.randint(0, 200, (2, 6, 3)))
    lp.sum().backward()
    with torch.no_grad():
        wrapper(ids, attention, positions, None, 4)
    assert made == []
