"""``BulkSettle``: the metas of batches the trainer took from the env actors itself reach the
driver's ledger in bulk (``settle_many``, every ``SETTLE_EVERY`` batches or ``SETTLE_AFTER_S``,
one call in flight), and before any other call to the driver (:meth:`flush`), so its figures
always include every batch. The driver answers with every worker's timeout for its next batch.
"""
from __future__ import annotations

import time

from collectors.control import CONTROL_TIMEOUT_S
from collectors.runtime import driver_get

SETTLE_EVERY = 64  # batches whose metas go to the driver in one call
SETTLE_AFTER_S = 0.25  # or after this long, whichever comes first


class BulkSettle:
    """``add(worker, meta)`` per batch; ``flush()`` before other driver calls; ``timeouts``
    holds the driver's latest answer (worker -> seconds)."""

    def __init__(self, driver, version):
        self.driver = driver
        self.version = version  # () -> the trainer's newest policy version
        self.unsent: list = []  # [(worker, meta)] not yet sent to the driver
        self.unsent_since = 0.0
        self.settling = None  # the settle_many call in flight
        self.timeouts: list = []

    def now(self) -> list:
        """Every worker's timeout, asked now (after what is unsent)."""
        self.flush()
        self.timeouts = driver_get(self.driver.settle_many.remote([], self.version()), CONTROL_TIMEOUT_S)
        return self.timeouts

    def add(self, i: int, meta: dict) -> None:
        now = time.monotonic()
        self.unsent.append((i, meta))
        if len(self.unsent) == 1:
            self.unsent_since = now
        if len(self.unsent) >= SETTLE_EVERY or now - self.unsent_since >= SETTLE_AFTER_S:
            self._send()

    def _send(self) -> None:
        self._await()
        items, self.unsent = self.unsent, []
        self.settling = self.driver.settle_many.remote(items, self.version())

    def _await(self) -> None:
        if self.settling is not None:
            ref, self.settling = self.settling, None
            self.timeouts = driver_get(ref, CONTROL_TIMEOUT_S)

    def flush(self) -> None:
        """Before any other call to the driver: its figures include every batch so far."""
        if self.unsent:
            self._send()
        self._await()
