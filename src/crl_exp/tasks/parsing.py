"""Turning model text into answers. Unparseable output returns ``None`` (scored wrong and counted)."""

from __future__ import annotations

import re

_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-J])\)?(?:[\s.:)\]]|$)", re.IGNORECASE),  # " B", "B)", "(b)", "C.", "D:"
    re.compile(r"answer\s*(?:is|:)?\s*\(?([A-J])\)?(?:[\s.:)\]]|$)", re.IGNORECASE),  # "The answer is C"
]
_GSM_GOLD = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_letter(text: str, n_options: int) -> str | None:
    """Option letter at the start (``" B"``, ``"B)"``, ``"(b)"``) or after "answer is"; None if absent/invalid."""
    valid = set("ABCDEFGHIJ"[:n_options])
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text or "")
        if m:
            letter = m.group(1).upper()
            return letter if letter in valid else None
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
