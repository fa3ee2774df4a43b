"""The one spelling of a duration that the console, `keel status`, reports, plans and prepare's progress share."""

from __future__ import annotations

import pytest

from keel.units import duration


@pytest.mark.parametrize(
    ("seconds", "spelled"),
    [
        (-3, "0 s"),
        (42.4, "42 s"),
        (59.6, "1 min 0 s"),
        (185, "3 min 5 s"),
        (15_120, "4 h 12 min"),
        (183_600, "2 d 3 h"),
    ],
)
def test_a_duration_reads_in_its_two_largest_units(seconds, spelled):
    assert duration(seconds) == spelled
