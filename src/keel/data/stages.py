"""Document processing stages run before tokenization: normalize, quality-filter, dedup, scrub PII; each counted."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from keel.data.minhash import MinHasher
from keel.data.pii import scrub
from keel.data.pii_ner import MODEL as NER_MODEL
from keel.data.pii_phone import REGIONS

_WORD = re.compile(r"\w+")
TOMBSTONE = "tombstone"  # the stage that drops documents `keel data remove` removed before


def content_hash(text: str) -> str:
    """A document's tombstone key: SHA-256 of its NFKC form, so every prepare.normalize setting gives the same key."""
    return hashlib.sha256(unicodedata.normalize("NFKC", text).encode()).hexdigest()


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
    # None, not a value, unless PII scrubbing is on: the manifests of datasets prepared without them stay as they were.
    pii_regions: tuple[str, ...] | None = None  # None: keel.data.pii_phone.REGIONS
    pii_ner: bool | None = None
    pii_ner_model: str | None = None  # the spaCy pipeline, when pii_ner is on

    @classmethod
    def from_config(cls, prepare: object) -> StageSettings:
        """The settings named by the same keys of a [prepare] config section."""
        given = {f.name: getattr(prepare, f.name) for f in fields(cls)}
        if not given["pii"]:
            return cls(**{**given, "pii_regions": None, "pii_ner": None, "pii_ner_model": None})
        ner = given["pii_ner"] or None
        model = given["pii_ner_model"] if ner else None
        if model and Path(model).exists():  # a pipeline directory: the manifest names it wherever prepare ran
            model = str(Path(model).resolve())
        return cls(**{**given, "pii_regions": tuple(given["pii_regions"]), "pii_ner": ner, "pii_ner_model": model})

    @property
    def scrubbing(self) -> dict:
        """keel.data.pii.scrub's keyword arguments for these settings."""
        return {"regions": self.pii_regions or REGIONS, "ner": self.ner_model}

    @property
    def ner_model(self) -> str | None:
        """The spaCy pipeline NER scrubbing uses, or None when it is off."""
        return (self.pii_ner_model or NER_MODEL) if self.pii_ner else None


# Which ASCII bytes count as space, alphanumeric, digit: taken from str's own methods, so the byte counts agree.
_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ALNUM = bytes(c for c in range(128) if chr(c).isalnum())
_DIGIT = bytes(c for c in range(128) if chr(c).isdigit())


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# Word characters to "a", the rest to " ": bytes.split() then counts the words of ASCII text in C.
_WORDS_TO_A = bytes(ord("a") if re.match(r"\w", chr(c)) else ord(" ") for c in range(128)) + b" " * 128


def _char_counts(text: str) -> tuple[int, int, int]:
    """(visible, symbol, digit) characters; no visible character counts as one symbol, as a lone " " would."""
    # ASCII bytes of UTF-8 are the ASCII characters: bytes.translate deletes them in C and the counts are what
    # goes; the few non-ASCII characters are counted one by one.
    data = text.encode()
    spaces, alnum, digits = (len(data) - len(data.translate(None, chars)) for chars in (_SPACE, _ALNUM, _DIGIT))
    if len(data) != len(text):
        rest = "".join(_NON_ASCII.findall(text))
        spaces += sum(map(str.isspace, rest))
        alnum += sum(map(str.isalnum, rest))
        digits += sum(map(str.isdigit, rest))
    visible = len(text) - spaces  # no character is both a space and alphanumeric (or a digit)
    return (visible, visible - alnum, digits) if visible else (1, 1, 0)


def _word_count(text: str) -> int:
    """len(_WORD.findall(text)), without building the words where the text is ASCII."""
    if text.isascii():
        return len(text.encode().translate(_WORDS_TO_A).split())
    return len(_WORD.findall(text))


def quality_failure(text: str, s: StageSettings) -> str | None:
    """The name of the first quality filter the document fails, or None; computes only what the filters on need."""
    need_words = s.min_mean_word_length or s.max_mean_word_length or s.max_top_ngram_fraction
    words = _WORD.findall(text) if need_words else []
    count = len(words) if need_words else _word_count(text) if s.min_words or s.max_words else 0
    if s.min_words and count < s.min_words:
        return "min_words"
    if s.max_words and count > s.max_words:
        return "max_words"
    if s.min_mean_word_length or s.max_mean_word_length:
        mean = sum(map(len, words)) / max(len(words), 1)
        if s.min_mean_word_length and mean < s.min_mean_word_length:
            return "min_mean_word_length"
        if s.max_mean_word_length and mean > s.max_mean_word_length:
            return "max_mean_word_length"
    if s.max_symbol_ratio or s.max_digit_ratio:
        visible, symbols, digits = _char_counts(text)
        if s.max_symbol_ratio and symbols / visible > s.max_symbol_ratio:
            return "max_symbol_ratio"
        if s.max_digit_ratio and digits / visible > s.max_digit_ratio:
            return "max_digit_ratio"
    if s.max_repeated_line_fraction:
        lines = [line for line in map(str.strip, text.splitlines()) if line]
        repeated = sum(n for n in Counter(lines).values() if n > 1)
        if lines and repeated / len(lines) > s.max_repeated_line_fraction:
            return "max_repeated_line_fraction"
    if s.max_top_ngram_fraction and len(words) >= 3:
        # Gopher-style: the share of word characters covered by the most frequent word trigram.
        top, n = Counter(zip(words, words[1:], words[2:], strict=False)).most_common(1)[0]
        if n > 1 and n * sum(map(len, top)) / max(sum(map(len, words)), 1) > s.max_top_ngram_fraction:
            return "max_top_ngram_fraction"
    return None


