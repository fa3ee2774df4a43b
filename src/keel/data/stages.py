"""Document processing stages run before tokenization: normalize, quality-filter, dedup, scrub PII; each counted."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields

from keel.data.minhash import NearDedup
from keel.data.pii import scrub

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class StageSettings:
    """Which stages run and their thresholds (a 0 threshold turns that filter off)."""

    normalize: str = "none"
    min_words: int = 0
    max_words: int = 0
    min_mean_word_length: float = 0.0
    max_mean_word_length: float = 0.0
    max_symbol_ratio: float = 0.0
    max_digit_ratio: float = 0.0
    max_repeated_line_fraction: float = 0.0
    max_top_ngram_fraction: float = 0.0
    dedup_exact: bool = False
    dedup_near_threshold: float = 0.0
    pii: bool = False

    @classmethod
    def from_config(cls, data: object) -> StageSettings:
        """The settings named by the same keys of a [data] config section."""
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})


def quality_failure(text: str, s: StageSettings) -> str | None:
    """The name of the first quality filter the document fails, or None if it passes them all."""
    words = _WORD.findall(text)
    if s.min_words and len(words) < s.min_words:
        return "min_words"
    if s.max_words and len(words) > s.max_words:
        return "max_words"
    mean = sum(map(len, words)) / max(len(words), 1)
    if s.min_mean_word_length and mean < s.min_mean_word_length:
        return "min_mean_word_length"
    if s.max_mean_word_length and mean > s.max_mean_word_length:
        return "max_mean_word_length"
    visible = [c for c in text if not c.isspace()] or [" "]
    if s.max_symbol_ratio and sum(not c.isalnum() for c in visible) / len(visible) > s.max_symbol_ratio:
        return "max_symbol_ratio"
    if s.max_digit_ratio and sum(c.isdigit() for c in visible) / len(visible) > s.max_digit_ratio:
        return "max_digit_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if s.max_repeated_line_fraction and lines:
        repeated = sum(n for n in Counter(lines).values() if n > 1)
        if repeated / len(lines) > s.max_repeated_line_fraction:
            return "max_repeated_line_fraction"
    if s.max_top_ngram_fraction and len(words) >= 3:
        # Gopher-style: the share of word characters covered by the most frequent word trigram.
        top, n = Counter(zip(words, words[1:], words[2:], strict=False)).most_common(1)[0]
        if n > 1 and n * sum(map(len, top)) / max(sum(map(len, words)), 1) > s.max_top_ngram_fraction:
            return "max_top_ngram_fraction"
    return None


@dataclass
class Pipeline:
    """One pass of the stages over a document stream; the same input order always gives the same decisions."""

    settings: StageSettings
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    _seen: set[bytes] = field(default_factory=set)
    _near: NearDedup | None = None

    def __post_init__(self) -> None:
        if self.settings.dedup_near_threshold:
            self._near = NearDedup(self.settings.dedup_near_threshold)

    def process(self, text: str) -> str | None:
        """The document after every stage, or None if a stage drops it."""
        s = self.settings
        if s.normalize != "none":
            new = unicodedata.normalize(s.normalize, text)
            if new != text:
                self._count("normalize", "changed", text)
            text = new
        reason = quality_failure(text, s)
        if reason is not None:
            return self._drop(f"filter.{reason}", text)
        if s.dedup_exact:
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in self._seen:
                return self._drop("dedup_exact", text)
            self._seen.add(digest)
        if self._near is not None and self._near.is_duplicate(text):
            return self._drop("dedup_near", text)
        if s.pii:
            new, replaced = scrub(text)
            if replaced:
                self._count("pii", "changed", text)
                self.stats["pii"]["replacements"] = self.stats["pii"].get("replacements", 0) + replaced
            text = new
        return text

    def _drop(self, stage: str, text: str) -> None:
        self._count(stage, "dropped", text)
        return None

    def _count(self, stage: str, what: str, text: str) -> None:
        entry = self.stats.setdefault(stage, {})
        entry[f"documents_{what}"] = entry.get(f"documents_{what}", 0) + 1
        entry[f"bytes_{what}"] = entry.get(f"bytes_{what}", 0) + len(text.encode())
