"""Which committed checkpoints to delete: keep the last K, every M-th step, and always the newest."""

from __future__ import annotations


def steps_to_delete(committed: list[int], keep: int, keep_every: int = 0) -> list[int]:
    """Committed steps (oldest first) that retention removes; the newest is never among them."""
    if not committed:
        return []
    kept = set(sorted(committed)[-max(keep, 1) :])
    if keep_every:
        kept |= {s for s in committed if s % keep_every == 0}
    return [s for s in sorted(committed) if s not in kept]
