"""Two sides measured in turns, for the sections that report a ratio: on a shared machine only such pairs compare.

Each turn measures both sides back to back, the first side first in even turns and last in odd ones, so that
neither the order nor a busy moment of the machine favours one side; a ratio is the median of the turns' ratios,
with their spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_turns(measure: Callable[[str, int], T], sides: tuple[str, str], repeats: int) -> dict[str, list[T]]:
    """`measure(side, turn)` for both sides in each of `repeats` turns, alternating which goes first."""
    results: dict[str, list[T]] = {side: [] for side in sides}
    for turn in range(repeats):
        for side in sides if turn % 2 == 0 else sides[::-1]:
            results[side].append(measure(side, turn))
    return results


def ratio_spread(tops: list[float], bottoms: list[float], digits: int = 2) -> dict[str, float]:
    """The median of the turns' ratios top / bottom, with their least and greatest, rounded to `digits`."""
    ratios = [top / bottom for top, bottom in zip(tops, bottoms)]
    return {"ratio": round(statistics.median(ratios), digits), "ratio_min": round(min(ratios), digits),
            "ratio_max": round(max(ratios), digits)}
