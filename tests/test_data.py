"""keel.data: prepare (tokenizer, shards, manifest), dataset checks, and the pure global sample order."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from keel.data.dataset import TokenDataset
from keel.data.loader import BatchLoader, GlobalSampleOrder, eval_sample_ids, read_samples
from keel.data.manifest import Manifest, load_manifest, manifest_sha256, write_manifest
from keel.data.prepare import prepare_dataset
from keel.data.tokenizer import EOS_TOKEN, encoding_pieces, eos_id, load_tokenizer
from keel.errors import ConfigError, DataError

WORDS = "the a model data token shard loss step rank seed batch epoch naïve café 日本語 🙂 def return if else".split()
CODE = "\n\n\nclass Thing:\n    def f(self, x):\n        return x  # café\n\n    \n    def g(self):\n\tpass\n"
SHARD_TOKENS = 700


def _prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"


def _write_corpus(root: Path) -> list[str]:
    """A few .txt files (one nested, one empty) and a .jsonl; returns the non-empty documents."""
    rng = random.Random(0)
    docs = [_prose(rng, 300) + f"a literal {EOS_TOKEN} stays text\n", CODE * 40, _prose(rng, 50)]
    (root / "sub").mkdir(parents=True)
    for path, text in zip(["a.txt", "b.py.txt", "sub/c.txt"], docs, strict=True):
        (root / path).write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("")
    (root / "sub" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # excluded below, else an error
    records = [_prose(rng, rng.randint(5, 40)) for _ in range(40)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(records)]
    lines[5:5] = ["", json.dumps({"text": ""})]  # a blank line and an empty document: both skipped
    (root / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return docs + records


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = _write_corpus(root)
    out = root.parent / "dataset"
    sources = [str(root / "**/*.txt"), str(root / "*.jsonl"), "!" + str(root / "sub/latin1.*")]
    manifest = prepare_dataset(sources, out, vocab_size=400, val_fraction=0.2, shard_tokens=SHARD_TOKENS, log=_quiet)
    return out, manifest, docs


def _quiet(_: str) -> None:
    pass


def _stream(out: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's whole token stream and its global document starts, read straight from the files."""
    tokens, starts, offset = [], [], 0
    for shard in manifest.splits[split].shards:
        tokens.append(np.fromfile(out / shard.file, dtype=np.uint16))
        starts.append(np.load(out / shard.index) + offset)
        offset += shard.tokens
    return np.concatenate(tokens), np.concatenate(starts)


def test_manifest_and_shards(prepared: tuple[Path, Manifest, list[str]]) -> None:
    out, manifest, docs = prepared
    assert load_manifest(out) == manifest
    assert manifest.model_dump(mode="json", exclude_none=True) == json.loads((out / "manifest.json").read_text())
    assert manifest.format == "keel-dataset/1" and manifest.dtype == "uint16"
    tok = load_tokenizer(out / "tokenizer.json")
    info = manifest.tokenizer
    assert info.sha256 == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert info.eos_id == eos_id(tok) and info.vocab_size == tok.get_vocab_size() <= 400
    assert [s.files for s in manifest.sources] == [4, 1, 1] and manifest.sources[1].documents == 40
    for split in ("train", "val"):
        entry = manifest.splits[split]
        assert entry.documents >= 1
        shards = entry.shards
        assert all(s.tokens == SHARD_TOKENS for s in shards[:-1]) and 0 < shards[-1].tokens <= SHARD_TOKENS
        for shard in shards:
            data = (out / shard.file).read_bytes()
            assert len(data) == 2 * shard.tokens and hashlib.sha256(data).hexdigest() == shard.sha256
            assert np.load(out / shard.index).dtype == np.int64
        assert sum(s.tokens for s in shards) == entry.tokens
    assert len(manifest.splits["train"].shards) > 1


def test_eos_after_every_document_and_decode_round_trip(prepared: tuple[Path, Manifest, list[str]]) -> None:
    out, manifest, docs = prepared
    tok = load_tokenizer(out / "tokenizer.json")
    eos = manifest.tokenizer.eos_id
    decoded = []
    for split in ("train", "val"):
        stream, starts = _stream(out, manifest, split)
        assert starts[0] == 0 and len(starts) == manifest.splits[split].documents
        # EOS ends every document and appears nowhere else, not even for the literal "<|endoftext|>" text.
        assert np.flatnonzero(stream == eos).tolist() == [*(starts[1:] - 1), len(stream) - 1]
        ends = [*starts[1:], len(stream)]
        decoded += [tok.decode(stream[a : b - 1].tolist()) for a, b in zip(starts, ends, strict=True)]
    assert sorted(decoded) == sorted(docs)


