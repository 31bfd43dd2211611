"""Per-tenant quotas checked when a job is submitted: running jobs, queued jobs, output pixels per day.

The job store checks and reserves atomically in :meth:`core.jobs.JobStore.create` (a Lua script in Redis, a
lock in the file store) and raises :class:`QuotaExceeded`; the API answers it with a 429. Nothing here imports
more than the standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

PIXEL_WINDOW_SECONDS = 24 * 3600  # output pixels are counted over a sliding window of the last 24 hours
DEFAULT_RETRY_AFTER = 30  # seconds, when no running job of the tenant has an ETA yet

Limit = Literal["running", "queued", "pixels"]

SETTING = {"running": "SLIDESYNTH_QUOTA_RUNNING", "queued": "SLIDESYNTH_QUOTA_QUEUED",
           "pixels": "SLIDESYNTH_QUOTA_PIXELS_PER_DAY"}


@dataclass(frozen=True)
class Quota:
    """One tenant's limits; 0 = unlimited."""

    running: int = 0
    queued: int = 0
    pixels_per_day: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.running or self.queued or self.pixels_per_day)


def parse_limits(value: str) -> tuple[int, dict[str, int]]:
    """``"N"``, ``"N,tenant:M,…"`` or ``"tenant:M,…"`` → (the default for every tenant, overrides by tenant).
    Raises ValueError naming the bad item."""
    default, overrides = 0, {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        tenant, sep, number = item.partition(":")
        if not sep:
            tenant, number = "", item
        number = number.strip()
        if not (number.isascii() and number.isdigit()) or (sep and not tenant.strip()):
            raise ValueError(f"{item!r} is not a number ≥ 0 or a tenant:number pair")
        if sep:
            overrides[tenant.strip()] = int(number)
        else:
            default = int(number)
    return default, overrides


class QuotaExceeded(Exception):
    """A submission over one of the tenant's limits. ``retry_after``: whole seconds until it may succeed, or None
    when it never can (a job larger than the whole daily pixel budget)."""

    def __init__(self, tenant: str, limit: Limit, allowed: int, used: int, retry_after: float | None,
                 requested: int = 0):
        self.tenant, self.limit, self.allowed, self.used, self.requested = tenant, limit, allowed, used, requested
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))
        super().__init__(self.detail)

    @property
    def setting(self) -> str:
        return SETTING[self.limit]

    @property
    def detail(self) -> str:
        t, n = self.tenant, self.allowed
        if self.limit == "running":
            return (f"quota: {n} running jobs for tenant {t} ({self.setting}); {self.used} are running, retry when "
                    f"one has finished")
        if self.limit == "queued":
            return (f"quota: {n} queued jobs for tenant {t} ({self.setting}); {self.used} are queued, retry when "
                    f"one has started or been canceled")
        if self.retry_after is None:
            return (f"quota: {n} output pixels per day for tenant {t} ({self.setting}); this job's "
                    f"{self.requested} pixels are more than the whole budget: it can never be accepted")
        return (f"quota: {n} output pixels per day for tenant {t} ({self.setting}); {self.used} were submitted in "
                f"the last 24 h and this job needs {self.requested}: enough frees in {self.retry_after} s")


def pixel_retry_after(entries: list[tuple[float, int]], used: int, requested: int, allowed: int,
                      now: float) -> float | None:
    """Seconds until ``requested`` pixels fit in the sliding window, given its ``(submitted_at, pixels)`` entries
    (oldest first); None when they never fit."""
    if requested > allowed:
        return None
    need, freed = used + requested - allowed, 0
    for submitted_at, pixels in entries:
        freed += pixels
        if freed >= need:
            return max(0.0, submitted_at + PIXEL_WINDOW_SECONDS - now)
    return float(PIXEL_WINDOW_SECONDS)


def busy_retry_after(etas: list[float | None]) -> float:
    """Seconds to wait after a refusal for running or queued jobs: the soonest ETA of the tenant's running jobs,
    else :data:`DEFAULT_RETRY_AFTER`."""
    known = [eta for eta in etas if eta is not None]
    return min(known) if known else DEFAULT_RETRY_AFTER
