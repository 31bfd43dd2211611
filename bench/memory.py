"""Resident-memory readings shared by the benchmarks (Linux ``/proc``)."""
from __future__ import annotations

import os
import resource


def peak_rss_mb() -> float:
    """Peak resident set size of this process image (VmHWM, MB).

    Not ``ru_maxrss``: Linux carries that over from the parent across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # pragma: no cover


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
