"""Checkpoints: sharded DCP saves made real by an atomic commit record."""
