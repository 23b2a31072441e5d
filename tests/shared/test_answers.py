"""extract_boxed and the integer normaliser: pure string functions."""

import pytest

from brts.shared.answers import extract_boxed, normalize_integer


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{34}.", "34"),
        (r"\boxed{1} then \boxed{2}", "2"),  # the LAST box wins
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces are balanced
        (r"\boxed{\boxed{3}}", "3"),  # reference semantics: start from the last \boxed
        (r"\boxed {  7 }", "7"),  # spaces before the brace and around the content
        (r"\boxed{x^{2}+\sqrt{y}} and more text", r"x^{2}+\sqrt{y}"),
    ],
)
def test_extract_boxed_finds_last_balanced_box(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box at all, the answer is 34",
        r"\boxed{}",  # empty
        r"\boxed{   }",  # blank
        r"\boxed{\frac{1}{2}",  # unbalanced: cut off mid-answer
        r"\boxed{1} and finally \boxed{2",  # the last box is unbalanced: None, not the earlier one
        r"\boxed 5",  # no brace
        "",
    ],
)
def test_extract_boxed_returns_none(text):
    assert extract_boxed(text) is None


def test_extract_boxed_rejects_non_strings():
    assert extract_boxed(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, value",
    [("025", 25), ("27.0", 27), ("-3", -3), ("+4", 4), ("1,000", 1000), ("$12$", 12), ("0.000", 0),
     ("22000000000000000000001", 22000000000000000000001), ("1{,}234", 1234)],
)
def test_normalize_integer(text, value):
    assert normalize_integer(text) == value


@pytest.mark.parametrize("text", ["2.5", "1,00", "x", "", "\\frac{1}{2}", "1e3", "١٢"])
def test_normalize_integer_rejects_non_integers(text):
    assert normalize_integer(text) is None
