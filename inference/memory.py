"""Giving memory back to the system after large images.

Decoded pixels are allocated and freed by the megabyte; glibc keeps what it frees in its arenas
for reuse (and raises its mmap threshold after each large free, so later large buffers land in
the arenas too), so a process that once decoded a burst of large images would keep its peak for
good. `malloc_trim` hands the free pages back. It costs milliseconds, so it runs once per
`every_pixels` decoded, and once more when a burst is over (`quiet_s` after the last batch, when
the requests' own buffers are freed too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only: musl and macOS have none, and need none
    except (OSError, AttributeError):
        return None


class MemoryTrimmer:
    def __init__(self, every_pixels: int = 16_000_000, quiet_s: float = 1.0) -> None:
        self._trim = _malloc_trim()
        self._every = every_pixels
        self._quiet_s = quiet_s
        self._since = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def freed(self, pixels: int) -> None:
        """Counts `pixels` decoded and freed; trims once enough have been, and after a burst."""
        if self._trim is None or pixels == 0:
            return
        with self._lock:
            self._since += pixels
            due = self._since >= self._every
            if due:
                self._since = 0
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self._quiet_s, self._trim, (0,))
            self._timer.daemon = True
            self._timer.start()
        if due:
            self._trim(0)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
