"""Vocabulary a removal leaves behind: BPE entries learned only from the removed text of the tokenizer's sample."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.data.dataset import TokenDataset
from keel.data.lineage import DocSpan, split_index
from keel.data.manifest import Manifest
from keel.data.pool import doc_hashes
from keel.data.scan import TRAIN_SAMPLE_CHARS


@dataclass(frozen=True)
class Learned:
    """The entries only the removed text taught the tokenizer, or why none can have been learned from it."""

    ids: list[int]
    why_none: str | None = None  # set where the tokenizer cannot have learned anything from the removed text


def bpe_sample(
    root: Path, manifest: Manifest, tok: Tokenizer, leave_out: frozenset[tuple[str, int]] = frozenset()
) -> list[tuple[tuple[str, int], np.ndarray, str]]:
    """The documents prepare's scan sampled to train the BPE, in its order, as ((split, start), ids, text).

    The same documents by their hashes and the same size cap; documents in `leave_out` (split, start) are skipped
    before the cap, as a prepare without them would skip them.
    """
    picked, drawn = [], _drawn(manifest)
    for split in manifest.splits:
        starts, ends, origins = split_index(root, manifest, split)
        for s, e, (file, ordinal) in zip(starts.tolist(), ends.tolist(), origins.tolist(), strict=True):
            if (split, s) not in leave_out and drawn(manifest.files[file].key, ordinal):
                picked.append((file, ordinal, split, s, e))
    data = {split: TokenDataset(root, split) for split in manifest.splits}
    out, size = [], 0
    for _, _, split, s, e in sorted(picked):  # the scan samples in document order, up to twice the target
        if size >= 2 * TRAIN_SAMPLE_CHARS:
            break
        ids = data[split].read(s, e - s - 1)  # without the EOS
        out.append(((split, s), ids, tok.decode(ids.tolist(), skip_special_tokens=False)))
        size += len(out[-1][2])
    return out


def learned_only_from(root: Path, manifest: Manifest, removed: list[DocSpan], tok: Tokenizer) -> Learned:
    """Entries whose text occurs in the removed documents of the BPE's sample and nowhere in the rest of it.

    A BPE merge is learned from the words of its training sample that contain it; an entry no kept sampled word
    contains was learned from the removed text alone, and a tokenizer trained on the kept sample cannot learn it.
    """
    if manifest.tokenizer.given:
        return Learned([], "the tokenizer was given by prepare.tokenizer, not trained on this dataset")
    if not _byte_level_bpe(tok):
        return Learned([], "the tokenizer is not a byte-level BPE that Keel trained")
    drawn = _drawn(manifest)
    gone = {(d.split, d.start) for d in removed if drawn(manifest.files[d.file].key, d.ordinal)}
    sample = bpe_sample(root, manifest, tok) if gone else []  # most removals in a large dataset skip this read
    texts = [text for key, _, text in sample if key in gone]
    if not texts:
        return Learned([], "the removed text was not in the sample the tokenizer was trained on")
    vocab = tok.get_vocab()
    special = set(tok.get_added_tokens_decoder())
    longest = max(map(len, vocab))
    words = {w for text in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)}
    # Every learned entry (two or more byte symbols) that is a piece of a removed word.
    candidates = {
        vocab[w[i:j]]
        for w in words
        for i in range(len(w))
        for j in range(i + 2, min(len(w), i + longest) + 1)
        if w[i:j] in vocab
    } - special
    kept = [(ids, text) for key, ids, text in sample if key not in gone]
    emitted = np.zeros(len(vocab), dtype=bool)  # an entry a kept document encodes to occurs in the kept text
    for ids, _ in kept:
        emitted[ids[ids < len(emitted)]] = True
    kept_bytes = b"\0".join(text.encode() for _, text in kept)
    to_byte = _byte_decoder()
    byte_text = {i: bytes(to_byte[c] for c in t) for t, i in vocab.items() if i in candidates}
    return Learned(sorted(i for i in candidates if not emitted[i] and byte_text[i] not in kept_bytes))


def _drawn(manifest: Manifest) -> Callable[[str, int], bool]:
    """Whether the scan's hashes put a document (file key, ordinal) in the BPE's sample, the size cap aside."""
    fraction = min(1.0, TRAIN_SAMPLE_CHARS / max(sum(s.bytes for s in manifest.sources), 1))
    val = manifest.settings.val_fraction

    def drawn(key: str, ordinal: int) -> bool:
        split_hash, sample_hash = doc_hashes(key, ordinal)
        return split_hash >= val and sample_hash < fraction  # not held out for validation, and sampled

    return drawn


def _byte_level_bpe(tok: Tokenizer) -> bool:
    """A BPE over byte-level symbols, as `keel data prepare` trains: its entries are spelled in bytes."""
    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    return model.get("type") == "BPE" and pre.get("type") == "ByteLevel"


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's printable stand-ins for the 256 byte values) back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
