"""Bias audit templates: axes of matched term groups and sentences with one slot, read from a small text format.

    # a comment
    axis gender
    group female: woman, mother, sister
    group male: man, father, brother
    The {} walked into the office and sat down by the window.

Every group of an axis has as many terms (the i-th terms of the groups form a matched set); every sentence of
the axis is read once with each term in its slot `{}`, which may not end the sentence: what follows it is scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from keel.errors import DataError

SHIPPED = Path(__file__).with_name("audit") / "templates.txt"
SLOT = "{}"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Axis:
    """One demographic axis: its term groups, in file order, and its templates."""

    name: str
    line: int
    groups: dict[str, list[str]] = field(default_factory=dict)
    templates: list[str] = field(default_factory=list)


def templates_path(path: str | Path | None) -> Path:
    """The template file to read: `path`, or the one Keel ships when it is empty."""
    return Path(path) if path else SHIPPED


def load_templates(path: str | Path | None = None) -> list[Axis]:
    """Read and check a template file; any problem is one DataError naming the file and line."""
    file = templates_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"audit templates {file}: cannot read it ({e.__class__.__name__}: {e})") from None
    axes: list[Axis] = []

    def fail(line: int, problem: str) -> DataError:
        return DataError(f"{file}:{line}: {problem}; the format is in {SHIPPED.with_name('README.md')}")

    def close(axis: Axis) -> None:
        sizes = {len(terms) for terms in axis.groups.values()}
        if len(axis.groups) < 2:
            raise fail(axis.line, f"axis {axis.name} needs at least two `group NAME: terms` lines")
        if len(sizes) > 1:
            raise fail(axis.line, f"the groups of axis {axis.name} must have as many terms each (matched sets)")
        if len(axis.templates) < 2:
            raise fail(axis.line, f"axis {axis.name} needs at least two template sentences for an interval")

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "axis":
            name = rest.strip()
            if not _NAME.fullmatch(name):
                raise fail(number, f"axis name {name!r} must be letters, digits, '_', '-' or '.'")
            if any(a.name == name for a in axes):
                raise fail(number, f"axis {name} is defined twice")
            if axes:
                close(axes[-1])
            axes.append(Axis(name, number))
        elif not axes:
            raise fail(number, "expected `axis NAME` before groups and templates")
        elif keyword == "group":
            axis = axes[-1]
            name, colon, terms = rest.partition(":")
            name = name.strip()
            words = [t.strip() for t in terms.split(",")]
            if axis.templates:
                raise fail(number, f"groups of axis {axis.name} must come before its templates")
            if not colon or not _NAME.fullmatch(name) or not all(words):
                raise fail(number, "expected `group NAME: term, term, ...` with non-empty terms")
            if name in axis.groups:
                raise fail(number, f"group {name} of axis {axis.name} is defined twice")
            axis.groups[name] = words
        else:
            axis = axes[-1]
            if not axis.groups:
                raise fail(number, f"axis {axis.name} has a template before any `group NAME: terms` line")
            if line.count(SLOT) != 1 or any(brace in line.replace(SLOT, "") for brace in "{}"):
                raise fail(number, f"a template sentence holds exactly one slot {SLOT} and no other braces")
            if not re.search(r"\w", line.split(SLOT)[1]):
                raise fail(number, f"the slot {SLOT} may not end the sentence: the words after it are scored")
            axis.templates.append(line)
    if not axes:
        raise fail(1, "no `axis NAME` in the file")
    close(axes[-1])
    return axes