class Verdict(NamedTuple):
    """The scan's stateless findings on one document (computed in a pool worker); dedup is decided later, in order."""

    failure: str | None  # the quality filter that dropped it, or TOMBSTONE
    normalized_bytes: int  # bytes of the original text if normalization changed it, else 0
    size: int  # bytes of the normalized text (what the filter and dedup statistics count)
    digest: bytes | None  # exact-dedup key
    bands: bytes | None  # LSH band keys of the MinHash signature (uint64 each): the main process only looks them up
    sample: str | None  # the text as it will be tokenized (PII scrubbed), only for the tokenizer's training sample


def assess(
    text: str, s: StageSettings, hasher: MinHasher | None, want_text: bool = False, tombstones: frozenset = frozenset()
) -> Verdict:
    """The scan's work on a document: tombstones, normalize, the quality filters, the dedup keys; PII for the sample."""
    if tombstones and content_hash(text) in tombstones:
        return Verdict(TOMBSTONE, 0, len(text.encode()), None, None, None)
    normalized_bytes = 0
    if s.normalize != "none":
        new = unicodedata.normalize(s.normalize, text)
        if new != text:
            normalized_bytes = len(text.encode())
        text = new
    data = text.encode()
    reason = quality_failure(text, s)
    if reason is not None:
        return Verdict(reason, normalized_bytes, len(data), None, None, None)
    digest = hashlib.blake2b(data, digest_size=16).digest() if s.dedup_exact else None
    bands = hasher.band_hashes(hasher.signature(text)) if hasher is not None else None
    sample = (scrub(text, **s.scrubbing)[0] if s.pii else text) if want_text else None
    return Verdict(None, normalized_bytes, len(data), digest, bands, sample)


def clean(text: str, s: StageSettings) -> tuple[str, int, tuple[tuple[str, int], ...]]:
    """The write pass's work on a document: (text to tokenize, bytes before scrubbing, PII replaced per label)."""
    if s.normalize != "none":
        text = unicodedata.normalize(s.normalize, text)
    if not s.pii:
        return text, 0, ()
    size = len(text.encode())
    text, replaced = scrub(text, **s.scrubbing)
    return text, size, tuple(replaced.items())


# Within one document the stages count in this order; across documents, in document order.
_RANK = {"normalize": 0, "pii": 2}


@dataclass
class Pipeline:
    """Counts every stage's changes and drops, in document order (dedup's, once the scan decides them)."""

    settings: StageSettings
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    first: dict[str, list[int]] = field(default_factory=dict)  # (file, ordinal, rank) where each stage first counted
    tombstoned: list[tuple[int, int]] = field(default_factory=list)  # (file, ordinal) of each document tombstones drop

    def accept(self, docs: list[tuple[int, int, Verdict]]) -> list[bool]:
        """Count (file, ordinal, verdict)s' scan outcomes; True for each that passes the tombstones and filters."""
        passed = []
        for file, ordinal, v in docs:
            if v.normalized_bytes:
                self.count("normalize", "changed", v.normalized_bytes, file, ordinal)
            if v.failure == TOMBSTONE:
                self.count(TOMBSTONE, "dropped", v.size, file, ordinal)
                self.tombstoned.append((file, ordinal))
            elif v.failure is not None:
                self.count(f"filter.{v.failure}", "dropped", v.size, file, ordinal)
            passed.append(v.failure is None)
        return passed

    def count_pii(self, file: int, ordinal: int, size: int, replaced: tuple[tuple[str, int], ...]) -> None:
        """Count a kept document's PII replacements, in all and per label (the write pass scrubs)."""
        if replaced:
            self.count("pii", "changed", size, file, ordinal)
            entry = self.stats["pii"]
            entry["replacements"] = entry.get("replacements", 0) + sum(n for _, n in replaced)
            for label, n in replaced:
                entry[f"replacements.{label}"] = entry.get(f"replacements.{label}", 0) + n

    def count(self, stage: str, what: str, size: int, file: int, ordinal: int, documents: int = 1) -> None:
        """Add documents of `size` bytes in all, the first of them at (file, ordinal), to a stage's counts."""
        entry = self.stats.setdefault(stage, {})
        self.first[stage] = min(self.first.get(stage, [file, ordinal, 9]), [file, ordinal, _RANK.get(stage, 1)])
        entry[f"documents_{what}"] = entry.get(f"documents_{what}", 0) + documents
        entry[f"bytes_{what}"] = entry.get(f"bytes_{what}", 0) + size


def in_order(*pipelines: Pipeline) -> dict[str, dict[str, int]]:
    """The pipelines' statistics in one dict, stages in the order they first counted (as one pass would list them)."""
    stats = {k: v for p in pipelines for k, v in p.stats.items()}
    first = {k: v for p in pipelines for k, v in p.first.items()}
    return {k: stats[k] for k in sorted(stats, key=lambda k: first[k])}
