"""Prepare at the speed of the encoder: each stage once, the same bytes as before, tiktoken, worker-side reading."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import keel.data.minhash
import keel.data.prepare
import keel.data.sources
import keel.data.stages
from conftest import dataset_text, dedup_verdicts, near_copy, quiet
from keel.data.dedup_store import DedupStore, Keys
from keel.data.merge import merge_datasets
from keel.data.minhash import MinHasher
from keel.data.prepare import prepare_dataset
from keel.data.sources import BadRecord, expand_sources, read_records
from keel.data.spans import plan, read_span
from keel.data.stages import StageSettings, _char_counts, _word_count, assess
from keel.data.tokenizer import PROBES, Encoder, byte_level_ranks, choose_encoder

ALL_ON = StageSettings(
    normalize="NFC",
    min_words=6,
    max_words=400,
    min_mean_word_length=2.0,
    max_mean_word_length=12.0,
    max_symbol_ratio=0.45,
    max_digit_ratio=0.4,
    max_repeated_line_fraction=0.5,
    max_top_ngram_fraction=0.3,
    dedup_exact=True,
    dedup_near_threshold=0.8,
    pii=True,
)
WORDS = "the a model reads tokens and predicts next one while optimizer follows gradient down checkpoint".split()
WORDS += ["café", "naïve", "日本語", "straße", "cafe\u0301", "ｆｕｌｌ", "über", "x²", "Ω"]
CODE = [
    "def f(x):\n    return x + 1\n",
    "std::vector<int> v; a::b::c(d);\n",
    "for i in range(10):\n    print(i, i * 2)\n",
    "if (a && b) { return c[0x1f]; }\n",
    "value = {'k': [1, 2, 3], 'deadbeef': 0xdeadbeef}\n",
]
PII = [
    "mail jane.doe@example.org now",
    "call +1 415-555-0132 today",
    "card 4111 1111 1111 1111 ok",
    "card 4111-1111-1111-1112 bad",
    "host 10.0.0.7 and 2001:db8::7334",
    "time 12:30:45 version 1.2.3.4.5 date 2024-05-06",
    "ff::1 and fe80::1ff:fe23:4567:890a",
]


def _document(rng: random.Random) -> str:
    """A prose, code, PII or filter-bait document; some non-ASCII, some decomposed (NFC changes them)."""
    kind = rng.randrange(10)
    if kind < 4:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
    if kind < 6:
        return "".join(rng.choice(CODE) for _ in range(rng.randint(1, 12)))
    if kind < 8:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + " " + rng.choice(PII)
    return rng.choice(
        [
            "spam line\n" * rng.randint(2, 9) + "end of it here and more words",
            "buy it now " * rng.randint(3, 30),
            "12 34 56 78 90 " * rng.randint(1, 9) + "words",
            "{}[]<>;;;; ()" * rng.randint(1, 5) + " a b c d e f",
            "supercalifragilisticexpialidocious " * rng.randint(6, 9),
            "   \n\t ",
        ]
    )


def speed_corpus(root: Path, seed: int = 0) -> list[str]:
    """Every input format, with exact and near duplicates across files, PII, bad-filter documents and blank lines."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = [_document(rng) for _ in range(600)]
    docs[300] = docs[10]
    docs[450] = near_copy(docs[20] + " " + " ".join(rng.choice(WORDS[:15]) for _ in range(80)))
    docs[451] = docs[450].replace("changed", "altered")

    def jsonl(texts: list[str]) -> bytes:
        blank = ["\n\n" if i % 17 == 0 else "\n" for i in range(len(texts))]  # blank lines count as lines
        return "".join(json.dumps({"text": t}) + end for t, end in zip(texts, blank, strict=True)).encode()

    (root / "a.jsonl").write_bytes(jsonl(docs[:200]))
    (root / "b.jsonl").write_bytes(jsonl(docs[200:280]))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl(docs[280:360])))
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs[360:440])))
    pq.write_table(pa.table({"text": docs[440:560]}), root / "e.parquet", row_group_size=25)
    for i, text in enumerate(docs[560:]):
        (root / f"f{i:02d}.txt").write_text(text, encoding="utf-8")
    return [str(root / "*.jsonl*"), str(root / "*.parquet"), str(root / "*.txt")]


