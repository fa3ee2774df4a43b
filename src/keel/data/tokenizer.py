"""Byte-level BPE tokenizers: train, load, find EOS, and encode fast (tiktoken where its ids are the same)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
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


# The GPT-2 pre-tokenizer regex that Hugging Face's ByteLevel(use_regex=True) splits with.
_BYTE_LEVEL_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Hard cases for an encoder that must give the tokenizer's ids: contractions, space runs, scripts, digits, EOS text.
PROBES = [
    "it's they're we've I'm you'll he'd 'S 'LL",
    "a  b   c\n\n\n  d\t\te \r\n x  ",
    "naïve café 日本語のテキスト Ελληνικά עברית 😀👍🏽 \u200b\u00a0nbsp",
    "12345 3.14159 0x1F ½ ² ٣١",
    "def f(x):\n    return {'a': [1, 2]}  # <|endoftext|> is text here\n",
    " leading and trailing space ",
]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: how ByteLevel vocabularies spell bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return {chr(c): b for b, c in zip(printable + others, chars, strict=True)}


def byte_level_ranks(spec: dict) -> tuple[dict[bytes, int] | None, str]:
    """tiktoken's ranks for a tokenizer.json that is a plain byte-level BPE (else None), and why not."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return None, "not a plain BPE model"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or spec.get("normalizer"):
        return None, "a subword prefix, suffix or normalizer"
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex", True)) != ("ByteLevel", False, True):
        return None, "not the ByteLevel pre-tokenizer without a prefix space"
    specials = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    if len(specials) != len(spec.get("added_tokens", [])):
        return None, "added tokens that are not special"
    decoder = _byte_decoder()
    vocab = {token: i for token, i in model["vocab"].items() if token not in specials}
    if any(ch not in decoder for token in vocab for ch in token):
        return None, "vocabulary entries that are not byte-level"
    merged = [vocab.get(m[0] + m[1] if isinstance(m, list) else m.replace(" ", "", 1)) for m in model["merges"]]
    # tiktoken merges the pair whose result has the lowest id: the same as the merge list's order only if
    # the results' ids rise with it, every multi-byte token is a merge result, and every byte has a token.
    if None in merged or merged != sorted(set(merged)):
        return None, "merge results out of id order"
    if len(vocab) != 256 + len(merged) or len({token for token in vocab if len(token) == 1}) != 256:
        return None, "tokens that are neither bytes nor merge results"
    return {bytes(decoder[ch] for ch in token): i for token, i in vocab.items()}, ""


class Encoder:
    """Documents to ids (no EOS) with the tokenizer's exact ids: tiktoken when it reproduces them, else tokenizers."""

    def __init__(self, path: str | Path, fast: bool):
        self.hf = load_tokenizer(path)
        self.hf.encode_special_tokens = True  # a literal "<|endoftext|>" inside a document is text, not a boundary
        self.eos = eos_id(self.hf)
        self.tiktoken = None
        if fast:
            import tiktoken

            spec = json.loads(Path(path).read_text(encoding="utf-8"))
            ranks, _ = byte_level_ranks(spec)
            assert ranks is not None
            self.tiktoken = tiktoken.Encoding(
                "keel", pat_str=_BYTE_LEVEL_SPLIT, mergeable_ranks=ranks, special_tokens={}
            )

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text, as uint32 arrays."""
        if self.tiktoken is not None:
            return [self.tiktoken.encode_to_numpy(t, disallowed_special=()) for t in texts]
        pieces = [list(encoding_pieces(t)) for t in texts]
        encodings = iter(self.hf.encode_batch_fast([p for doc in pieces for p in doc], add_special_tokens=False))
        return [np.array([i for _ in doc for i in next(encodings).ids], dtype=np.uint32) for doc in pieces]


def choose_encoder(path: str | Path, sample: list[str]) -> tuple[bool, str]:
    """Whether tiktoken gives the tokenizer's ids (on the probes and a sample of the corpus), and a log line."""
    ranks, why = byte_level_ranks(json.loads(Path(path).read_text(encoding="utf-8")))
    if ranks is None:
        return False, f"encoder: Hugging Face tokenizers (tiktoken cannot represent this tokenizer: {why})"
    texts = PROBES + sample
    fast, exact = Encoder(path, True), Encoder(path, False)
    for i, (a, b) in enumerate(zip(fast.encode(texts), exact.encode(texts), strict=True)):
        if not np.array_equal(a, b):
            return False, (
                f"encoder: Hugging Face tokenizers (tiktoken gave other ids on sample document {i - len(PROBES)}; "
                "falling back to the exact encoder)"
            )
    return True, f"encoder: tiktoken (ids identical to Hugging Face tokenizers on {len(texts)} sample documents)"
