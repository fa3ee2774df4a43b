"""PII scrubbing: e-mail addresses, phone numbers, IPv4/IPv6 addresses and Luhn-valid card numbers -> placeholders."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

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


def scrub(text: str) -> tuple[str, int]:
    """Replace PII with typed placeholders; return the new text and how many replacements were made."""
    count = 0

    def counted(m: re.Match, repl: Callable[[re.Match], str]) -> str:
        nonlocal count
        new = repl(m)
        count += new != m.group()
        return new

    # Cards before phones: a card number also looks like a long phone number.
    for pattern, repl in _RULES:
        text = pattern.sub(lambda m, r=repl: counted(m, r), text)
    return text, count


_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (EMAIL, lambda m: "<EMAIL>"),
    (CARD, _card),
    (IPV4, lambda m: "<IP_ADDRESS>"),
    (IPV6, _ipv6),
    (PHONE, lambda m: "<PHONE>"),
]
