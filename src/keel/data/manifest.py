"""The dataset manifest (manifest.json): the typed commit record of `keel data prepare`, merge and remove."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.config import validation_message
from keel.data.stages import StageSettings
from keel.errors import DataError
from keel.io import atomic_write_json, filesystem_errors, sha256_file

# The typed model describes the shape every Keel has written as /1 (keys that older /1 writers left out have
# defaults), so datasets already on disk load as they are, and a dataset written now loads in an older Keel.
# A change that an older reader would misread gets a new version, and this module a reader of /1.
FORMAT = "keel-dataset/1"
MANIFEST = "manifest.json"


class Entry(BaseModel):
    """A part of the manifest; keys this Keel does not know are kept and written back when it rewrites it."""

    model_config = ConfigDict(extra="allow")


class TokenizerEntry(Entry):
    """The dataset's tokenizer file, its hash, vocabulary size and EOS id."""

    file: str
    sha256: str
    vocab_size: int = Field(gt=0)
    eos_id: int = Field(ge=0)
    given: bool | None = None  # True: prepare.tokenizer supplied it, so none of it was learned from this dataset


class Shard(Entry):
    """One shard file of a split with its document index, lineage, size and hash."""

    file: str  # the tokens, raw, in the manifest's dtype
    index: str  # .idx: the start offset of each document in the shard
    origins: str | None = None  # .docs: (file, ordinal) per document; datasets from before lineage have none
    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)
    sha256: str
    version: int = Field(0, ge=0)  # how often `keel data remove` rewrote the shard


class Split(Entry):
    """A split's token and document counts and its shards, in stream order."""

    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)
    shards: list[Shard]


class SourceEntry(Entry):
    """What one source glob contributed (files, documents kept, bytes) and its license."""

    glob: str  # an include glob of prepare.sources, or an exclude ('!GLOB') with the files it removed
    files: int = Field(ge=0)
    documents: int = Field(ge=0)
    bytes: int = Field(ge=0)
    license: str = "unknown"


class FileEntry(Entry):
    """One source file the dataset was read from."""

    path: str
    key: str  # the path relative to its glob's fixed prefix: what the validation split hashes
    source: int = Field(ge=0)  # index into the include globs
    removed: str | None = None  # when `keel data remove` removed the whole file (its documents are gone)


class Tombstone(Entry):
    """A removed document: a later prepare drops any document with this content hash (keel.data.stages.content_hash)."""

    sha256: str
    key: str  # the source file's key and the document's ordinal when it was removed
    ordinal: int = Field(ge=0)
    time: str


class Removal(Entry):
    """One `keel data remove` (or merge dedup): when, which documents, which shards it rewrote."""

    time: str
    documents: list[tuple[str, int]]  # (file key, ordinal)
    shards: list[str]
    # Written by `keel data remove` (not by merge dedup), so lineage can still answer for runs on the version before:
    manifest_before: str | None = None  # the dataset's manifest hash before this removal
    spans: list[tuple[str, int, int]] | None = None  # each document's (split, start, end) in that version
    split_tokens: dict[str, int] | None = None  # each split's tokens in that version
    tombstones: list[str] | None = None  # each document's content hash
    vocabulary: list[int] | None = None  # ids of the tokenizer's entries learned only from the removed text
    retokenized: bool | None = None  # True: a new tokenizer was trained on the kept text and every shard re-encoded


class PrepareSettings(Entry):
    """The settings the dataset was prepared with (what shapes its content)."""

    val_fraction: float
    text_field: str
    shard_tokens: int
    bad_input: Literal["error", "skip"] = "error"
    stages: StageSettings = Field(default_factory=StageSettings)


class Manifest(Entry):
    """The whole manifest.json."""

    format: Literal["keel-dataset/1"]
    dtype: Literal["uint16", "uint32"]
    tokenizer: TokenizerEntry
    splits: dict[str, Split]
    sources: list[SourceEntry] = Field(default_factory=list)
    # Lineage: each shard's .docs file names documents by (index into this list, ordinal in the file).
    files: list[FileEntry] = Field(default_factory=list)
    stages: dict[str, dict[str, int]] = Field(default_factory=dict)  # per stage: documents/bytes dropped, changed
    skipped: dict[str, int] = Field(default_factory=dict)  # bad records or files skipped, by kind
    settings: PrepareSettings
    dedup_store: str | None = None  # a --shard part's dedup keys, for the merge
    merged_from: list[str] | None = None
    removals: list[Removal] = Field(default_factory=list)
    # Removed here, or carried over by prepare.tombstones; None (not written) where there are none, so the manifests
    # of datasets without removals stay byte for byte as they were.
    tombstones: list[Tombstone] | None = None

    @property
    def token_dtype(self) -> type[np.unsignedinteger]:
        """The numpy type of the shards' tokens."""
        return np.uint16 if self.dtype == "uint16" else np.uint32


def write_manifest(dataset_dir: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically: a reader sees the old state or the whole new one, never a torn file."""
    atomic_write_json(Path(dataset_dir) / MANIFEST, manifest.model_dump(mode="json", exclude_none=True))


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Read and check a dataset's manifest: format, shape, safe paths, every shard present with the right size."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset {root} does not exist (data.dataset); make it with `keel data prepare`")
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root} has no {MANIFEST}: not a prepared dataset, or its preparation did not finish; "
            "run `keel data prepare`"
        )
    with filesystem_errors("read the dataset manifest", DataError):
        raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the dataset again") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != FORMAT:
        raise DataError(f"{path}: unknown format {fmt!r}; this Keel reads {FORMAT!r}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        message = validation_message(e, Manifest)
        raise DataError(f"{path}: malformed manifest: {message}; prepare the dataset again") from None
    with filesystem_errors("check the dataset's files", DataError):
        _check_files(root, manifest)
    return manifest


def manifest_sha256(dataset_dir: str | Path) -> str:
    """The SHA-256 of the dataset's manifest.json, which names every shard by its hash: the dataset's identity."""
    path = Path(dataset_dir) / MANIFEST
    with filesystem_errors("read the dataset manifest", DataError):
        return sha256_file(path)


def resolve_inside(root: Path, relative: str | None) -> Path:
    """The path of a manifest entry under the dataset dir; absolute paths, `..` and escaping links are refused."""
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{root / MANIFEST}: bad file entry {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise DataError(f"{root / MANIFEST}: file {relative!r} is outside the dataset directory; refusing to read it")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"{root / MANIFEST}: file {relative!r} links outside the dataset directory; refusing to read it"
        )
    return path


def _check_files(root: Path, manifest: Manifest) -> None:
    itemsize = np.dtype(manifest.token_dtype).itemsize
    tokenizer = resolve_inside(root, manifest.tokenizer.file)
    if not tokenizer.is_file():
        raise DataError(f"{root}: tokenizer file {tokenizer.name} is missing; prepare the dataset again")
    for split, entry in manifest.splits.items():
        for shard in entry.shards:
            data, index = resolve_inside(root, shard.file), resolve_inside(root, shard.index)
            expected = shard.tokens * itemsize
            # A size check costs one stat per shard; hashing would read the whole dataset on every start.
            size = data.stat().st_size if data.is_file() else None
            if size != expected:
                found = "is missing" if size is None else f"has {size} bytes, expected {expected}"
                raise DataError(f"{root}: {split} shard {shard.file} {found}; prepare the dataset again")
            if not index.is_file():
                raise DataError(f"{root}: {split} index {shard.index} is missing; prepare the dataset again")
