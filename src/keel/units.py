"""How people read a quantity Keel prints: one spelling of a duration for the console, reports, plans and logs."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """'42 s', '3 min 5 s', '4 h 12 min', '2 d 3 h'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
