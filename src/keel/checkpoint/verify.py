"""`keel checkpoint verify`: check every checkpoint of a run dir against its commit record."""

from __future__ import annotations

from pathlib import Path

from keel.checkpoint.commit import COMMIT_FILE, read_commit, verify_files
from keel.errors import CheckpointError


def _step(path: Path) -> int:
    suffix = path.name.removeprefix("step_")
    return int(suffix) if suffix.isdigit() else -1


def verify_run(run_dir: Path) -> tuple[list[str], bool]:
    """One line per checkpoint directory (ok, CORRUPT, or uncommitted) and whether every committed one is intact."""
    root = Path(run_dir) / "checkpoints"
    dirs = sorted((d for d in root.glob("step_*") if d.is_dir() and _step(d) >= 0), key=_step)
    if not dirs:
        raise CheckpointError(f"{run_dir}: no checkpoints under checkpoints/; is it a Keel run dir that has saved?")
    lines, all_ok = [], True
    for d in dirs:
        if not (d / COMMIT_FILE).exists():
            lines.append(f"{d.name}: uncommitted (an interrupted save; resume ignores it)")
            continue
        try:
            record = read_commit(d)
            verify_files(d, record)
        except CheckpointError as e:
            all_ok = False
            lines.append(f"{d.name}: CORRUPT: {e}")
            continue
        size = sum(f["bytes"] for f in record["files"].values())
        lines.append(f"{d.name}: ok ({len(record['files'])} files, {size:,} bytes, world size {record['world_size']})")
    return lines, all_ok
