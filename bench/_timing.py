"""Shared by the benchmarks: interleaved timing (medians of repeats) and plain-text tables.

Timings on a shared machine are noisy, so every comparison is made within one run: the contenders are timed
in turn, in a rotating order, and each is summarised by its median.
"""

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Timing:
    wall: float  # median wall-clock seconds
    cpu: float  # median CPU seconds of this process (all its threads)


def interleaved_medians(contenders: dict[str, Callable[[], object]], *, repeats: int,
                        warmup: bool = True) -> dict[str, Timing]:
    """Median wall and CPU seconds of each callable, timed round-robin (order rotated every repeat).

    On a shared machine the CPU time of a single-threaded run is the steadier figure: time slices taken by
    other processes count in wall time but not in this process's CPU time.
    """
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            contenders[name]()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
