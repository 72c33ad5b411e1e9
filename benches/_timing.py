"""Timing shared by the benches that compare one call with another on the same rows."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping, Sequence


def interleaved_medians(calls: Mapping[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """The median wall time of `repeat` runs of each call, run round-robin (a, b, a, b, ...) so
    that drift in a shared machine's load falls on every call alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def best_cpu(fn: Callable[[], object], repeat: int) -> float:
    """The least process CPU time of `repeat` runs of `fn` (the figure a busy machine moves least)."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def geometric_mean(ratios: Sequence[float]) -> float:
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))
