"""PII scrubbing: each detector's matches -> a typed placeholder (<EMAIL>, <PHONE_NUMBER>, <IBAN>, <SECRET>, ...).

Each detector is a regex, a judge that validates its matches (a checksum, a numbering plan, the words before
it), and two cheap ones: a hint that every accepted match contains, and the class of characters a match is
made of. A detector runs its regex only on the runs of its class that hold a hint (most text holds none), as
`finditer` over the whole text from the run's start (so look-behinds and judges see the real text before it)
to a little past its end (look-aheads may read CONTEXT characters). Matches never leave their run, so this
finds exactly what the regex finds on the whole text, at the speed of the hint's search.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from keel.data import pii_rules as rules
from keel.data.pii_phone import REGIONS, phone_detector_parts

CONTEXT = 16  # characters a pattern's look-ahead may read past its match
Span = tuple[int, int]


@dataclass(frozen=True)
class Detector:
    """One kind of PII: its regex and judge, its placeholder's label, a hint every match holds, its characters."""

    pattern: re.Pattern  # no ^, $, \A or \Z: they would see the run's bounds, not the text's
    judge: Callable[[re.Match], Sequence[Span]]  # the spans of a match to replace (none: not PII)
    label: str
    hint: re.Pattern  # starts with a literal or a character class, so re's search skips ahead in C
    chars: str  # a regex character class holding every character of every match (and of every hint match)
    run: re.Pattern = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", re.compile(f"{self.chars}*"))

    def find(self, text: str) -> list[Span]:
        """The spans this detector replaces in `text`, in order."""
        found: list[Span] = []
        done, n, reverse = 0, len(text), None
        for hint in self.hint.finditer(text):
            if hint.start() < done:
                continue  # inside the run already searched
            if reverse is None:
                reverse = text[::-1]  # re cannot match backwards: the run's start is a forward match in reverse
            start = n - self.run.match(reverse, n - hint.start()).end()  # type: ignore[union-attr]
            end = self.run.match(text, hint.end()).end()  # type: ignore[union-attr]
            for m in self.pattern.finditer(text, start, min(end + CONTEXT, n)):
                if m.start() >= end:
                    break  # past the run: another run's, searched when a hint leads there
                found += self.judge(m)
            done = end
        return found


@lru_cache(maxsize=16)
def detectors(regions: tuple[str, ...] = REGIONS) -> tuple[Detector, ...]:
    """Every structured detector, in order: each sees the text the ones before it left."""
    # Secrets first (a key block holds anything; a URL's password sits before an @), then what holds long digit
    # runs (IBAN, card, SSN) before the phone numbers those would also look like; IPv6 before IPv4 (::ffff:1.2.3.4).
    parts = [*rules.SECRETS, *rules.EMAILS, rules.IBAN_PARTS, rules.CARD_PARTS, rules.SSN_PARTS]
    parts += [rules.IPV6_PARTS, rules.IPV4_PARTS]
    parts.append(phone_detector_parts(regions))
    return tuple(Detector(*p) for p in parts)


DETECTORS = detectors()
Found = tuple[int, int, str]  # (start, end, label)


def replace(text: str, found: Sequence[Found]) -> str:
    """`text` with each (start, end, label), in order and not overlapping, replaced by <label>."""
    out, done = [], 0
    for start, end, label in found:
        out += [text[done:start], f"<{label}>"]
        done = end
    out.append(text[done:])
    return "".join(out)


def _passes(text: str, regions: tuple[str, ...], ner: str | None, seen: Callable[[str, list[Found]], None]) -> str:
    """Run NER (with the spaCy pipeline `ner`, if any), then each detector, on the text the ones before left; `seen`
    gets each replacement."""
    if ner:
        from keel.data.pii_ner import find_entities  # optional: spaCy and a model, only with prepare.pii_ner

        found = find_entities(text, ner)
        if found:
            seen(text, found)
            text = replace(text, found)
    for d in detectors(regions):
        spans = d.find(text)
        if spans:
            found = [(start, end, d.label) for start, end in spans]
            seen(text, found)
            text = replace(text, found)
    return text


def scrub(text: str, regions: tuple[str, ...] = REGIONS, ner: str | None = None) -> tuple[str, Counter[str]]:
    """Replace PII with typed placeholders; return the new text and the replacements per label."""
    counts: Counter[str] = Counter()
    text = _passes(text, regions, ner, lambda _, found: counts.update(label for _, _, label in found))
    return text, counts


def find(text: str, regions: tuple[str, ...] = REGIONS, ner: str | None = None) -> list[Found]:
    """What scrub replaces, as (start, end, label) spans of the original text."""
    # A later match over an earlier placeholder covers that placeholder's original text.
    # Placeholders in the current text: (current start, current end, original start, original end, label).
    marks: list[tuple[int, int, int, int, str]] = []

    def original(p: int, left: bool) -> int:
        delta = 0
        for c0, c1, o0, o1, _ in marks:
            if c1 <= p:
                delta = o1 - c1  # the text between placeholders is unchanged: offsets differ by a constant
            elif c0 < p:
                return o0 if left else o1  # inside a placeholder: the whole of its original text
            else:
                break
        return p + delta

    def remap(_: str, found: list[Found]) -> None:
        k, shift, out = 0, 0, []
        for start, end, label in found:
            while k < len(marks) and marks[k][1] <= start:
                c0, c1, o0, o1, lab = marks[k]
                out.append((c0 + shift, c1 + shift, o0, o1, lab))
                k += 1
            o0, o1 = original(start, True), original(end, False)
            while k < len(marks) and marks[k][0] < end:
                k += 1  # covered by the new match
            out.append((start + shift, start + shift + len(label) + 2, o0, o1, label))
            shift += len(label) + 2 - (end - start)
        out += [(c0 + shift, c1 + shift, o0, o1, lab) for c0, c1, o0, o1, lab in marks[k:]]
        marks[:] = out

    _passes(text, regions, ner, remap)
    return [(o0, o1, label) for _, _, o0, o1, label in marks]
