"""A build's progress line on a terminal: records read, the phase and an estimate of time left.

Shown only when stderr is a terminal and the build has run for AFTER seconds;
redrawn in place (CR, then erase to the end of the line) at most every
INTERVAL seconds, and erased when the build ends, so the summary line and any
error stand alone.
"""

from __future__ import annotations

import time
from typing import Literal, TextIO

Phase = Literal["reading", "sorting", "writing"]
AFTER = 2.0  # seconds: shorter builds print nothing
INTERVAL = 0.25  # seconds between redraws


class Progress:
    """What the build is doing now; draws it on STREAM when enabled."""

    def __init__(self, stream: TextIO, *, enabled: bool, source_bytes: int | None) -> None:
        self.phase: Phase = "reading"
        self._stream = stream
        self._enabled = enabled
        self._source_bytes = source_bytes  # None: unknown (stdin, a pipe)
        self._began = self._drawn_at = time.monotonic()
        self._phase_began = self._began
        self._shown = False
        self.records = 0  # read so far
        self._done = 0  # of the phase's work: bytes read or records written
        self._total: int | None = source_bytes

    def start(self, phase: Phase, total: int | None = None) -> None:
        """Enter PHASE, whose work is TOTAL units (bytes for reading, else records)."""
        self.phase, self._total, self._done = phase, total, 0
        self._phase_began = time.monotonic()
        self.draw(force=True)

    def advance(self, done: int, records: int | None = None) -> None:
        """The phase has done DONE units of its work; RECORDS read so far."""
        self._done = done
        if records is not None:
            self.records = records
        self.draw()

    def draw(self, *, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._began < AFTER or (not force and now - self._drawn_at < INTERVAL):
            return
        self._drawn_at = now
        self._stream.write(f"\rtcpmap-build: {self.line(now)}\x1b[K")
        self._stream.flush()
        self._shown = True

    def line(self, now: float) -> str:
        """The text of the progress line, e.g. "writing: 1,200,000 records read, 40%, ETA 3 s"."""
        text = f"{self.phase}: {self.records:,} records read"
        if self._total:
            share = min(self._done / self._total, 1.0)
            text += f", {share:.0%}"
            elapsed = now - self._phase_began
            if share > 0.01 and elapsed > 0.5:
                text += f", ETA {elapsed * (1 - share) / share:.0f} s"
        return text

    def finish(self) -> None:
        """Erase the line, if one was drawn."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
