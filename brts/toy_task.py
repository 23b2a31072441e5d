"""The toy arithmetic task itself: problems, the response styles a toy model may answer in, the short prompt.

Why a module of its own: the fit (``brts.toy``), the demo and the tests all need the task's text, and none of it
needs torch. The default is one style, ``work`` (``"a+b=c. \\boxed{c}"``), which the test suite's toy teacher is
fitted to. A teacher fitted to several styles writes correct answers that differ in form, so correct candidates
differ in how close they are to a student fitted to one style, and BRTS's "closest to the student" half of the
rule has something to decide (issue #25).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from brts.shared.data import Problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from brts.shared.prompts import PromptSpec

__all__ = ["STYLES", "TOY_CHAT_TEMPLATE", "TOY_SOURCE", "TOY_VOCAB_SIZE", "all_problems", "check_styles",
           "make_problems", "parse_problem", "task_size", "toy_prompt_spec", "toy_response"]

TOY_SOURCE = "toy-arith"
#: The real Qwen2.5 logits dimension (the tokenizer has 151,665 ids; the rest are padding rows).
TOY_VOCAB_SIZE = 151_936
#: Minimal ChatML: no default system prompt (Qwen's own template would add ~20 tokens of it), and still the
#: ``<|im_start|>assistant`` marker that ``brts.shared.hints.inject_hint`` looks for.
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The response forms, each ending in the boxed answer: the working, a sentence, the box alone.
STYLES: dict[str, str] = {
    "work": "{a}{op}{b}={c}. \\boxed{{{c}}}",
    "answer": "The answer is {c}. \\boxed{{{c}}}",
    "boxed": "\\boxed{{{c}}}",
}
_PROBLEM_RE = re.compile(r"^What is (\d+)([+-])(\d+)\?$")


def check_styles(styles: tuple[str, ...], field: str = "styles") -> None:
    """Refuse an empty, repeated or unknown style list, naming the field and the allowed styles."""
    if not styles or len(set(styles)) != len(styles) or any(s not in STYLES for s in styles):
        raise ValueError(f"{field}: must be distinct names from {', '.join(STYLES)}; got {list(styles)}")


def make_problems(n: int, seed: int = 0, max_operand: int = 20) -> list[Problem]:
    """``n`` problems "What is a+b?" / "What is a-b?" with 0 <= a, b <= max_operand; answers may be negative.

    Deterministic in (n, seed, max_operand): the first m problems of n > m are the same m problems.
    """
    if n < 0 or max_operand < 1:
        raise ValueError(f"make_problems: need n >= 0 and max_operand >= 1, got n={n}, max_operand={max_operand}")
    rng = random.Random(f"toy-arith:{seed}:{max_operand}")
    out = []
    for i in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-")
        out.append(Problem(id=f"toy-{seed}-{i}", problem=f"What is {a}{op}{b}?",
                           answer=str(a + b if op == "+" else a - b), source=TOY_SOURCE))
    return out


def parse_problem(problem: Problem | str) -> tuple[int, str, int]:
    """(a, op, b) of a toy problem text; ValueError for anything else."""
    text = problem.problem if isinstance(problem, Problem) else problem
    m = _PROBLEM_RE.match(text)
    if m is None:
        raise ValueError(f"problem: {text!r} is not a toy problem ('What is a+b?' or 'What is a-b?')")
    return int(m.group(1)), m.group(2), int(m.group(3))


def toy_response(problem: Problem | str, style: str = "work") -> str:
    """The reference response in ``style`` (without EOS), ending in the boxed answer."""
    check_styles((style,), "style")
    a, op, b = parse_problem(problem)
    c = a + b if op == "+" else a - b
    return STYLES[style].format(a=a, op=op, b=b, c=c)


def toy_prompt_spec(tokenizer: PreTrainedTokenizerBase | None = None) -> PromptSpec:
    """The toy's PromptSpec: bundled Qwen2.5 tokenizer, TOY_CHAT_TEMPLATE, no system prompt, no suffix."""
    from brts.shared.prompts import PromptSpec
    from brts.shared.tokenizer import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer("qwen2.5-instruct")
    return PromptSpec(tokenizer=tok, chat_template=TOY_CHAT_TEMPLATE, instruction_suffix="", max_prompt_len=256)


def task_size(max_operand: int) -> int:
    """How many distinct problems the task has: a+b and a-b for 0 <= a, b <= max_operand (``all_problems``)."""
    return 2 * (max_operand + 1) ** 2


def all_problems(max_operand: int) -> list[Problem]:
    """Every problem of the task space, in a fixed order (the fit samples from these)."""
    return [
        Problem(id=f"all-{op}-{a}-{b}", problem=f"What is {a}{op}{b}?", answer=str(a + b if op == "+" else a - b),
                source=TOY_SOURCE)
        for op in "+-" for a in range(max_operand + 1) for b in range(max_operand + 1)
    ]
