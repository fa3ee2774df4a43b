"""PII scrubbing: e-mail addresses, phone numbers, IPv4/IPv6 addresses and Luhn-valid card numbers -> placeholders.

Each detector is a regex plus two cheap ones: a hint that every match contains, and the class of characters a
match is made of. A detector runs its regex only on the runs of its class that hold a hint (most text holds
none), with one character of context on each side for the look-arounds. Matches never leave their run, so
this finds exactly what the regex finds on the whole text, at the speed of the hint's search.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])")


def luhn_ok(digits: str) -> bool:
    """True if the digit string passes the Luhn checksum that every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"[ -]", "", m.group())
    return "<CREDIT_CARD>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()


def _ipv6(m: re.Match) -> str:
    # The regex is loose (it would match "a:b:c"); the standard library decides what is an address.
    # "a::b" is C++ or Rust, not an address: require a digit somewhere.
    if not any(c.isdigit() for c in m.group()):
        return m.group()
    try:
        ipaddress.IPv6Address(m.group())
    except ValueError:
        return m.group()
    return "<IP_ADDRESS>"


@dataclass(frozen=True)
class Detector:
    """One kind of PII: its regex, its replacement, a hint every match contains, and the characters matches use."""

    pattern: re.Pattern
    replace: Callable[[re.Match], str]
    hint: re.Pattern  # starts with a literal or a character class, so re's search skips ahead in C
    chars: str  # a regex character class holding every character of every match (and of every hint match)
    run: re.Pattern = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", re.compile(f"{self.chars}*"))

    def scrub(self, text: str) -> tuple[str, int]:
        """Replace this detector's matches; return the new text and the number replaced."""
        out, count, done = [], 0, 0
        reverse = None

        def counted(m: re.Match) -> str:
            nonlocal count
            new = self.replace(m)
            count += new != m.group()
            return new

        for hint in self.hint.finditer(text):
            if hint.start() < done:
                continue  # inside the run already scrubbed
            if reverse is None:
                reverse = text[::-1]  # re cannot match backwards: the run's start is a forward match in reverse
            start = len(text) - self.run.match(reverse, len(text) - hint.start()).end()  # type: ignore[union-attr]
            end = self.run.match(text, hint.end()).end()  # type: ignore[union-attr]
            lo, hi = max(start - 1, 0), min(end + 1, len(text))  # one character of context for the look-arounds
            # The context characters are never part of a match, so they come back unchanged: cut them off again.
            new = self.pattern.sub(counted, text[lo:hi])
            out += [text[done:start], new[start - lo : len(new) - (hi - end)]]
            done = end
        if not out:
            return text, 0
        out.append(text[done:])
        return "".join(out), count


# In order: each sees the text the ones before it left. Cards before phones: a card number also looks like a
# long phone number. A new detector goes where its matches should win over the later ones'.
DETECTORS: list[Detector] = [
    Detector(EMAIL, lambda m: "<EMAIL>", re.compile("@"), "[A-Za-z0-9._%+@-]"),
    Detector(CARD, _card, re.compile(r"\d(?:[ -]?\d){12}"), r"[\d -]"),
    Detector(IPV4, lambda m: "<IP_ADDRESS>", re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d"), r"[\d.]"),
    Detector(IPV6, _ipv6, re.compile(":[0-9A-Fa-f]{0,4}:"), "[0-9A-Fa-f:]"),
    Detector(PHONE, lambda m: "<PHONE>", re.compile(r"\d{3,4}[ .-]\d{3,4}"), r"[\d +.()-]"),
]


def scrub(text: str) -> tuple[str, int]:
    """Replace PII with typed placeholders; return the new text and how many replacements were made."""
    count = 0
    for detector in DETECTORS:
        text, n = detector.scrub(text)
        count += n
    return text, count
