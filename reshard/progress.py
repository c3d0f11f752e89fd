"""Rank 0's progress display and every rank's counters for ``reshard_report.json``."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from typing import Dict, Optional

log = logging.getLogger("reshard")


def process_start() -> float:
    """When this rank's process started (epoch seconds): the launch of ``launch.nproc`` ranks
    (``RESHARD_LAUNCH_T0``, set by the launcher before it forks), else the process's own start
    time from /proc (interpreter and imports included), else now."""
    t0 = os.environ.get("RESHARD_LAUNCH_T0")
    if t0:
        return float(t0)
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def peak_rss_mb() -> float:
    """Peak resident set of this process so far.

    ``VmHWM`` from /proc is per address space, so it starts afresh at exec; ``ru_maxrss`` (the
    fallback) survives exec on Linux and would report the launcher's peak as the rank's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stats:
    """Bytes moved and seconds per phase, for one rank."""

    def __init__(self):
        self.counters: Dict[str, float] = dict(bytes_read=0, bytes_sent=0, bytes_received=0, bytes_written=0,
                                                  bytes_kernel_copied=0)
        self.seconds: Dict[str, float] = {}
        self.first_byte_s: Optional[float] = None  # from the process's (or launch's) start to its first byte out

    def wrote(self, n: int, kernel_copied: int = 0) -> None:
        if self.first_byte_s is None:
            self.first_byte_s = round(time.time() - process_start(), 3)
        self.counters["bytes_written"] += n
        self.counters["bytes_kernel_copied"] += kernel_copied

    def __getitem__(self, k):
        return self.counters[k]

    def __setitem__(self, k, v):
        self.counters[k] = v

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def as_dict(self) -> dict:
        return {**{k: int(v) for k, v in self.counters.items()},
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}, "first_byte_s": self.first_byte_s,
                "peak_rss_mb": round(peak_rss_mb(), 1)}


class Progress:
    """A bar (bytes, GB/s) on a terminal, plain log lines every few seconds otherwise."""

    def __init__(self, total: int, desc: str, mode: str = "auto", enabled: bool = True, every_s: float = 5.0):
        self.total, self.done, self.t0, self.last = max(total, 1), 0, time.perf_counter(), 0.0
        self.every_s, self.desc = every_s, desc
        self.enabled = enabled and mode != "none"
        self.bar = None
        if self.enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            el = max(now - self.t0, 1e-9)
            log.info("%s: %.2f/%.2f GB (%.0f%%), %.2f GB/s", self.desc, self.done / 1e9, self.total / 1e9,
                     100.0 * self.done / self.total, self.done / el / 1e9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