def fingerprint(dataset: Path, root: Path) -> str:
    """One SHA-256 over every file of a dataset (the manifest with the temporary directory taken out)."""
    digest = hashlib.sha256()
    for p in sorted(dataset.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                data = data.replace(str(root).encode(), b"ROOT")
            digest.update(p.relative_to(dataset).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


# Recorded with the two-pass prepare of commit c63ee73, before any stage ran only once; "all on" again when PII
# scrubbing became per label: <PHONE> is <PHONE_NUMBER> and the manifest counts replacements per label. The "given"
# ones again when the manifest began to mark a given tokenizer (tokenizer.given; their shards did not change).
GOLDEN = {
    "trained, all on": "2fa3498ea8bc8b02a30573a31f43f8f9c3f0948d1766d2e8ce43d9e0e93a8213",
    "given, all on, 2 workers": "7cb6bded0e4324ceb09c1a44d19c6c6191fb429afc6931219f01583891678084",
    "given, stages off": "0ea48d8015156f50dde3174c71be78e50fd195ce582cad25dac101bd0146d761",
}


def test_shards_and_manifests_are_byte_identical_to_before(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    sources = speed_corpus(raw)
    root = tmp_path
    got = {}
    prepare_dataset(
        sources, tmp_path / "t", vocab_size=400, val_fraction=0.1, shard_tokens=4000, stages=ALL_ON, log=quiet
    )
    got["trained, all on"] = fingerprint(tmp_path / "t", root)
    tok = tmp_path / "tok.json"
    shutil.copyfile(tmp_path / "t" / "tokenizer.json", tok)
    monkeypatch.setattr("keel.data.pool.TASK_CHARS", 3000)
    for name, stages, workers in (("given, all on, 2 workers", ALL_ON, 2), ("given, stages off", StageSettings(), 1)):
        out = tmp_path / name.replace(" ", "").replace(",", "-")
        prepare_dataset(
            sources,
            out,
            tokenizer=str(tok),
            val_fraction=0.1,
            shard_tokens=4000,
            stages=stages,
            workers=workers,
            log=quiet,
        )
        got[name] = fingerprint(out, root)
    assert got == GOLDEN


def test_each_stage_runs_once_per_document(tmp_path, monkeypatch):
    sources = speed_corpus(tmp_path / "raw")
    prepare_dataset(sources, tmp_path / "tok", vocab_size=400, log=quiet)
    calls = {"quality_failure": 0, "scrub": 0, "signature": 0}
    for name, target in (
        ("quality_failure", keel.data.stages),
        ("scrub", keel.data.stages),
        ("signature", keel.data.minhash.MinHasher),
    ):
        original = getattr(target, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(target, name, counted)
    m = prepare_dataset(
        sources, tmp_path / "ds", tokenizer=str(tmp_path / "tok" / "tokenizer.json"), stages=ALL_ON, log=quiet
    )
    kept = m.splits["train"].documents + m.splits["val"].documents
    found = 1 + sum(1 for t in _all_texts(tmp_path / "raw") if t and not t.isspace())
    dropped_by_filters = sum(e["documents_dropped"] for k, e in m.stages.items() if k.startswith("filter."))
    assert calls["quality_failure"] == found  # the scan's verdict; the write pass does not filter again
    assert calls["signature"] == found - dropped_by_filters  # the scan only
    assert calls["scrub"] == kept  # the write pass only (a given tokenizer: no sample to scrub)


def _all_texts(raw: Path) -> list[str]:
    """Every document of speed_corpus but the first (counted by the caller), read back the simple way."""
    from keel.data.sources import read_documents

    return [t for p in sorted(raw.iterdir()) for _, t in read_documents(str(p), "text")][1:]


def test_filter_statistics_are_computed_only_for_the_filters_that_are_on(monkeypatch):
    def boom(*_):
        raise AssertionError("computed a statistic no filter needs")

    monkeypatch.setattr(keel.data.stages, "_char_counts", boom)
    monkeypatch.setattr(keel.data.stages, "_word_count", boom)
    monkeypatch.setattr(keel.data.stages, "_WORD", type("W", (), {"findall": staticmethod(boom)}))
    text = "an ordinary sentence, 42 words or so\nand a line\nand a line"
    assert assess(text, StageSettings(max_repeated_line_fraction=0.9), None).failure is None
    assert assess(text, StageSettings(pii=True, normalize="NFC"), None).failure is None


def test_character_counts_fast_path_agrees_with_the_definition():
    rng = random.Random(4)
    alphabet = "ab Z9_\t\n\x0b\x1c\x1f.,;!@٣１é\u00a0\u2003日"
    for n in range(3000):
        text = "".join(rng.choice(alphabet[: 14 if n % 2 else None]) for _ in range(rng.randint(0, 30)))
        visible = [c for c in text if not c.isspace()] or [" "]
        expected = (len(visible), sum(not c.isalnum() for c in visible), sum(c.isdigit() for c in visible))
        assert _char_counts(text) == expected, repr(text)


def test_minhash_signature_is_the_same_as_the_plain_formula():
    import zlib

    hasher = MinHasher(0.8)

    def plain(text: str) -> bytes:
        words = re.findall(r"\w+", text.lower())
        n = max(1, min(hasher.ngram, len(words)))
        shingles = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
        x = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.uint64)
        return ((np.outer(x, hasher._a) + hasher._b) % np.uint64(2**61 - 1)).min(axis=0).astype(np.uint32).tobytes()

    rng = random.Random(6)
    texts = ["", " ", "a", "a b", "İstanbul ǅ ß Ω", "ﬁ ﬂ ΣΑΣ"] + [_document(rng) for _ in range(200)]
    texts.append(" ".join(f"w{i}" for i in range(5000)))  # more shingles than one block
    for text in texts:
        assert hasher.signature(text) == plain(text), repr(text[:50])


def _trained(tmp_path: Path) -> tuple[list[str], Path]:
    sources = speed_corpus(tmp_path / "raw")
    prepare_dataset(sources, tmp_path / "tok", vocab_size=400, log=quiet)
    return sources, tmp_path / "tok" / "tokenizer.json"


def test_a_trained_byte_level_bpe_encodes_with_tiktoken_and_the_same_ids(tmp_path):
    sources, tok = _trained(tmp_path)
    logged: list[str] = []
    prepare_dataset(sources, tmp_path / "ds", tokenizer=str(tok), stages=ALL_ON, log=logged.append)
    assert any(line.startswith("encoder: tiktoken (ids identical") for line in logged), logged
    texts = PROBES + [t for t in _all_texts(tmp_path / "raw")]
    fast, exact = Encoder(tok, True), Encoder(tok, False)
    assert fast.tiktoken is not None and exact.tiktoken is None
    for a, b in zip(fast.encode(texts), exact.encode(texts), strict=True):
        assert a.tolist() == b.tolist()


def _with_merges(tok: Path, out: Path, merges: list[tuple[str, str]]) -> Path:
    """The tokenizer with merges appended (and their results as new tokens)."""
    spec = json.loads(tok.read_text())
    vocab = spec["model"]["vocab"]
    for a, b in merges:
        vocab[a + b] = len(vocab)
        spec["model"]["merges"].append([a, b])
    out.write_text(json.dumps(spec))
    return out


def test_a_tokenizer_tiktoken_would_encode_differently_falls_back_and_says_so(tmp_path):
    sources, tok = _trained(tmp_path)
    # HF merges "XZ" first and has no rule for ("Q", "XZ"): "QXZ" stays two tokens. tiktoken merges any pair whose
    # result is a token, so it would reach "QXZ" through "XZ": a different id sequence.
    odd = _with_merges(tok, tmp_path / "odd.json", [("X", "Z"), ("Q", "X"), ("QX", "Z")])
    fast, why = choose_encoder(odd, ["QXZ and more"])
    assert not fast and "tiktoken gave other ids on sample document 0" in why
    assert choose_encoder(odd, ["no such letters here"])[0]  # the sample decides
    (tmp_path / "raw" / "a.jsonl").write_text(json.dumps({"text": "QXZ " * 50}) + "\n" + json.dumps({"text": "b"}))
    logged: list[str] = []
    prepare_dataset(sources, tmp_path / "ds", tokenizer=str(odd), log=logged.append)
    assert any("tiktoken gave other ids" in line for line in logged), logged
    text = dataset_text(tmp_path / "ds")
    assert "QXZ QXZ" in text


def test_a_tokenizer_tiktoken_cannot_represent_uses_tokenizers(tmp_path):
    _, tok = _trained(tmp_path)
    spec = json.loads(tok.read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "lower.json").write_text(json.dumps(spec))
    fast, why = choose_encoder(tmp_path / "lower.json", ["Some Text"])
    assert not fast and "cannot represent this tokenizer: a subword prefix, suffix or normalizer" in why
    assert byte_level_ranks(json.loads(tok.read_text()))[0] is not None


def test_word_count_fast_path_agrees_with_the_regex():
    rng = random.Random(8)
    for _ in range(3000):
        text = "".join(rng.choice("ab_9 \t\n.,-'é日") for _ in range(rng.randint(0, 30)))
        assert _word_count(text) == len(re.findall(r"\w+", text)), repr(text)


def test_spans_of_every_size_read_exactly_the_records_of_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr("keel.data.sources.READ_BYTES", 64)  # a cut file's lines before the cut come out
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i % 13)}) for i in range(60)]
    lines[5], lines[9], lines[20] = "", "   ", '{"text": "bad'
    data = "\n".join(lines).replace("doc 3 ", "doc\r3 ").encode()  # no final newline, a CR inside a line
    (tmp_path / "a.jsonl").write_bytes(data)
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(23)]}), tmp_path / "b.parquet", row_group_size=5)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(data))
    half = data.index(b"doc 30")
    zstd = zstandard.ZstdCompressor()
    (tmp_path / "d.jsonl.zst").write_bytes(zstd.compress(data[:half]) + zstd.compress(data[half:])[:-9])  # cut
    files = expand_sources([str(tmp_path / "*")]).files
    for path, kinds in ((files[0], {"lines"}), (files[1], {"rows"}), (files[2], {"data"}), (files[3], {"data"})):
        whole = list(_records_and_end(read_records(path.path, "text")))
        for size in (1, 7, 100, 10_000):
            spans = list(plan([path], "text", size))
            assert {s.kind for s in spans} == kinds and (size == 10_000 or len(spans) > 1)
            assert [r for s in spans for r in _records_and_end(read_span(s, "text"))] == whole
    assert whole[-1][0] == "truncated_file" and len(whole) > 25  # the cut .zst: its first frame's lines, then that
    bad = [str(r) for s in plan([files[0]], "text", 50) for r in read_span(s, "text") if isinstance(r, BadRecord)]
    assert [b.split(": ")[0] for b in bad] == [f"{files[0].path}:4", f"{files[0].path}:21"]  # numbered in the file


