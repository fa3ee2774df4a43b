"""Re-encoding a dataset with a BPE trained again on its kept text: a new version written beside the old one."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.data.dataset import TokenDataset
from keel.data.lineage import split_index
from keel.data.manifest import Manifest, Split, TokenizerEntry
from keel.data.shards import ShardWriter
from keel.data.tokenizer import Encoder, choose_encoder, eos_id, train_tokenizer
from keel.data.vocab import bpe_sample
from keel.io import fsync_path, sha256_file

BATCH = 1024  # documents decoded and encoded at a time
_VERSION = re.compile(r"t(\d+)")


def retokenize(
    root: Path, manifest: Manifest, gone: set[tuple[str, int]], old: Tokenizer, log: Callable[[str], None]
) -> Tokenizer:
    """Train prepare's BPE on the kept documents, write them re-encoded under a new tN/, point `manifest` there."""
    version = _version_dir(root, manifest)
    sample = [text for _, _, text in bpe_sample(root, manifest, old, frozenset(gone))]
    tok = train_tokenizer(sample, manifest.tokenizer.vocab_size)
    log(f"trained a {tok.get_vocab_size()}-token BPE on the kept text ({sum(map(len, sample)) / 1e6:.1f} MB)")
    path = version / "tokenizer.json"
    tok.save(str(path))
    fsync_path(path)
    fast, why = choose_encoder(path, sample[:256])
    log(why)
    encoder = Encoder(path, fast)
    dtype = "uint16" if tok.get_vocab_size() <= 2**16 else "uint32"
    splits = {}
    for split in manifest.splits:
        writer = ShardWriter(version, split, np.dtype(dtype), manifest.settings.shard_tokens)
        for origins, texts in _kept(root, manifest, split, gone, old):
            writer.add([np.append(ids, encoder.eos) for ids in encoder.encode(texts)], origins)
        entry = writer.finish()
        moved = [{k: f"{version.name}/{getattr(s, k)}" for k in ("file", "index", "origins")} for s in entry.shards]
        splits[split] = Split(
            tokens=entry.tokens,
            documents=entry.documents,
            shards=[s.model_copy(update=m) for s, m in zip(entry.shards, moved, strict=True)],
        )
    manifest.splits, manifest.dtype = splits, dtype
    name, vocab = f"{version.name}/tokenizer.json", tok.get_vocab_size()
    manifest.tokenizer = TokenizerEntry(file=name, sha256=sha256_file(path), vocab_size=vocab, eos_id=eos_id(tok))
    return tok


def _version_dir(root: Path, manifest: Manifest) -> Path:
    """A fresh tNNN/ directory after the manifest's; one a crashed earlier attempt left (never committed) is cleared."""
    current = _VERSION.fullmatch(Path(manifest.tokenizer.file).parent.name)
    version = root / f"t{int(current.group(1)) + 1 if current else 1}"
    shutil.rmtree(version, ignore_errors=True)
    version.mkdir()
    return version


def _kept(
    root: Path, manifest: Manifest, split: str, gone: set[tuple[str, int]], tok: Tokenizer
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """A split's kept documents in order, a batch at a time: their origins and their text (decoded, without EOS)."""
    starts, ends, origins = split_index(root, manifest, split)
    keep = np.array([(split, int(s)) not in gone for s in starts], dtype=bool)
    data = TokenDataset(root, split)
    for at in range(0, len(starts), BATCH):
        picked = np.arange(at, min(at + BATCH, len(starts)))[keep[at : at + BATCH]]
        ids = [data.read(int(s), int(e - s) - 1).tolist() for s, e in zip(starts[picked], ends[picked], strict=True)]
        yield origins[picked], tok.decode_batch(ids, skip_special_tokens=False)
