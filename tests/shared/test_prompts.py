"""brts.shared.prompts.PromptSpec: one problem -> one set of prompt ids, everywhere."""

from __future__ import annotations

import pytest

from brts.shared.prompts import (
    DEFAULT_INSTRUCTION_SUFFIX,
    PromptSpec,
    PromptTooLongError,
)
from brts.shared.tokenizer import bundled_tokenizer_dir, load_chat_template

PROBLEM = "Let $x^2 = \\frac{9}{4}$ with $x > 0$. Find  $4x$.\n(Two spaces, a newline, and ü.)"
DS_BOS = "<｜begin▁of▁sentence｜>"


@pytest.fixture(scope="module")
def ds_spec(qwen_tokenizer):
    """The DeepSeek-R1-Distill template rendered through the Qwen tokenizer."""
    return PromptSpec.from_options(tokenizer=qwen_tokenizer, chat_template="deepseek-r1-distill-qwen")


def test_default_suffix_is_the_exact_boxed_instruction():
    assert DEFAULT_INSTRUCTION_SUFFIX == "Please reason step by step, and put your final answer within \\boxed{}."


def test_qwen_chatml_render(qwen_spec):
    text = qwen_spec.render(PROBLEM)
    assert text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{PROBLEM} {DEFAULT_INSTRUCTION_SUFFIX}<|im_end|>\n" in text
    # system_prompt=None passes no system message, so the template's own default applies
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_qwen_ids_use_the_special_token_ids(qwen_spec, qwen_tokenizer):
    ids = qwen_spec.encode(PROBLEM)
    im_start = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start
    assert ids.count(im_start) == 3  # system, user, assistant: markers are single ids, not BPE pieces
    assert qwen_tokenizer.decode(ids[-3:]) == "<|im_start|>assistant\n"


def test_explicit_system_prompt_replaces_the_default(qwen_tokenizer):
    spec = PromptSpec(tokenizer=qwen_tokenizer, system_prompt="Be brief.")
    text = spec.render(PROBLEM)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "You are Qwen" not in text


def test_deepseek_template_render_is_exact(ds_spec):
    expected = f"{DS_BOS}<｜User｜>{PROBLEM} {DEFAULT_INSTRUCTION_SUFFIX}<｜Assistant｜><think>\n"
    assert ds_spec.render(PROBLEM) == expected
    assert ds_spec.template_kwargs["bos_token"] == DS_BOS


@pytest.mark.parametrize("which", ["qwen", "deepseek"])
def test_encode_decode_round_trip_keeps_the_text(which, qwen_spec, ds_spec, qwen_tokenizer):
    spec = qwen_spec if which == "qwen" else ds_spec
    ids = spec.encode(PROBLEM)
    assert qwen_tokenizer.decode(ids) == spec.render(PROBLEM)


def test_same_options_give_identical_ids_and_fingerprints(qwen_spec):
    other = PromptSpec.from_options()  # bundled Qwen by name: the cached tokenizer
    assert other.encode(PROBLEM) == qwen_spec.encode(PROBLEM)
    assert other.fingerprint() == qwen_spec.fingerprint()
    again = PromptSpec.from_options(chat_template="deepseek-r1-distill-qwen")
    via_file = PromptSpec.from_options(
        chat_template=bundled_tokenizer_dir("deepseek-r1-distill-qwen") / "tokenizer_config.json"
    )
    assert again.encode(PROBLEM) == via_file.encode(PROBLEM)
    assert again.fingerprint() == via_file.fingerprint()


