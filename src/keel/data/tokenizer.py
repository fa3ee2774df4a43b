"""Byte-level BPE tokenizers: train one on a corpus, load one from tokenizer.json, find its EOS token."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from keel.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"

# A cut just before a newline that is followed by a non-space character is always a pre-token boundary
# of the ByteLevel (GPT-2) regex, so encoding the pieces gives exactly the ids of encoding the whole text.
_SAFE_CUT = re.compile(r"(?=\n\S)")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (every string round-trips through encode/decode) with EOS as its special token."""
    if vocab_size < 257:
        raise ConfigError(f"prepare.vocab_size ({vocab_size}) must be at least 257: 256 byte tokens plus {EOS_TOKEN}")
    tok = Tokenizer(models.BPE())
    # No prefix space: a document's first word encodes as written, and decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; a missing or unreadable file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist (prepare.tokenizer); leave it empty to train one")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for every parse problem
        raise DataError(f"tokenizer {path} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    eos_id(tok)
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-document token; a tokenizer without it is a DataError."""
    found = tok.token_to_id(EOS_TOKEN)
    if found is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN} token; use one trained by `keel data prepare`")
    return found


def encoding_pieces(text: str, max_chars: int = 16_384) -> Iterator[str]:
    """Cut text into pieces of about max_chars at safe points; encoding them gives the ids of the whole text."""
    # Batches of ~16 KB pieces keep both encoder threads busy where a few huge documents would not.
    start = 0
    while len(text) - start > max_chars:
        cut = _SAFE_CUT.search(text, start + max_chars)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]