def test_same_inputs_give_same_dataset_with_given_tokenizer(prepared: tuple[Path, Manifest, list[str]], tmp_path: Path):
    out, manifest, _ = prepared
    sources = [s.glob for s in manifest.sources]
    again = prepare_dataset(
        sources, tmp_path / "again", tokenizer=str(out / "tokenizer.json"), val_fraction=0.2,
        shard_tokens=SHARD_TOKENS, log=_quiet,
    )  # fmt: skip
    assert again.splits == manifest.splits and again.tokenizer == manifest.tokenizer
    assert manifest_sha256(tmp_path / "again") == manifest_sha256(out)


def test_encoding_pieces_give_the_ids_of_the_whole_text(prepared: tuple[Path, Manifest, list[str]]) -> None:
    tok = load_tokenizer(prepared[0] / "tokenizer.json")
    text = CODE * 30 + _prose(random.Random(1), 200)
    pieces = list(encoding_pieces(text, max_chars=40))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert sum((tok.encode(p).ids for p in pieces), []) == tok.encode(text).ids


@pytest.mark.parametrize("val_fraction", [1e-9, 1 - 1e-9])
def test_each_split_gets_a_document(tmp_path: Path, val_fraction: float) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document number {i}\n")
    manifest = prepare_dataset(
        [str(tmp_path / "*.txt")], tmp_path / "ds", vocab_size=300, val_fraction=val_fraction, log=_quiet
    )
    docs = {split: entry.documents for split, entry in manifest.splits.items()}
    assert docs["train"] >= 1 and docs["val"] >= 1 and sum(docs.values()) == 3


def test_token_dataset_reads_across_shards(prepared: tuple[Path, Manifest, list[str]]) -> None:
    out, manifest, _ = prepared
    stream, _ = _stream(out, manifest, "train")
    ds = TokenDataset(out, "train")
    assert ds.num_tokens == len(stream) and ds.eos_id == manifest.tokenizer.eos_id and ds.vocab_size <= 400
    for start, length in [(0, 10), (SHARD_TOKENS - 3, 7), (5, 2 * SHARD_TOKENS + 1), (len(stream) - 4, 4)]:
        got = ds.read(start, length)
        assert got.dtype == np.int64 and got.tolist() == stream[start : start + length].tolist()
    assert pickle.loads(pickle.dumps(ds)).read(SHARD_TOKENS - 3, 7).tolist() == ds.read(SHARD_TOKENS - 3, 7).tolist()
    with pytest.raises(IndexError):
        ds.read(len(stream) - 1, 2)


