"""Turning model text into answers. Unparseable output returns ``None`` (scored wrong and counted)."""

from __future__ import annotations

import re

from crl_exp.tasks.schema import LETTERS

# Upper-case letters only, or a lower-case one inside parentheses: a bare "a" is the English article.
_LETTER = r"(?:\(([A-Ja-j])\)|([A-J])\)?)(?:[\s.:)\]]|$)"
_LETTER_PATTERNS = [
    re.compile(r"^\s*" + _LETTER),  # " B", "B)", "(b)", "C.", "D:"
    re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*" + _LETTER),  # "The answer is C", "answer: (d)"
]
_GSM_GOLD = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_letter(text: str, n_options: int) -> str | None:
    """Option letter at the start (``" B"``, ``"B)"``, ``"(b)"``) or after "answer is"; None if absent/invalid.

    A match that is not one of the options (e.g. the pronoun in "I think the answer is B") does not end the
    search: the next pattern is tried.
    """
    valid = set(LETTERS[:n_options])
    for pattern in _LETTER_PATTERNS:
        for m in pattern.finditer(text or ""):
            letter = (m.group(1) or m.group(2)).upper()
            if letter in valid:
                return letter
    return None


def normalise_number(raw: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"18."`` -> ``"18"``; None if not a number."""
    s = raw.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if value == int(value):
        return str(int(value))
    return repr(value)


def gsm8k_gold(answer_field: str) -> str:
    """The number after ``####`` in a GSM8K answer field (raises if malformed)."""
    m = _GSM_GOLD.search(answer_field)
    if not m or normalise_number(m.group(1)) is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-60:]!r}")
    return normalise_number(m.group(1))


def parse_gsm8k_completion(text: str) -> str | None:
    """The model's final number: after ``####`` if present, else the last number before any new question."""
    text = re.split(r"\n\s*Question:", text or "")[0]
    m = _GSM_GOLD.search(text)
    if m:
        found = _NUMBER.search(m.group(1))
        if found:
            return normalise_number(found.group(0))
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None