def _records_and_end(records: Iterator) -> Iterator:
    """Records as they come, bad ones as (kind, message), and the file-level problem that ends them, if any."""
    try:
        for r in records:
            yield (r.kind, str(r)) if isinstance(r, BadRecord) else r
    except BadRecord as e:
        yield e.kind, str(e)


def test_with_a_pool_the_main_process_parses_no_json_lines(tmp_path, monkeypatch):
    sources, tok = _trained(tmp_path)
    raw = tmp_path / "big"
    raw.mkdir()
    rng = random.Random(2)
    (raw / "0.jsonl").write_text(json.dumps({"text": "first " * 50_000}) + "\n")  # all the encoder check reads
    for f in range(1, 4):
        (raw / f"{f}.jsonl").write_text("".join(json.dumps({"text": _document(rng)}) + "\n" for _ in range(200)))
    for f, compress in ((4, gzip.compress), (5, zstandard.ZstdCompressor().compress)):  # the main process decompresses
        lines = "".join(json.dumps({"text": _document(rng)}) + "\n" for _ in range(200)).encode()
        (raw / f"{f}.jsonl.{'gz' if f == 4 else 'zst'}").write_bytes(compress(lines))
    monkeypatch.setattr("keel.data.pool.TASK_CHARS", 20_000)
    parsed = []
    original = keel.data.sources.jsonl_record
    monkeypatch.setattr(keel.data.sources, "jsonl_record", lambda *a: parsed.append(1) or original(*a))
    m = prepare_dataset(
        [str(raw / "*.jsonl*")], tmp_path / "ds", tokenizer=str(tok), stages=ALL_ON, workers=2, log=quiet
    )
    files = {int(f) for e in m.splits.values() for s in e.shards for f in np.load(tmp_path / "ds" / s.origins)[:, 0]}
    assert files >= {1, 2, 3, 4, 5}  # the compressed ones among them (the first is filtered out)
    assert len(parsed) == 1  # the encoder check's sample; every other line was parsed in a worker


