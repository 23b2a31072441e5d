"""The request fields of issue #23 reach the job as sent, and their unset values mean the old behaviour (so old
clients and `brts prewarm` keep today's prompts, pools and leak filter)."""

from __future__ import annotations

import pytest

from brts.proto import teacher_pb2
from brts.server.validation import Limits, RequestError, candidates_call
from brts.shared.engines.base import SamplingParams

LIMITS = Limits(vocab_size=1000, max_context=4096, max_logprob_k=16, max_prompts_per_call=8,
                max_samples_per_prompt=8, max_pool_offset=1000, max_new_tokens=64)
DEFAULT = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=32)


def _jobs(**fields):
    prompt = teacher_pb2.PromptRequest(prompt_id="p", prompt_ids=[1, 2, 3], ground_truth="2", n_tier1=2, n_tier2=1,
                                       perturbation="Think.", perturb_slot=1, **fields)
    request = teacher_pb2.CandidatesRequest(prompts=[prompt], logprob_k=4)
    return candidates_call(request, DEFAULT, 0, LIMITS, "teacher").jobs


def test_unset_fields_mean_the_old_behaviour():
    (job,) = _jobs()
    assert (job.keep_leaked, job.perturb_position) == (False, "after_template")


def test_set_fields_reach_the_job():
    (job,) = _jobs(tier2_keep_leaked=True, perturb_position="user")
    assert (job.keep_leaked, job.perturb_position) == (True, "user")
    (job,) = _jobs(perturb_position="after_template")
    assert job.perturb_position == "after_template"


def test_an_unknown_position_is_refused_by_name():
    with pytest.raises(RequestError, match=r"prompts\[0\]\.perturb_position: must be one of user, after_template"):
        _jobs(perturb_position="system")
