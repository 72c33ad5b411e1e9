"""The progress line of ``chatmask tokenize``."""

from __future__ import annotations

import sys
import time

from ..io.readers import ReadProgress


class Progress:
    """A one-line display on stderr (TTY only, ~5 updates/s); silent otherwise."""

    def __init__(self, enabled: bool, counter: ReadProgress) -> None:
        self.enabled = enabled
        self.counter = counter
        self.started = time.perf_counter()
        self.last = 0.0
        self.width = 0

    def update(self, rows: int, tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        fraction = self.counter.fraction()
        eta = ""
        if 0 < fraction < 1:
            eta = f", ETA {_duration(elapsed * (1 - fraction) / fraction)} ({fraction:.0%})"
        line = f"chatmask: {rows:,} rows, {rows / elapsed:,.0f} rows/s, {tokens / elapsed:,.0f} tokens/s{eta}"
        sys.stderr.write("\r" + line + "\033[K")
        sys.stderr.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
