"""The Tier-2 hint: its exact text, where it goes in the prompt, and whether a response leaked it. Pure functions.

Tier 2 re-asks the teacher with the ground truth hidden in the prompt when all its Tier-1 samples were wrong
(brts-reference §4). The hinted prompt is used for generation only; every forward pass conditions on the
original prompt (§4.4). The reference keeps hinted samples that mention the key; we record a leak flag so the
pipeline can drop them (§10 item 8): a student trained on "the key says 34" learns to cite keys, not to solve.
"""

from __future__ import annotations

import re
from typing import Protocol

# Bumped whenever HINT_TEMPLATE or inject_hint changes: Tier-2 cache keys include it, because the hinted prompt
# (and so every Tier-2 sample) depends on both.
HINT_VERSION = "brts-hint-v1"

# Literal text of the reference (brts-reference §4.1), em-dashes (U+2014) and two-space-indented rules included.
HINT_TEMPLATE = (
    "[SILENT_VALIDATION_KEY \u2014 DO NOT MENTION IN THINKING OR RESPONSE: {gt}]\n\n"
    "STRICT RULES about the validation key:\n"
    "  1. NEVER mention, quote, paraphrase, or allude to it anywhere \u2014 not in <think>, not in your answer.\n"
    "  2. NEVER say things like 'the key says', 'based on the hint', 'the answer is given', "
    "'I can see the correct answer is', or any equivalent phrasing.\n"
    "  3. Your entire chain of thought must be derived from what you observe in the problem.\n"
    "  4. Only use the validation key silently as a final sanity-check after you have already reasoned to a "
    "conclusion \u2014 never as a starting point or shortcut."
)

# Tried in this order; the first one present wins and the hint goes before its LAST occurrence (§4.2).
ASSISTANT_MARKERS = ("<\uff5cAssistant\uff5c>", "<|Assistant|>", "<|im_start|>assistant", "Assistant:")


def build_hint(ground_truth: str) -> str:
    """The hint text for one ground truth. Uses ``replace``, not ``format``: answers may contain braces."""
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError("ground_truth: a non-empty string is required to build a Tier-2 hint")
    return HINT_TEMPLATE.replace("{gt}", ground_truth)


def inject_hint(prompt_text: str, hint: str) -> str:
    """Insert ``hint`` before the last assistant marker of a templated prompt (brts-reference §4.2).

    ``prefix.rstrip() + "\\n\\n" + hint + "\\n\\n" + marker + suffix``, where the suffix after the marker (such as
    ``<think>\\n``) is kept; with no marker the hint is appended after a blank line.
    """
    at, marker = _last_assistant_marker(prompt_text)
    if at >= 0:
        prefix, suffix = prompt_text[:at], prompt_text[at + len(marker) :]
        return prefix.rstrip() + "\n\n" + hint + "\n\n" + marker + suffix
    return prompt_text + "\n\n" + hint


class _Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def hinted_prompt_ids(prompt_ids: list[int], ground_truth: str, tokenizer: _Tokenizer) -> list[int]:
    """Token ids of the hinted prompt: decode with special tokens kept, inject, re-encode without adding any.

    Special-token strings such as ``<|im_start|>`` map back to their ids on re-encoding, as in the reference.
    """
    text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    return list(tokenizer.encode(inject_hint(text, build_hint(ground_truth)), add_special_tokens=False))


# Phrases that show a response is talking about the hint rather than the problem. Kept narrow on purpose:
# "the answer is given by", "the key is to" and a boxed ground truth are ordinary mathematics, not leaks.
_LEAK_PATTERNS = [
    r"validation[\s_\-]*key",
    r"silent[\s_\-]*validation",
    r"\bthe\s+key\s+(?:says|said|states|stated|indicates|tells|confirms|gives|shows|provided)\b",
    r"\b(?:based\s+on|according\s+to|from|using|per|use|check(?:ing)?\s+(?:it\s+)?against)\s+the\s+hint\b",
    r"\b(?:based\s+on|according\s+to|using|check(?:ing)?\s+(?:it\s+)?against)\s+the\s+key\b(?!\s+[a-z])",
    r"\bthe\s+(?:given|provided)\s+(?:hint|key)\b",
    r"\bthe\s+hint\b",
    r"\bthe\s+answer\s+(?:is|was)\s+(?:already\s+)?(?:given|provided)(?!\s+by)\b",
    r"\bi\s+(?:can\s+)?see\s+(?:that\s+)?the\s+correct\s+answer\s+is\b",
    r"\bthe\s+(?:given|provided)\s+(?:correct\s+)?answer\s+(?:is|of)\b",
    r"strict\s+rules",
    r"do\s+not\s+mention\s+in\s+thinking",
    r"never\s+mention,\s+quote",
    r"final\s+sanity[\s\-]*check\s+after",
    r"derived\s+from\s+what\s+you\s+observe",
]
_LEAK_RE = re.compile("|".join(f"(?:{p})" for p in _LEAK_PATTERNS), re.IGNORECASE)


