"""A prepared dataset: its manifest (the commit record of `keel data prepare`) and its token stream per split."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from keel.errors import DataError
from keel.io import atomic_write_json, sha256_file

FORMAT = "keel-dataset/1"
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def write_manifest(dataset_dir: Path, manifest: dict) -> None:
    """Write manifest.json atomically: a reader sees the old state or the whole new one, never a torn file."""
    atomic_write_json(dataset_dir / MANIFEST, manifest)


def load_manifest(dataset_dir: str | Path) -> dict:
    """Read and check a dataset's manifest: format, safe paths, every shard present with the right size."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset {root} does not exist (data.dataset); make it with `keel data prepare`")
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root} has no {MANIFEST}: not a prepared dataset, or its preparation did not finish; "
            "run `keel data prepare`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the dataset again") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise DataError(f"{path}: unknown format {fmt!r}; this Keel reads {FORMAT!r}")
    try:
        _check_files(root, manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e}); prepare the dataset again") from None
    return manifest


def manifest_sha256(dataset_dir: str | Path) -> str:
    """The SHA-256 of the dataset's manifest.json, which names every shard by its hash: the dataset's identity."""
    path = Path(dataset_dir) / MANIFEST
    try:
        return sha256_file(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None


def resolve_inside(root: Path, relative: str) -> Path:
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


def _check_files(root: Path, manifest: dict) -> None:
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{root / MANIFEST}: unknown token dtype {manifest['dtype']!r} (known: {', '.join(DTYPES)})")
    itemsize = np.dtype(DTYPES[manifest["dtype"]]).itemsize
    tokenizer = resolve_inside(root, manifest["tokenizer"]["file"])
    if not tokenizer.is_file():
        raise DataError(f"{root}: tokenizer file {tokenizer.name} is missing; prepare the dataset again")
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            data, index = resolve_inside(root, shard["file"]), resolve_inside(root, shard["index"])
            expected = int(shard["tokens"]) * itemsize
            # A size check costs one stat per shard; hashing would read the whole dataset on every start.
            size = data.stat().st_size if data.is_file() else None
            if size != expected:
                found = "is missing" if size is None else f"has {size} bytes, expected {expected}"
                raise DataError(f"{root}: {split} shard {shard['file']} {found}; prepare the dataset again")
            if not index.is_file():
                raise DataError(f"{root}: {split} index {shard['index']} is missing; prepare the dataset again")


class TokenDataset:
    """One split of a prepared dataset as a single read-only token stream over memory-mapped shards."""

    def __init__(self, dataset_dir: str | Path, split: str):
        self.dir = Path(dataset_dir)
        self.split = split
        self.manifest = load_manifest(self.dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.dir}: no {split!r} split (it has: {', '.join(splits)})")
        dtype = DTYPES[self.manifest["dtype"]]
        # Empty files cannot be memory-mapped; they hold no tokens anyway.
        self._shards = [
            np.memmap(resolve_inside(self.dir, s["file"]), dtype=dtype, mode="r")
            for s in splits[split]["shards"]
            if s["tokens"] > 0
        ]
        self._ends = np.cumsum([len(s) for s in self._shards], dtype=np.int64)
        self.num_tokens = int(self._ends[-1]) if len(self._ends) else 0
        tokenizer = self.manifest["tokenizer"]
        self.vocab_size = int(tokenizer["vocab_size"])
        self.eos_id = int(tokenizer["eos_id"])
        self.tokenizer_path = resolve_inside(self.dir, tokenizer["file"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64; the range may span shards."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the {self.split} split of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._ends, start, side="right"))
        done = 0
        while done < length:
            tokens = self._shards[shard]
            offset = start + done - (int(self._ends[shard]) - len(tokens))
            take = min(length - done, len(tokens) - offset)
            out[done : done + take] = tokens[offset : offset + take]
            done += take
            shard += 1
        return out

    def __reduce__(self):
        # Pickle (for DataLoader worker processes) by location: reopen the maps instead of copying the tokens.
        return TokenDataset, (self.dir, self.split)
