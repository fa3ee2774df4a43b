"""Turn a failed checkpoint write into one clear line: disk full is named as such, and what is kept."""

from __future__ import annotations

import errno
from pathlib import Path

from keel.errors import CheckpointError

_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large for the file-size limit",
    errno.EDQUOT: "disk quota exceeded",
}


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and the per-rank failures DCP wraps (it raises their summary)."""
    seen, stack, found = set(), [exc], []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        stack += [e.__cause__, e.__context__]
        for wrapped in getattr(e, "failures", {}).values():
            stack.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
    return found


def save_failed(exc: BaseException, path: Path, step: int, previous: Path | None) -> CheckpointError:
    """The CheckpointError for a save of `step` into `path` that raised `exc`."""
    kept = f"the previous checkpoint {previous.name} is kept" if previous else "no earlier checkpoint exists"
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in _FULL:
            return CheckpointError(
                f"{path}: cannot save step {step}: {_FULL[e.errno]}; {kept}; free space under {path.parent} "
                "or lower checkpoint.keep"
            )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CheckpointError(f"{path}: saving step {step} failed ({type(exc).__name__}: {first}); {kept}")