def leaks(response_text: str) -> bool:
    """True when the response refers to the hint: its wording, the key, or phrases its rules forbid.

    A correct answer whose ``\\boxed{}`` merely equals the ground truth is not a leak: we look for talk about
    a key or hint, never for the answer itself.
    """
    return bool(_LEAK_RE.search(response_text or ""))


#: Where a perturbation's instruction goes (``TrainConfig.perturb_position``, ``PromptRequest.perturb_position``).
USER, AFTER_TEMPLATE = "user", "after_template"
PERTURB_POSITIONS = (USER, AFTER_TEMPLATE)
# The tokens that close a user turn, tried in this order; the instruction goes before the last one that precedes
# the assistant marker. DeepSeek-R1's template has none ("<｜User｜>...<｜Assistant｜>"): there the instruction goes
# right before the assistant marker, which is where its user turn ends.
USER_TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


def insert_in_user_turn(prompt_text: str, instruction: str) -> str:
    """``instruction`` appended to the user turn's content of a templated prompt: after the content, before the
    template's end-of-user-turn token (or before the assistant marker when the template has none), one space
    apart, as the paper describes the perturbation (an instruction appended to the prompt's instruction).

    Only the last user turn is touched: the end marker must be followed by nothing but whitespace up to the last
    assistant marker. Without an assistant marker the instruction is appended to the text.
    """
    at, _ = _last_assistant_marker(prompt_text)
    if at < 0:
        return _join(prompt_text, instruction)
    head, tail = prompt_text[:at], prompt_text[at:]
    for end in USER_TURN_END_MARKERS:
        e = head.rfind(end)
        if e >= 0 and not head[e + len(end):].strip():
            return _join(head[:e], instruction) + head[e:] + tail
    return _join(head, instruction) + tail


def _last_assistant_marker(prompt_text: str) -> tuple[int, str]:
    """(where, which): the last occurrence of the first marker in ``ASSISTANT_MARKERS`` order that is present;
    (-1, "") without one."""
    for marker in ASSISTANT_MARKERS:
        at = prompt_text.rfind(marker)
        if at >= 0:
            return at, marker
    return -1, ""


def _join(content: str, instruction: str) -> str:
    """One space between them unless either side already brings whitespace."""
    spaced = not content or content[-1].isspace() or instruction[:1].isspace()
    return content + instruction if spaced else content + " " + instruction


def perturbed_prompt_ids(prompt_ids: list[int], perturbation: str, position: str, tokenizer: _Tokenizer) -> list[int]:
    """Token ids of a perturbed slot's prompt.

    ``after_template``: the perturbation's ids right after the templated prompt, after the assistant marker (and
    ``<think>\n``), no separator: the authors' code (brts-reference §11), where the instruction becomes the first
    words of the teacher's reasoning. ``user``: the prompt decoded with its special tokens, the instruction put in
    the user turn (``insert_in_user_turn``), re-encoded without adding any, as the Tier-2 hint is.
    """
    if position == AFTER_TEMPLATE:
        return list(prompt_ids) + list(tokenizer.encode(perturbation, add_special_tokens=False))
    if position != USER:
        raise ValueError(f"perturb_position: must be one of {', '.join(PERTURB_POSITIONS)}, got {position!r}")
    text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    return list(tokenizer.encode(insert_in_user_turn(text, perturbation), add_special_tokens=False))


def leak_phrase(response_text: str) -> str | None:
    """The first leaking phrase found (for logs and `brts cache inspect`), or None."""
    match = _LEAK_RE.search(response_text or "")
    return match.group(0) if match else None
