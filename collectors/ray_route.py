"""The Ray route: batches straight from the env actors by Ray calls, for a trainer whose workers
cannot take the shared-memory hand-off (they run on other nodes, ``shared_memory=False``, or
``/dev/shm`` is too small). The trainer asks each env actor itself and waits on the actors' own
results (one call per batch, the batch fetched from the object store); the driver keeps the
ledger, fed in bulk (:class:`~collectors.settle.BulkSettle`), gives each worker's hang deadline,
and replaces a worker whose batch failed (``direct_failed``), as on the local route.

    >>> route = RayRoute("dqn", driver, version=lambda: 0)  # doctest: +SKIP
    >>> parts, metas = route.collect(random_actions=False)
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayTaskError

from actors.errors import CollectorError, FatalWorkerError, unwrap
from collectors.control import CONTROL_TIMEOUT_S
from collectors.runtime import driver_get
from collectors.settle import BulkSettle


class RayRoute:
    """``collect`` (one batch per worker) and ``collect_any`` (the first ready, async)."""

    def __init__(self, name: str, driver, version):
        self.name = name
        self.driver = driver
        self.ledger = BulkSettle(driver, version)
        self.handles: dict[int, object] = {}  # worker -> its env actor
        self.inflight: dict = {}  # meta ref -> (worker, batch ref, deadline, asked at)
        self.batches = 0  # batches that came this way
        self.taken: int | None = None  # async: the worker whose batch was handed out last
        self.known_ready: list = []  # async: meta refs the last wait found ready, oldest last
        self.serving = True
        self._refresh()

    def _refresh(self) -> None:
        """The driver's current env actors and their deadlines."""
        handles = driver_get(self.driver.worker_handles.remote(True), CONTROL_TIMEOUT_S)
        self.ledger.now()
        self.handles = {i: h for i, h in enumerate(handles) if h is not None}

    def _ask(self, i: int, random_actions: bool) -> None:
        if i not in self.handles:
            return
        now = time.monotonic()
        batch_ref, meta_ref = self.handles[i].collect_pair.remote(random_actions)
        self.inflight[meta_ref] = (i, batch_ref, now + self.ledger.timeouts[i], now)

    def _wait(self, random_actions: bool) -> list:
        """Meta refs ready now, oldest request first; requests past their deadline are
        reported (the driver replaces their workers, which are asked again)."""
        if not self.inflight:
            raise CollectorError(f"no worker of {self.name!r} is left to collect from.")
        refs = list(self.inflight)
        deadline = min(entry[2] for entry in self.inflight.values())
        ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if ready:
            ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] or ready
        now, taken = time.monotonic(), set(ready)
        for ref, (i, _, due, _) in list(self.inflight.items()):  # (also while others deliver)
            if due <= now and ref not in taken:
                del self.inflight[ref]
                self._failed(i, "timeout", "", f"no batch within {self.ledger.timeouts[i]:g}s")
                self._ask(i, random_actions)
        return sorted(ready, key=lambda r: self.inflight[r][3])

    def _take(self, ref, random_actions: bool):
        """``(arrays, meta)`` of a ready request, or ``None`` when it failed (its worker is
        then replaced by the driver and asked again)."""
        i, batch_ref, _, _ = self.inflight.pop(ref)
        try:
            meta = ray.get(ref)
            arrays = ray.get(batch_ref)
        except (RayActorError, ObjectLostError, OwnerDiedError) as exc:
            self._failed(i, "died", "", repr(exc))
        except RayTaskError as exc:
            cause = unwrap(exc)
            kind = "fatal" if isinstance(cause, FatalWorkerError) else "error"
            self._failed(i, kind, type(cause).__name__, str(exc), cause)
        else:
            self.ledger.add(i, meta)
            self.batches += 1
            return arrays, meta
        self._ask(i, random_actions)
        return None

    def collect(self, random_actions: bool):
        """One batch from every worker, in worker order: ``(arrays list, metas list)``."""
        for i in sorted(self.handles):
            self._ask(i, random_actions)
        results = {}
        while self.inflight:
            for ref in self._wait(random_actions):
                i = self.inflight[ref][0]
                got = self._take(ref, random_actions)
                if got is not None:
                    results[i] = got
        if not results:
            raise CollectorError(f"no worker of {self.name!r} is left to collect from.")
        order = sorted(results)
        return [results[i][0] for i in order], [results[i][1] for i in order]

    def collect_any(self, random_actions: bool):
        """The first batch any worker has ready (the oldest request among those ready):
        ``([arrays], [meta])``. Every worker keeps one request in flight; the one served is
        asked again by :meth:`release`, with the random-action flag of the frames counted
        by then."""
        busy = {entry[0] for entry in self.inflight.values()}
        for i in sorted(self.handles):
            if i not in busy:
                self._ask(i, random_actions)
        while True:
            if not self.known_ready:  # (served first: one wait per batch costs O(workers))
                self.known_ready = self._wait(random_actions)[::-1]
                continue
            ref = self.known_ready.pop()
            if ref not in self.inflight:
                continue
            i = self.inflight[ref][0]
            got = self._take(ref, random_actions)
            if got is not None:
                self.taken = i
                return [got[0]], [got[1]]

    def release(self, random_actions: bool) -> None:
        """Async: ask the worker whose batch :meth:`collect_any` gave again."""
        i, self.taken = self.taken, None
        if i is not None and self.serving and all(e[0] != i for e in self.inflight.values()):
            self._ask(i, random_actions)

    def _failed(self, i: int, kind: str, cause: str, message: str, error=None) -> None:
        """The driver counts the batch dropped and replaces worker ``i`` (or raises)."""
        handle = self.handles.get(i)
        self.ledger.flush()  # it hears of the batches before this one first
        driver_get(self.driver.direct_failed.remote(i, handle, kind, cause, message, error))
        self._refresh()

    def stop(self) -> None:
        """Requests in flight count as cancelled; batches go through the driver from here on.
        Idempotent."""
        self.serving = False
        self.known_ready = []
        inflight, self.inflight = self.inflight, {}
        try:
            self.ledger.flush()
            if inflight:
                driver_get(self.driver.cancelled.remote(sorted(e[0] for e in inflight.values())),
                           CONTROL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - closing: a dead driver counts nothing more
            pass