def _one_at_a_time(docs: list[Keys], signatures: list[bytes], hasher: MinHasher, exact: bool, near: bool) -> list:
    """The rules one document at a time: an earlier document's digest, an earlier kept one's band (LSH agreement)."""
    digests: set = set()
    held: set = set()  # (band, the band's values) of the kept documents
    out: list[str | None] = []
    step = 4 * hasher.rows
    for d, signature in zip(docs, signatures, strict=True):
        if exact and d.digest in digests:
            out.append("dedup_exact")
            continue
        digests.add(d.digest)
        keys = {(b, signature[b * step : (b + 1) * step]) for b in range(hasher.bands)} if near else set()
        if keys & held:
            out.append("dedup_near")
            continue
        held |= keys
        out.append(None)
    return out


def test_the_batched_dedup_store_decides_as_one_document_at_a_time(tmp_path):
    rng = random.Random(11)
    hasher = MinHasher(0.8)
    texts = [" ".join(rng.choice(WORDS[:15]) + str(rng.randrange(40)) for _ in range(60)) for _ in range(150)]
    for _ in range(150):  # exact copies, near copies and copies of near copies, near and far from the original
        base = rng.choice(texts)
        texts.insert(rng.randrange(len(texts) + 1), rng.choice([base, near_copy(base), base.replace("a", "b", 2)]))
    signatures = [hasher.signature(text) for text in texts]
    digests = [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts]
    docs = [  # files change every 40 documents and ordinals cross 2**32: the origins log keeps both
        Keys(i // 40, i + (i // 25) * 2**31, digests[i], hasher.band_hashes(s)) for i, s in enumerate(signatures)
    ]
    for exact, near in ((True, True), (True, False), (False, True)):
        expected = _one_at_a_time(docs, signatures, hasher, exact, near)
        assert (not near or expected.count("dedup_near") > 20) and (not exact or expected.count("dedup_exact") > 20)
        for size in (1, 7, 64, len(docs)):
            store = DedupStore(tmp_path / f"s{size}", exact, 0.8 if near else 0.0)
            got = dedup_verdicts(store, [docs[lo : lo + size] for lo in range(0, len(docs), size)])
            store.close()
            assert got == expected, (exact, near, size)
            assert {p.name for p in store.path.iterdir()} <= {  # what the scan sorted is gone
                "store.json",
                "origins.log",
                "runs.log",
                "digests.log",
                "bands.log",
                "near.log",
            }
            reopened = DedupStore(tmp_path / f"s{size}", exact, 0.8 if near else 0.0, readonly=True)
            batches = list(reopened.kept_batches(batch=50))
            want = [d for d, stage in zip(docs, expected, strict=True) if stage is None]
            assert np.concatenate([b.rows for b in batches]).tolist() == list(range(len(want)))
            assert [(f, o) for b in batches for f, o in zip(b.files.tolist(), b.ordinals.tolist(), strict=True)] == [
                (d.file, d.ordinal) for d in want
            ]
            if exact:
                assert b"".join(b.digests.tobytes() for b in batches) == b"".join(d.digest for d in want)
            if near:
                assert b"".join(b.bands.tobytes() for b in batches) == b"".join(d.bands for d in want)
            reopened.close()


def test_merge_looks_up_the_parts_stores_and_fills_none(tmp_path, monkeypatch):
    rng = random.Random(12)
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = [" ".join(rng.choice(WORDS) + str(rng.randrange(99)) for _ in range(80)) for _ in range(20)]
    files = [texts[:10], texts[10:] + [texts[2], near_copy(texts[4])]]
    for i, docs in enumerate(files):
        (raw / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare_dataset([str(raw / "*.jsonl")], tmp_path / "tok", vocab_size=400, log=quiet)
    stages = StageSettings(dedup_exact=True, dedup_near_threshold=0.8)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        tok = str(tmp_path / "tok" / "tokenizer.json")
        prepare_dataset([str(raw / "*.jsonl")], part, tokenizer=tok, stages=stages, part=(i, 2), log=quiet)

    def refill(*_):
        raise AssertionError("merge filled a store again")

    monkeypatch.setattr(DedupStore, "add", refill)
    merged = merge_datasets(parts, tmp_path / "merged")
    assert merged.stages["merge.dedup_exact"]["documents_dropped"] == 1
    assert merged.stages["merge.dedup_near"]["documents_dropped"] == 1


def test_a_resumed_write_pass_keeps_its_pii_counts_and_writes_the_same_bytes(tmp_path, monkeypatch):
    sources, tok = _trained(tmp_path)
    args = {"tokenizer": str(tok), "shard_tokens": 1500, "stages": ALL_ON, "log": quiet}
    prepare_dataset(sources, tmp_path / "whole", **args)
    calls = {"n": 0}
    original = keel.data.prepare._add

    def crash_later(*a):
        calls["n"] += 1
        if calls["n"] == 25:
            raise RuntimeError("killed")
        original(*a)

    with monkeypatch.context() as m:
        m.setattr(keel.data.prepare, "_add", crash_later)
        m.setattr("keel.data.pool.TASK_CHARS", 2000)
        with pytest.raises(RuntimeError):
            prepare_dataset(sources, tmp_path / "out", **args)
    logged: list[str] = []
    prepare_dataset(sources, tmp_path / "out", **{**args, "log": logged.append})
    assert any(line.startswith("resuming ") and not line.endswith(": 0 shards already done") for line in logged)
    assert fingerprint(tmp_path / "out", tmp_path) == fingerprint(tmp_path / "whole", tmp_path)
