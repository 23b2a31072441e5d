"""brts.shared.tokenizer: offline loading, caching, fingerprints and chat-template configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AddedToken, AutoTokenizer

import brts.shared
from brts.shared.tokenizer import (
    BUNDLED_TOKENIZERS,
    bundled_data_dir,
    bundled_tokenizer_dir,
    load_chat_template,
    load_tokenizer,
    tokenizer_fingerprint,
)

DS_BOS = "<｜begin▁of▁sentence｜>"
DS_EOS = "<｜end▁of▁sentence｜>"


def fresh_qwen():
    """A private, uncached copy we may mutate (the cached one is shared by every test)."""
    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir("qwen2.5-instruct"), local_files_only=True)


def test_bundled_data_dir_is_inside_the_package():
    data = bundled_data_dir()
    assert data == Path(brts.shared.__file__).parent / "data"
    assert (data / "tokenizers" / "qwen2.5-instruct" / "vocab.json").is_file()
    assert "/work/shared" not in str(data.resolve())


def test_bundled_tokenizer_dir_names_and_unknown_name():
    for name in BUNDLED_TOKENIZERS:
        assert (bundled_tokenizer_dir(name) / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="qwen2.5-instruct, deepseek-r1-distill-qwen"):
        bundled_tokenizer_dir("llama")


def test_qwen_tokenizer_matches_the_documented_facts(qwen_tokenizer):
    assert len(qwen_tokenizer) == 151_665
    assert qwen_tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert qwen_tokenizer.eos_token == "<|im_end|>"
    assert qwen_tokenizer.pad_token == "<|endoftext|>"
    assert min(qwen_tokenizer.added_tokens_decoder) == 151_643
    assert max(qwen_tokenizer.added_tokens_decoder) == 151_664


def test_load_tokenizer_is_cached_per_resolved_path(qwen_tokenizer, monkeypatch):
    folder = bundled_tokenizer_dir("qwen2.5-instruct")
    assert load_tokenizer("qwen2.5-instruct") is qwen_tokenizer
    assert load_tokenizer(folder) is qwen_tokenizer
    monkeypatch.chdir(folder.parent)
    assert load_tokenizer("./qwen2.5-instruct") is qwen_tokenizer  # relative spelling, same folder


def test_config_only_folder_does_not_load_and_says_why():
    with pytest.raises(ValueError, match=r"deepseek-r1-distill-qwen has no tokenizer files.*load_chat_template"):
        load_tokenizer("deepseek-r1-distill-qwen")


def test_missing_path_and_file_path_are_rejected_by_name(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        load_tokenizer(missing)
    a_file = tmp_path / "vocab.json"
    a_file.write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(a_file)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match=r"empty has no tokenizer files.*found nothing"):
        load_tokenizer(empty_dir)
    with pytest.raises(ValueError, match="could not be loaded offline"):
        load_tokenizer("no-such-org/no-such-model")  # a hub id not in the local cache: never the network


def test_fingerprint_is_stable_across_loads(qwen_tokenizer):
    fp = tokenizer_fingerprint(qwen_tokenizer)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(fresh_qwen()) == fp


def test_fingerprint_changes_with_added_tokens_and_their_flags(qwen_tokenizer):
    base = tokenizer_fingerprint(qwen_tokenizer)
    special = fresh_qwen()
    assert tokenizer_fingerprint(special) == base
    special.add_tokens([AddedToken("<extra>", special=True)], special_tokens=True)
    changed = tokenizer_fingerprint(special)  # same object, mutated: the memo must not return the old value
    assert changed != base
    plain = fresh_qwen()
    plain.add_tokens([AddedToken("<extra>", special=False)])
    assert special.convert_tokens_to_ids("<extra>") == plain.convert_tokens_to_ids("<extra>")  # same id map ...
    assert tokenizer_fingerprint(plain) not in {base, changed}  # ... but the special flag still counts


def test_fingerprint_rejects_non_tokenizers():
    with pytest.raises(ValueError, match="tokenizer"):
        tokenizer_fingerprint("qwen2.5-instruct")  # type: ignore[arg-type]


def test_load_chat_template_deepseek_gives_template_and_bos_eos():
    template, kwargs = load_chat_template("deepseek-r1-distill-qwen")
    assert "<｜Assistant｜><think>\\n" in template
    assert kwargs == {"bos_token": DS_BOS, "eos_token": DS_EOS}


def test_load_chat_template_qwen_leaves_unset_bos_out(qwen_tokenizer):
    template, kwargs = load_chat_template("qwen2.5-instruct")
    assert template == qwen_tokenizer.chat_template
    assert kwargs == {"eos_token": "<|im_end|>"}  # bos is null in the config: not passed as "None"


def test_load_chat_template_accepts_directory_and_file():
    folder = bundled_tokenizer_dir("deepseek-r1-distill-qwen")
    by_name = load_chat_template("deepseek-r1-distill-qwen")
    assert load_chat_template(folder) == by_name
    assert load_chat_template(folder / "tokenizer_config.json") == by_name


def test_load_chat_template_errors_name_path_and_field(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_chat_template(tmp_path / "missing.json")
    no_template = tmp_path / "tokenizer_config.json"
    no_template.write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"field 'chat_template'"):
        load_chat_template(no_template)
    bad_bos = tmp_path / "bad" / "tokenizer_config.json"
    bad_bos.parent.mkdir()
    bad_bos.write_text(json.dumps({"chat_template": "{{ x }}", "bos_token": 5}))
    with pytest.raises(ValueError, match=r"field 'bos_token'"):
        load_chat_template(bad_bos.parent)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        load_chat_template(broken)
