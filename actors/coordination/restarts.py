"""``RestartBudget``: how many failures are allowed, and how long to back off before retrying.

Shared by the worker pool (whole env actors) and the rollout (single envs inside one actor).
The window counts working time only: time spent backing off does not age failures out, so a
permanently broken env exhausts the budget after ``max_restarts + 1`` failures whatever the
backoff (each try itself must fail within ``restart_window_s``).

Example:
    >>> budget = RestartBudget(max_restarts=1, window_s=60.0, backoff_s=0.0)
    >>> budget.failed()     # first failure: allowed, no wait
    0.0
    >>> budget.failed() is None   # second within the window: exhausted
    True
"""
from __future__ import annotations

import time

MAX_BACKOFF_S = 30.0


class RestartBudget:
    """``failed()`` records a failure and returns the backoff to wait, or ``None`` when spent."""

    def __init__(self, max_restarts: int, window_s: float, backoff_s: float = 0.0, clock=time.monotonic):
        self.max_restarts = int(max_restarts)
        self.window_s = float(window_s)
        self.backoff_s = float(backoff_s)
        self.clock = clock
        self.failures: list[float] = []  # working-clock times of the failures in the window
        self.backed_off = 0.0  # total backoff handed out: excluded from the window

    def _now(self) -> float:
        return self.clock() - self.backed_off

    def recent(self) -> int:
        """Failures still inside the window."""
        now = self._now()
        self.failures = [t for t in self.failures if now - t < self.window_s]
        return len(self.failures)

    def failed(self) -> float | None:
        count = self.recent()
        if count >= self.max_restarts:
            self.failures.append(self._now())
            return None
        self.failures.append(self._now())
        wait = min(self.backoff_s * 2 ** count, MAX_BACKOFF_S) if self.backoff_s else 0.0
        self.backed_off += wait
        return wait
