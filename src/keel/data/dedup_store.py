"""Exact and near-duplicate state on disk (sqlite3): RAM stays bounded however many documents are seen."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from keel.data.minhash import MinHasher
from keel.errors import DataError
from keel.io import fsync_path

STORE = "dedup.sqlite"
CACHE_KIB = 16 * 1024  # sqlite's page cache: the store's whole RAM footprint, whatever the document count

_SCHEMA = """
CREATE TABLE IF NOT EXISTS doc (file INTEGER, ordinal INTEGER, digest BLOB, sig BLOB, dropped TEXT,
                                PRIMARY KEY (file, ordinal)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS exact (digest BLOB PRIMARY KEY, file INTEGER, ordinal INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS band (band INTEGER, key BLOB, file INTEGER, ordinal INTEGER,
                                 PRIMARY KEY (band, key)) WITHOUT ROWID;
"""


class DedupStore:
    """Documents seen so far, keyed by (file, ordinal): exact content hashes, LSH band keys, and what was dropped."""

    def __init__(self, path: Path, exact: bool, near_threshold: float, readonly: bool = False):
        self.path, self.exact = Path(path), exact
        self.hasher = MinHasher(near_threshold) if near_threshold else None
        if readonly and not self.path.is_file():
            raise DataError(f"{self.path} is missing: the dedup keys of this dataset are gone; prepare it again")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._db = sqlite3.connect(uri, uri=True)
        self._db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        if not readonly:
            # No journal and no syncs while filling: a store interrupted mid-fill is thrown away and rebuilt,
            # and close() makes a finished store durable in one fsync.
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.executescript(_SCHEMA)

    def check(self, file: int, ordinal: int, digest: bytes | None, sig: bytes | None) -> str | None:
        """The dedup stage that drops this document ("dedup_exact" / "dedup_near"), or None; either way remember it."""
        dropped = None
        if self.exact:
            if self._db.execute("SELECT 1 FROM exact WHERE digest = ?", (digest,)).fetchone():
                dropped = "dedup_exact"
            else:
                self._db.execute("INSERT INTO exact VALUES (?, ?, ?)", (digest, file, ordinal))
        if dropped is None and self.hasher is not None and sig is not None:
            keys = self.hasher.band_keys(sig)
            if any(self._near_hit(band, key, sig) for band, key in enumerate(keys)):
                dropped = "dedup_near"
            else:
                self._db.executemany(
                    "INSERT OR IGNORE INTO band VALUES (?, ?, ?, ?)",
                    [(band, key, file, ordinal) for band, key in enumerate(keys)],
                )
        self._db.execute("INSERT INTO doc VALUES (?, ?, ?, ?, ?)", (file, ordinal, digest, sig, dropped))
        return dropped

    def _near_hit(self, band: int, key: bytes, sig: bytes) -> bool:
        assert self.hasher is not None
        row = self._db.execute(
            "SELECT doc.sig FROM band JOIN doc USING (file, ordinal) WHERE band.band = ? AND band.key = ?", (band, key)
        ).fetchone()
        return row is not None and self.hasher.similar(row[0], sig)

    def kept(self) -> Iterator[tuple[int, int, bytes | None, bytes | None]]:
        """(file, ordinal, digest, signature) of every kept document, in stream order."""
        yield from self._db.execute("SELECT file, ordinal, digest, sig FROM doc WHERE dropped IS NULL ORDER BY 1, 2")

    def commit(self) -> None:
        """End the current transaction (bounds the work a crash loses; durability comes from close)."""
        self._db.commit()

    def close(self) -> None:
        """Commit, close, and fsync the file so a journal that names the store can trust it."""
        self._db.commit()
        self._db.close()
        fsync_path(self.path)
