"""Peak resident memory of a child process.

``ru_maxrss`` from ``wait4`` is no good for a child of a large process: Linux carries the parent's
high-water mark into the child when it forks (the copied address space is resident until exec),
so every child of the benchmark would report at least the benchmark's own size. The kernel's
``VmHWM`` (in /proc/<pid>/status) is the peak of the process's own address space after exec; it
only grows, so reading it every fraction of a second misses nothing but the last moments of the
process's exit.
"""

from __future__ import annotations

import threading
from pathlib import Path


class PeakRss:
    """Follow a child's VmHWM from a background thread: ``with PeakRss(pid) as peak: ...``."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.path = Path(f"/proc/{pid}/status")
        self.interval_s = interval_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _read(self) -> None:
        try:
            for line in self.path.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                    return
        except (OSError, ValueError, IndexError):
            pass  # gone (or a zombie, which has no memory line)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def __enter__(self) -> PeakRss:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak_kb / 2**20
