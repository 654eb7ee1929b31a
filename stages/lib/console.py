"""stderr as the user reads it: an `error:` line always starts a line of its own.

Progress bars (tqdm, also inside pooch) end their lines with a carriage return, or not at
all when a failure interrupts them; in a log file or CI output an error printed next would
be glued to the bar's end. The CLI wraps stderr once (`track_stderr`) so `error()` knows
whether the cursor stands at the start of a line, and closes open bars first.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class LineTracker:
    """A text stream that remembers whether the last thing written ended a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if text:
            self.at_line_start = text.endswith("\n")
        return written

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, flush, encoding ...
        return getattr(self._stream, name)


def track_stderr() -> None:
    if not isinstance(sys.stderr, LineTracker):
        sys.stderr = LineTracker(sys.stderr)


def close_progress_bars() -> None:
    """Close the bars a failure left open (they would otherwise redraw after the error)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def error(message: str) -> None:
    """Print `error: message` on a line of its own."""
    close_progress_bars()
    stream = sys.stderr  # ours, or a wrapper around it (colorama's passes attributes on)
    if not getattr(stream, "at_line_start", True):
        stream.write("\n")
    stream.write(f"error: {message}\n")
    stream.flush()
