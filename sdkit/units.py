"""Byte counts for people: one way to write them, one way to read the process's peak.

No torch here: the CLI, `sdkit plan` and the reports import it freely.
"""

from __future__ import annotations

import sys

MIB = 2**20
GIB = 2**30


def gib(n_bytes: float) -> float:
    """Bytes as GiB, rounded to 2 decimals (for reports and JSON)."""
    return round(n_bytes / GIB, 2)


def format_bytes(n_bytes: float) -> str:
    """'1.50 GiB' from 1 GiB up, '512 MiB' below."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / MIB:.0f} MiB"


def peak_rss_bytes() -> int:
    """The process's peak resident set in bytes (Linux's VmHWM, which writing 5 to
    /proc/self/clear_refs resets; elsewhere getrusage, which never resets)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
