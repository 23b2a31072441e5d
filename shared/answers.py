"""Final-answer extraction: pure string functions, no I/O.

The reference code (and the paper's grading) takes the content of the LAST ``\\boxed{...}`` in a response
(brts-reference §3.2, §13): a model that writes several boxes during its reasoning is judged on the last one.
Braces are matched, so ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``.

``is_correct`` (extraction plus bounded math-verify equivalence) lives in ``brts.shared.verify``, not here: it runs
in a worker process, and this module imports nothing with I/O (verify imports it, never the reverse).
"""

from __future__ import annotations

BOXED = "\\boxed"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``; None when there is none, or it is unbalanced or empty.

    Like the reference's ``last_boxed_only_string`` we start from the last occurrence of ``\\boxed`` (so in
    ``\\boxed{\\boxed{3}}`` the answer is ``3``), allow spaces before the opening brace, and match braces from
    there. An unclosed last box means the model was cut off mid-answer: None, not a guess.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(BOXED)
    if start < 0:
        return None
    i = start + len(BOXED)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : j].strip()
                return content or None
    return None


def normalize_integer(answer: str) -> int | None:
    """The integer an answer string spells, or None: ``025`` → 25, ``27.0`` → 27, ``-3`` → -3, ``1,000`` → 1000.

    Used as an exact fast path before math-verify: Python ints are unbounded, so ground truths beyond int64
    (DAPO has some) compare exactly, and most math answers are integers.
    """
    s = answer.strip()
    if s.startswith("$") and s.endswith("$") and len(s) >= 2:
        s = s[1:-1].strip()
    s = s.replace("\\!", "").replace("{,}", "").replace(" ", "")
    if "," in s:
        parts = s.lstrip("+-").split(",")
        if not (len(parts[0]) in (1, 2, 3) and all(len(p) == 3 and p.isdigit() for p in parts[1:])):
            return None
        s = s.replace(",", "")
    sign = 1
    if s[:1] in "+-" and s[:1]:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if "." in s:
        whole, frac = s.split(".", 1)
        if not frac or frac.strip("0"):
            return None
        s = whole
    if not s.isdigit() or not s.isascii():
        return None
    return sign * int(s)

