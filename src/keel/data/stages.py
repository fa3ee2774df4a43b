"""Document processing stages run before tokenization: normalize, quality-filter, dedup, scrub PII; each counted."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from keel.data.dedup_store import DedupStore
from keel.data.minhash import MinHasher
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
    def from_config(cls, prepare: object) -> StageSettings:
        """The settings named by the same keys of a [prepare] config section."""
        return cls(**{f.name: getattr(prepare, f.name) for f in fields(cls)})


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


class Analysis(NamedTuple):
    """The stateless stages' verdict on one document (computed in a pool worker); dedup is decided later, in order."""

    text: str | None  # after every stateless stage; None if a quality filter dropped it
    failure: str | None  # the quality filter that dropped it
    normalized_bytes: int  # bytes of the original text if normalization changed it, else 0
    size: int  # bytes of the normalized text (what dedup and PII statistics count)
    digest: bytes | None  # exact-dedup key
    signature: bytes | None  # MinHash signature for near dedup
    pii_replaced: int


def analyze(text: str, s: StageSettings, hasher: MinHasher | None, keys: bool = True) -> Analysis:
    """Run normalize, the quality filters and PII scrubbing; with keys, also compute the dedup keys."""
    normalized_bytes = 0
    if s.normalize != "none":
        new = unicodedata.normalize(s.normalize, text)
        if new != text:
            normalized_bytes = len(text.encode())
        text = new
    size = len(text.encode())
    reason = quality_failure(text, s)
    if reason is not None:
        return Analysis(None, reason, normalized_bytes, size, None, None, 0)
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest() if keys and s.dedup_exact else None
    signature = hasher.signature(text) if keys and hasher is not None else None
    replaced = 0
    if s.pii:
        text, replaced = scrub(text)
    return Analysis(text, None, normalized_bytes, size, digest, signature, replaced)


@dataclass
class Pipeline:
    """Counts every stage's changes and drops, and applies dedup in document order (the one stateful stage)."""

    settings: StageSettings
    store: DedupStore | None = None
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def accept(self, file: int, ordinal: int, a: Analysis) -> bool:
        """Count the document's stage outcomes; True if it survives every stage, dedup included."""
        if a.normalized_bytes:
            self._count("normalize", "changed", a.normalized_bytes)
        if a.failure is not None:
            self._count(f"filter.{a.failure}", "dropped", a.size)
            return False
        if self.store is not None:
            dropped = self.store.check(file, ordinal, a.digest, a.signature)
            if dropped is not None:
                self._count(dropped, "dropped", a.size)
                return False
        if a.pii_replaced:
            self._count("pii", "changed", a.size)
            self.stats["pii"]["replacements"] = self.stats["pii"].get("replacements", 0) + a.pii_replaced
        return True

    def _count(self, stage: str, what: str, size: int) -> None:
        entry = self.stats.setdefault(stage, {})
        entry[f"documents_{what}"] = entry.get(f"documents_{what}", 0) + 1
        entry[f"bytes_{what}"] = entry.get(f"bytes_{what}", 0) + size
