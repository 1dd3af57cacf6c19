"""``WorkerPool``: the env actors of one collector: spawn, place, replace, and who is alive.

Replacement is safe against concurrent readers: the slot list is only swapped under a lock,
readers take a snapshot (:meth:`alive`), and a call that hits a handle replaced meanwhile is
told apart from a real failure (:meth:`is_current`). The weights and seed a replacement starts
with are read under the same lock, so an update is never missed by a worker born during it.

How workers are made is injected (``spawn``, ``kill``, ``wait_ready``), so the pool runs
without Ray in tests.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from actors.errors import CollectorError
from actors.coordination.restarts import RestartBudget

log = logging.getLogger("ray_collectors.pool")


class WorkerPool:
    """``count`` slots, each holding the current handle of one env worker.

    ``spawn(index, id_counter=..., restarts=..., weights=..., policy_version=..., seed=...)``
    returns a new handle; ``kill(handle)`` stops one; ``wait_ready(handle, timeout)`` returns
    whether it built its envs in time.
    """

    def __init__(self, name: str, count: int, *, spawn: Callable[..., Any],
                 kill: Callable[[Any], None], wait_ready: Callable[[Any, float], bool],
                 budget: Callable[[], RestartBudget], on_error: str = "restart",
                 startup_timeout_s: float = 60.0, id_margin: int = 0):
        self.name = name
        self.count = count
        self._spawn = spawn
        self._kill = kill
        self._wait_ready = wait_ready
        self.on_error = on_error
        self.startup_timeout_s = startup_timeout_s
        self.id_margin = id_margin  # traj ids a replacement skips (those its predecessor used)
        self._lock = threading.RLock()
        self._handles: list = [None] * count
        self._alive = [False] * count
        self._budgets = [budget() for _ in range(count)]
        self.restarts = [0] * count
        self.id_counters = [0] * count
        self.weights = None  # [ObjectRef] of the newest weights, given to every replacement
        self.version = 0
        self.seed = None  # (seed, static_seed) of the latest set_seed()
        self.on_restart: Callable[[int], None] = lambda i: None

    # -- reading -----------------------------------------------------------------------------
    def handle(self, i: int):
        with self._lock:
            return self._handles[i]

    def alive(self) -> list[tuple[int, Any]]:
        """A snapshot of ``(index, handle)`` for the workers alive now."""
        with self._lock:
            return [(i, h) for i, h in enumerate(self._handles) if self._alive[i]]

    def is_alive(self, i: int) -> bool:
        with self._lock:
            return self._alive[i]

    def is_current(self, i: int, handle) -> bool:
        """Whether ``handle`` is still slot ``i``'s worker (not replaced since)."""
        with self._lock:
            return self._handles[i] is handle and self._alive[i]

    def num_alive(self) -> int:
        with self._lock:
            return sum(self._alive)

    def handles(self) -> list:
        with self._lock:
            return list(self._handles)

    # -- changing ----------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.count):
            with self._lock:
                self._handles[i] = self._spawn_locked(i)
                self._alive[i] = True

    def _spawn_locked(self, i: int):
        return self._spawn(i, id_counter=self.id_counters[i], restarts=self.restarts[i],
                           weights=self.weights, policy_version=self.version, seed=self.seed)

    def set_weights(self, weights, version: int) -> list[tuple[int, Any]]:
        """Record the newest weights (replacements start with them); returns the workers to
        send them to, read under the same lock."""
        with self._lock:
            self.weights, self.version = weights, version
            return self.alive()

    def set_seed(self, seed, static_seed: bool) -> list[tuple[int, Any]]:
        with self._lock:
            self.seed = None if seed is None else (int(seed), bool(static_seed))
            return self.alive()

    def note_id_counter(self, i: int, value: int) -> None:
        with self._lock:
            self.id_counters[i] = max(self.id_counters[i], value)

    def replace(self, i: int, reason: str, error: str = "", handle=None) -> bool:
        """Kill and respawn worker ``i`` (once, if several callers see the same failure).

        Returns False, without doing anything, when ``handle`` was already replaced. Raises
        :class:`CollectorError` past the restart budget, or when no worker is left.
        """
        with self._lock:
            if handle is not None and self._handles[i] is not handle:
                return False
            old = self._handles[i]
            wait = None if self.on_error == "raise" else self._budgets[i].failed()
            if wait is None:
                self._alive[i] = False
                budget = self._budgets[i]
                raise CollectorError(
                    f"worker {i} of {self.name!r} failed ({reason}); failures within "
                    f"{budget.window_s:g}s: {budget.recent()} (max_restarts={budget.max_restarts}, "
                    f"on_worker_error={self.on_error!r}). Last error:\n{error}", worker=i)
            self._alive[i] = False
        if wait:
            time.sleep(wait)
        log.warning("replacing worker %d of %s (%s)", i, self.name, reason)
        self._kill(old)
        with self._lock:
            self.restarts[i] += 1
            self.id_counters[i] += self.id_margin
            new = self._spawn_locked(i)
            self._handles[i] = new
            self._alive[i] = True  # readers from now on reach the new worker (calls queue)
        self.on_restart(i)
        # wait until it has built its envs (with the current weights): if it cannot be placed
        # (a lost node, no room left) the run goes on without it, and says so
        if self._wait_ready(new, self.startup_timeout_s):
            return True
        with self._lock:
            if self._handles[i] is new:
                self._alive[i] = False
        self._kill(new)
        log.warning("worker %d of %s could not be restarted within %.0fs (no room on the "
                    "remaining nodes?); continuing with %d of %d workers", i, self.name,
                    self.startup_timeout_s, self.num_alive(), self.count)
        if not self.num_alive():
            raise CollectorError(f"no worker of {self.name!r} is left: the last one could not "
                                 "be restarted (no room on the remaining nodes?)", worker=i)
        return True

    def mark_dead(self, i: int) -> None:
        with self._lock:
            self._alive[i] = False

    def close(self) -> list:
        """Mark every worker dead; returns the handles to stop."""
        with self._lock:
            self._alive = [False] * self.count
            return [h for h in self._handles if h is not None]