def test_sample_order_is_a_pure_function() -> None:
    n = 50
    forward = [GlobalSampleOrder(n, seed=1).sample(i) for i in range(3 * n)]
    fresh = GlobalSampleOrder(n, seed=1)
    backward = [fresh.sample(i) for i in reversed(range(3 * n))][::-1]  # query order does not matter
    assert forward == backward
    assert forward != [GlobalSampleOrder(n, seed=2).sample(i) for i in range(3 * n)]
    epochs = [forward[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def _loader(ds: TokenDataset, rank: int, world: int, micro: int = 1, seed: int = 3) -> BatchLoader:
    return BatchLoader(
        ds, seq_len=8, global_batch_size=8, micro_batch_size=micro, rank=rank, world_size=world, seed=seed
    )


def _global(loaders: list[BatchLoader]) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch: every rank's micro batches concatenated in rank order."""
    parts = [mb for loader in loaders for mb in loader.next_batch()]
    micro = loaders[0].micro_batch_size
    assert len(parts) == loaders[0].global_batch_size // micro and all(p[0].shape == (micro, 8) for p in parts)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_rank_slices_make_the_same_global_batches(prepared: tuple[Path, Manifest, list[str]]) -> None:
    ds = TokenDataset(prepared[0], "train")
    single = _loader(ds, 0, 1, micro=8)
    reference = [_global([single]) for _ in range(4)]
    ids = [single.order.sample(i) for i in range(8)]
    assert torch.equal(reference[0][0], read_samples(ds, ids, 8)[0])
    inputs, targets = reference[0]
    assert inputs.shape == (8, 8) and inputs.dtype == torch.long and torch.equal(inputs[:, 1:], targets[:, :-1])
    for world, micro in [(2, 2), (4, 1), (4, 2)]:
        loaders = [_loader(ds, r, world, micro) for r in range(world)]
        for want in reference:
            got = _global(loaders)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_continues_exactly_also_on_another_world_size(prepared: tuple[Path, Manifest, list[str]]) -> None:
    ds = TokenDataset(prepared[0], "train")
    single = _loader(ds, 0, 1)
    reference = [_global([single]) for _ in range(6)]
    before = [_loader(ds, r, 2) for r in range(2)]
    for _ in range(3):
        _global(before)
    state = before[0].state_dict()
    assert state == {"next_batch": 3} == before[1].state_dict()
    for world in (2, 4):
        after = [_loader(ds, r, world) for r in range(world)]
        for loader in after:
            loader.load_state_dict(state)
        for want in reference[3:]:
            assert torch.equal(_global(after)[0], want[0])


def test_eval_samples_are_fixed_and_sliced(prepared: tuple[Path, Manifest, list[str]]) -> None:
    ds = TokenDataset(prepared[0], "val")
    count = (ds.num_tokens - 1) // 16
    num_batches = count // 4 + 2  # enough to wrap around the small split

    def run(world: int) -> list[torch.Tensor]:
        sizes = {"seq_len": 16, "batch_size": 4, "num_batches": num_batches, "world_size": world}
        per_rank = [[read_samples(ds, ids, 16) for ids in eval_sample_ids(ds, **sizes, rank=r)] for r in range(world)]
        return [torch.cat([per_rank[r][b][0] for r in range(world)]) for b in range(num_batches)]

    single = run(1)
    assert all(torch.equal(a, b) for a, b in zip(single, run(2), strict=True))
    flat = torch.cat(single)
    assert torch.equal(flat[0], torch.from_numpy(ds.read(0, 16))) and torch.equal(flat[count], flat[0])


def test_loader_validates_sizes(prepared: tuple[Path, Manifest, list[str]]) -> None:
    ds = TokenDataset(prepared[0], "val")
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        BatchLoader(ds, seq_len=8, global_batch_size=6, micro_batch_size=1, rank=0, world_size=4, seed=0)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        BatchLoader(ds, seq_len=8, global_batch_size=8, micro_batch_size=3, rank=0, world_size=2, seed=0)
    with pytest.raises(DataError, match=r"val split .* train.seq_len=100000"):
        BatchLoader(ds, seq_len=100_000, global_batch_size=8, micro_batch_size=1, rank=0, world_size=1, seed=0)


OK_LINE = b'{"text": "fine"}\n'


@pytest.mark.parametrize(
    ("files", "pattern", "expected"),
    [
        ({"bad.jsonl": OK_LINE + b'{"text": "oops"\n'}, "*", ["bad.jsonl:2: not valid JSON ("]),
        ({"ok.txt": b"hi", "bad.txt": b"\xff\xfe!"}, "*", ["bad.txt: not valid UTF-8"]),
        ({"d.jsonl": OK_LINE + b'{"content": "x"}\n'}, "*", ["d.jsonl:2: no field 'text'", "prepare.text_field"]),
        ({}, "nothing/*.txt", ["nothing/*.txt' matches no files"]),
        ({"a.txt": b"", "b.txt": b" \n", "c.jsonl": b"\n"}, "*", ["empty corpus"]),
    ],
    ids=["bad-json", "bad-utf8", "missing-field", "no-files", "empty-corpus"],
)
def test_bad_sources_are_one_line_errors(tmp_path: Path, files: dict[str, bytes], pattern: str, expected: list[str]):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as err:
        prepare_dataset([str(tmp_path / pattern)], tmp_path / "out", vocab_size=300, log=_quiet)
    message = str(err.value)
    assert all(e in message for e in expected) and "\n" not in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_failed_prepare_leaves_no_dataset_only_its_staging_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(f"text {i}")

    def crash(*_: object) -> None:
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr("keel.data.prepare._add", crash)
        with pytest.raises(RuntimeError):
            prepare_dataset([str(tmp_path / "*.txt")], tmp_path / "out", vocab_size=300, log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.partial-")) == ["0.txt", "1.txt"]
    logged: list[str] = []
    prepare_dataset([str(tmp_path / "*.txt")], tmp_path / "out", vocab_size=300, log=logged.append)
    assert any(line.startswith("resuming ") for line in logged) and not list(tmp_path.glob(".out.partial-*"))


def test_missing_tokenizer_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="missing.json does not exist"):
        prepare_dataset([str(tmp_path / "*.txt")], tmp_path / "out", tokenizer=str(tmp_path / "missing.json"))


def test_existing_dataset_is_never_overwritten(prepared: tuple[Path, Manifest, list[str]]) -> None:
    out, manifest, _ = prepared
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="already holds a dataset; choose another data.dataset or delete it"):
        prepare_dataset([s.glob for s in manifest.sources], out, vocab_size=300, log=_quiet)
    assert (out / "manifest.json").read_bytes() == before and load_manifest(out) == manifest


def _copy(prepared: tuple[Path, Manifest, list[str]], tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    return out, json.loads((out / "manifest.json").read_text())


def test_load_manifest_detects_damage(prepared: tuple[Path, Manifest, list[str]], tmp_path: Path) -> None:
    out, manifest = _copy(prepared, tmp_path)
    shard = out / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train shard train/00000.bin has \d+ bytes, expected"):
        load_manifest(out)
    shard.unlink()
    with pytest.raises(DataError, match="train/00000.bin is missing"):
        TokenDataset(out, "train")
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="has no manifest.json"):
        load_manifest(tmp_path)
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(DataError, match="unknown format 'other/9'"):
        load_manifest(out)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/hostname", "train/../../outside.bin", "link.bin"])
def test_manifest_paths_cannot_escape(prepared: tuple[Path, Manifest, list[str]], tmp_path: Path, bad: str) -> None:
    out, manifest = _copy(prepared, tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"\0\0")
    (out / "link.bin").symlink_to(tmp_path / "outside.bin")
    manifest["splits"]["val"]["shards"][0].update(file=bad, tokens=1)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="outside the dataset directory"):
        load_manifest(out)


