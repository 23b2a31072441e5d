"""The update is the same computation at 1 and 2 ranks (gloo, CPU): token means over the whole step and FSDP2's
divide factor make the loss and the updated weights agree to 1e-5; a non-finite gradient skips the step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "dist_scripts" / "update_worker.py"


def _run(tmp_path: Path, world: int, steps: int = 3, mode: str = "ok") -> dict:
    out = tmp_path / f"w{world}-{mode}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(WORKER),
           str(out), str(steps), mode]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """The default 3-step run at 2 ranks, shared by the tests that compare with it."""
    return _run(tmp_path_factory.mktemp("update"), 2)


def test_two_ranks_equal_one_process(tmp_path, two_ranks):
    one, two = _run(tmp_path, 1), two_ranks
    for a, b in zip(one["stats"], two["stats"]):
        assert a["sc_tokens"] == b["sc_tokens"] and a["tc_tokens"] == b["tc_tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"])
        assert not a["skipped"] and a["micro_batches"] >= 2
    assert one["stats"][0]["loss"] != one["stats"][-1]["loss"]  # the weights really moved
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, atol=1e-5, rtol=0)
    moved = max(float((w - two["weights"][n]).abs().max()) for n, w in one["weights"].items())
    assert moved < 1e-5


def test_activation_checkpointing_recomputes_every_layer_and_changes_nothing(tmp_path, two_ranks):
    """Issue #23: the student is in training mode, so checkpointing really runs (each layer's MLP runs twice per
    micro-batch: forward and recomputation), and 2 ranks with it on give the same losses, gradient norms and
    weights as with it off."""
    off, on = two_ranks, _run(tmp_path, 2, mode="ac")
    assert on["training"] and off["training"] and on["checkpointing"] and not off["checkpointing"]
    for a, b, calls_on, calls_off in zip(off["stats"], on["stats"], on["mlp_calls"], off["mlp_calls"]):
        assert calls_off == [a["micro_batches"]] * len(calls_off), calls_off  # one forward per micro-batch
        assert calls_on == [2 * b["micro_batches"]] * len(calls_on), calls_on  # plus one recomputation each
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-6 * max(1.0, a["grad_norm"])
    for name, w in off["weights"].items():
        torch.testing.assert_close(on["weights"][name], w, atol=1e-6, rtol=0)


def test_non_finite_gradient_skips_the_step(tmp_path):
    bad, one_step = _run(tmp_path, 1, steps=2, mode="nan"), _run(tmp_path, 1, steps=1)
    assert bad["stats"][1]["skipped"] and not bad["stats"][0]["skipped"]
    assert bad["stats"][1]["grad_norm"] != bad["stats"][1]["grad_norm"] or bad["stats"][1]["grad_norm"] == float("inf")
    for name, w in one_step["weights"].items():  # step 2 was dropped whole: the weights are those after step 1
        assert torch.equal(bad["weights"][name], w), name
