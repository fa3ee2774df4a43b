"""Vocabulary a removal leaves behind: tokenizer entries that occur in the removed text and nowhere in the kept text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.data.manifest import Manifest, resolve_inside

CHUNK = 1 << 26  # tokens counted at a time: bounded memory for shards of any size


def token_counts(root: Path, manifest: Manifest) -> np.ndarray:
    """How often each token id occurs in the dataset's shards (every split), one memory-mapped chunk at a time."""
    counts = np.zeros(manifest.tokenizer.vocab_size, dtype=np.int64)
    for entry in manifest.splits.values():
        for shard in entry.shards:
            if shard.tokens == 0:
                continue  # an empty file cannot be memory-mapped
            tokens = np.memmap(resolve_inside(root, shard.file), dtype=manifest.token_dtype, mode="r")
            for at in range(0, len(tokens), CHUNK):
                counts += np.bincount(tokens[at : at + CHUNK], minlength=len(counts))[: len(counts)]
    return counts


def only_in_removed(root: Path, manifest: Manifest, removed: list[np.ndarray], tok: Tokenizer) -> list[int]:
    """Learned entries only the removed documents (ids still in the shards) use, directly or as unused merge steps."""
    kept = token_counts(root, manifest)
    gone = np.zeros_like(kept)
    for ids in removed:
        gone += np.bincount(ids, minlength=len(kept))[: len(kept)]
    kept -= gone
    found = {int(i) for i in np.flatnonzero((gone > 0) & (kept == 0))}
    # A name learned as "Zor" + "blax" leaves "Zor" and "blax" too, if no kept text uses them.
    parts = _merge_parts(tok)
    todo = [tok.id_to_token(i) for i in found]
    while todo:
        for part in parts.get(todo.pop(), ()):
            i = tok.token_to_id(part)
            if i is not None and i < len(kept) and kept[i] == 0 and i not in found:
                found.add(i)
                todo.append(part)
    special = set(tok.get_added_tokens_decoder())
    return sorted(i for i in found if i not in special and len(tok.id_to_token(i) or "") > 1)


def _merge_parts(tok: Tokenizer) -> dict[str, tuple[str, str]]:
    """A BPE's merges as result -> (left, right); empty for other models."""
    model = json.loads(tok.to_str()).get("model") or {}
    if model.get("type") != "BPE":
        return {}
    pairs = [m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges", [])]
    return {a + b: (a, b) for a, b in pairs}