@pytest.mark.parametrize(
    ("damage", "key"),
    [
        (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "splits.train.shards.0.sha256: Field required"),
        (lambda m: m["splits"]["val"]["shards"][0].update(tokens="many"), "splits.val.shards.0.tokens: Input should"),
        (lambda m: m["tokenizer"].pop("vocab_size"), "tokenizer.vocab_size: Field required"),
        (lambda m: m.update(dtype="int8"), "dtype: Input should be 'uint16' or 'uint32' (got 'int8')"),
        (lambda m: m.update(splits=[]), "splits: Input should be a valid dictionary"),
    ],
    ids=["missing-hash", "tokens-not-a-number", "no-vocab-size", "unknown-dtype", "splits-not-a-table"],
)
def test_a_malformed_manifest_is_one_line_naming_the_file_and_the_key(prepared, tmp_path, damage, key) -> None:
    out, manifest = _copy(prepared, tmp_path)
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        load_manifest(out)
    assert str(err.value).startswith(f"{out / 'manifest.json'}: malformed manifest: {key}")
    assert "\n" not in str(err.value)


def test_older_keel_dataset_1_manifests_still_load_and_unknown_keys_survive_a_rewrite(prepared, tmp_path) -> None:
    out, manifest = _copy(prepared, tmp_path)
    # The first /1 shape: no lineage, licenses or statistics, and three settings.
    for key in ("files", "stages", "skipped"):
        del manifest[key]
    manifest["settings"] = {k: manifest["settings"][k] for k in ("val_fraction", "text_field", "shard_tokens")}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["origins"]
    for source in manifest["sources"]:
        source.pop("license", None)
    manifest["written_by"] = "a later Keel"
    (out / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_manifest(out)
    assert loaded.files == [] and loaded.settings.bad_input == "error" and loaded.sources[0].license == "unknown"
    assert loaded.splits["train"].shards[0].origins is None
    assert TokenDataset(out, "train").num_tokens == prepared[1].splits["train"].tokens
    write_manifest(out, loaded)
    again = json.loads((out / "manifest.json").read_text())
    assert again["written_by"] == "a later Keel" and "origins" not in again["splits"]["train"]["shards"][0]