def test_literal_template_string_is_used_verbatim(qwen_tokenizer):
    spec = PromptSpec.from_options(
        tokenizer=qwen_tokenizer, chat_template="{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    )
    assert spec.render("1+1?") == f"Q: 1+1? {DEFAULT_INSTRUCTION_SUFFIX}\nA:"


def test_fingerprint_changes_with_every_setting(qwen_spec, qwen_tokenizer, ds_spec):
    template, _ = load_chat_template("qwen2.5-instruct")
    variants = [
        PromptSpec(tokenizer=qwen_tokenizer, instruction_suffix="Think."),
        PromptSpec(tokenizer=qwen_tokenizer, suffix_separator="\n"),
        PromptSpec(tokenizer=qwen_tokenizer, system_prompt=""),
        PromptSpec(tokenizer=qwen_tokenizer, max_prompt_len=512),
        PromptSpec(tokenizer=qwen_tokenizer, template_kwargs={"bos_token": "<s>"}),
        ds_spec,
    ]
    fps = [qwen_spec.fingerprint()] + [v.fingerprint() for v in variants]
    assert len(set(fps)) == len(fps)
    # The tokenizer's own template spelled out explicitly is the same prompt: same fingerprint.
    assert PromptSpec(tokenizer=qwen_tokenizer, chat_template=template).fingerprint() == qwen_spec.fingerprint()


def test_suffix_and_separator_placement(qwen_tokenizer):
    newline = PromptSpec(tokenizer=qwen_tokenizer, suffix_separator="\n\n")
    assert f"{PROBLEM}\n\n{DEFAULT_INSTRUCTION_SUFFIX}<|im_end|>" in newline.render(PROBLEM)
    bare = PromptSpec(tokenizer=qwen_tokenizer, instruction_suffix="")
    assert f"user\n{PROBLEM}<|im_end|>" in bare.render(PROBLEM)  # no dangling separator


def test_too_long_prompt_raises_with_length_and_limit(qwen_tokenizer):
    spec = PromptSpec(tokenizer=qwen_tokenizer, max_prompt_len=10)
    with pytest.raises(PromptTooLongError, match=r"prompt has \d+ tokens, more than max_prompt_len=10") as info:
        spec.encode(PROBLEM)
    assert isinstance(info.value, ValueError)
    assert info.value.limit == 10 and info.value.length > 10
    # one token of headroom is enough: the limit is inclusive
    exact = PromptSpec(tokenizer=qwen_tokenizer, max_prompt_len=info.value.length)
    assert len(exact.encode(PROBLEM)) == info.value.length


def test_encode_batch_matches_encode_and_names_the_long_index(qwen_spec, qwen_tokenizer):
    problems = ["1+1?", PROBLEM, "x" * 50]
    assert qwen_spec.encode_batch(problems) == [qwen_spec.encode(p) for p in problems]
    short = PromptSpec(tokenizer=qwen_tokenizer, max_prompt_len=len(qwen_spec.encode("1+1?")))
    with pytest.raises(PromptTooLongError, match="problem index 1") as info:
        short.encode_batch(problems)
    assert info.value.index == 1
    assert len(short.encode_batch(problems, check_length=False)) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_prompt_len": 0}, "max_prompt_len"),
        ({"max_prompt_len": True}, "max_prompt_len"),
        ({"max_prompt_len": 10.0}, "max_prompt_len"),
        ({"chat_template": ""}, "chat_template"),
        ({"instruction_suffix": None}, "instruction_suffix"),
        ({"system_prompt": 3}, "system_prompt"),
        ({"template_kwargs": {"bos_token": 1}}, "template_kwargs"),
        ({"template_kwargs": {"add_generation_prompt": "x"}}, "template_kwargs"),
    ],
)
def test_invalid_settings_name_the_field(qwen_tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        PromptSpec(tokenizer=qwen_tokenizer, **kwargs)


def test_invalid_inputs_name_the_field(qwen_spec):
    with pytest.raises(ValueError, match="tokenizer"):
        PromptSpec(tokenizer="qwen2.5-instruct")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chat_template"):
        PromptSpec.from_options(chat_template="no-such-template")
    with pytest.raises(ValueError, match="problem"):
        qwen_spec.render("   ")


def test_template_kwargs_are_copied(qwen_tokenizer):
    kwargs = {"bos_token": DS_BOS}
    template, _ = load_chat_template("deepseek-r1-distill-qwen")
    spec = PromptSpec(tokenizer=qwen_tokenizer, chat_template=template, template_kwargs=kwargs)
    before = spec.render("1+1?")
    kwargs["bos_token"] = "<changed>"
    assert spec.render("1+1?") == before
