"""The direct path: a one-worker sync collector's batches go from its env actor to the trainer
through a Ray compiled graph (shared-memory channels) instead of three actor calls.

Measured per 1000-frame CartPole batch on the 2-core machine: the driver path spends about 5 ms
in Ray (trainer -> driver -> worker, the replies, the fetch), a compiled graph about 1.5 ms.
Reading a graph's result spins a core, so the trainer sleeps through most of the batch first.
The env actor spins too while it waits for the next batch to be asked for (Ray 2.60's channel
read polls), so a graph stays open only while the trainer asks again promptly: once it is away
longer than ``AWAY_SHARE`` of a collect (at least ``AWAY_MIN_S``), training between batches,
the graph is torn down and batches go through the driver, whose worker waits without a core.
The driver still accounts every batch: its ``settle`` is sent and awaited while the next batch
is collected, or before the trainer's next call to the driver. A failed batch (worker died, raised, or hung past the
driver's timeout) is reported to the driver, which counts and replaces the worker exactly as on
its own path; the graph is torn down and that round is collected through the driver. The next
round compiles a graph for the replacement.

    >>> path = DirectPath(driver, handle, timeout_s=600.0)  # doctest: +SKIP
    >>> batch, meta = path.collect(False)  # None after a failure: use the driver this round
"""
from __future__ import annotations

import logging
import time
import warnings
import weakref
from collections import deque

import ray
from ray.exceptions import (GetTimeoutError, RayActorError, RayChannelError,
                            RayChannelTimeoutError, RayTaskError)

from actors.errors import CollectorError, FatalWorkerError, unwrap
from collectors.control import CONTROL_TIMEOUT_S
from collectors.runtime import driver_get

DIRECT_AFTER = 2  # batches through the driver before a graph opens (they bound a hang)
SLEEP_SHARE = 0.95  # of the shortest of the last 5 collects, slept before reading
AWAY_SHARE, AWAY_MIN_S = 0.1, 0.005  # trainer time between batches that closes the graph
REOPENS = 2  # graphs closed for a trainer that was away, before the route stays off
DAG_LOG = "ray.dag.compiled_dag_node"  # logs a traceback per dead actor at teardown


def direct_problem(options, is_async: bool, cls_name: str) -> str | None:
    """Why a collector's batches cannot come through a compiled graph (None: they can)."""
    if is_async or options.num_workers != 1:
        return (f"it takes a sync collector with one worker (got {cls_name} with num_workers="
                f"{options.num_workers})")
    if hasattr(options.replay_buffer, "actor"):
        return "with a RayReplayBuffer batches go from the env actor to the buffer actor"
    if options.preemptive_threshold is not None:
        return "preemptive_threshold needs the driver to watch every batch"
    return None


class DirectRoute:
    """When a collector's batches take a compiled graph: from its batch ``DIRECT_AFTER`` on,
    if the options allow it and the worker runs on this node; a graph is (re)opened to the
    current worker whenever none is open. Raises ``ValueError`` for ``compiled_graph=True`` with
    the worker on another node."""

    def __init__(self, owner, driver, options, worker_info: list, is_async: bool):
        self.name = owner.name
        self.driver = driver
        self.required = options.compiled_graph is True
        self.path: DirectPath | None = None
        self.batches = 0  # batches that came through a graph
        self.done_at: float | None = None  # when the last batch was in (either path)
        self.last_collect = 0.0  # its collect time in the env actor (s)
        self.away: deque = deque(maxlen=DIRECT_AFTER)  # trainer time between the last batches
        self.closed_for_trainer = 0  # graphs closed because the trainer was away
        self.enabled = options.compiled_graph is not False and \
            direct_problem(options, is_async, type(owner).__name__) is None
        if self.enabled:
            here = ray.get_runtime_context().get_node_id()
            there = worker_info[0].get("node_id") if worker_info else None
            if there != here:
                self.enabled = False
                if self.required:
                    raise ValueError(
                        f"{type(owner).__name__}: compiled_graph=True, but the env actor runs "
                        f"on node {there}, not on the trainer's ({here}). Pass "
                        "compiled_graph=None or False.")
        # left to the garbage collector or interpreter exit, the owner's graph is torn down
        # before its driver is killed (finalizers run newest first)
        weakref.finalize(owner, self.close)

    def batch(self, random_actions: bool, iteration: int):
        """``(arrays, meta)`` through the graph, or ``None``: not open yet, not used, or failed
        (the driver has replaced the worker; it collects this round)."""
        if self.done_at is not None:
            self.away.append(time.monotonic() - self.done_at)
        if not self.enabled:
            return None
        if not self.required and self._trainer_away():
            if self.path is not None:  # it spun a core while the trainer worked: close it
                self.closed_for_trainer += 1
                self.enabled = self.closed_for_trainer < REOPENS
                self.path, path = None, self.path
                path.close()
            return None
        if self.path is None and iteration < DIRECT_AFTER:
            return None
        if self.path is None and not self._open():
            return None
        out = self.path.collect(random_actions)
        if out is None:
            self.path = None
        else:
            self.batches += 1
        return out

    def _trainer_away(self) -> bool:
        """Whether the trainer took long between batches: the last time, or (before a graph
        opens) any of the last ``DIRECT_AFTER`` times."""
        limit = max(AWAY_MIN_S, AWAY_SHARE * self.last_collect)
        times = self.away if self.path is None else list(self.away)[-1:]
        return any(t > limit for t in times)

    def collected(self, metas: list) -> None:
        """A batch is in (graph or driver): the trainer's time away starts now."""
        self.done_at = time.monotonic()
        self.last_collect = float(metas[0].get("collect_time", 0.0)) if metas else 0.0

    def _open(self) -> bool:
        handle = driver_get(self.driver.worker_handles.remote(), CONTROL_TIMEOUT_S)[0]
        if handle is None:
            return False
        timeout = driver_get(self.driver.batch_timeout.remote(0), CONTROL_TIMEOUT_S)
        try:
            self.path = DirectPath(self.driver, handle, timeout)
        except Exception as exc:  # noqa: BLE001 - the driver path still works
            if self.required:
                raise CollectorError(f"compiled_graph=True, but Ray could not compile the "
                                     f"graph: {exc!r}") from exc
            warnings.warn(f"{self.name}: no compiled graph ({exc!r}); batches go through the "
                          "driver.", stacklevel=4)
            self.enabled = False
            return False
        return True

    def settled(self) -> None:
        """Before a call to the driver: its figures include every batch of the graph."""
        path = self.path
        if path is not None:
            path.settled()

    def close(self) -> None:
        """No graph from here on (torn down; the driver path remains). Idempotent."""
        self.enabled = False
        path, self.path = self.path, None
        if path is not None:
            path.close()


class DirectPath:
    """Worker 0's batches through a compiled graph ``handle.collect(random_actions)``."""

    def __init__(self, driver, handle, timeout_s: float):
        self.driver = driver
        self.handle = handle
        self.timeout_s = float(timeout_s)  # the driver's hang bound for the next batch
        self.unsent = None  # the last batch's meta, sent to the driver's settle() by settled()
        self.settling = None  # the last settle() call, awaited before the next driver call
        self.recent: deque = deque(maxlen=5)  # the last batches' collect times (s)
        self.dag = None
        from ray.dag import InputNode

        with InputNode() as random_actions:
            graph = handle.collect.bind(random_actions)
        self.dag = graph.experimental_compile()

    def collect(self, random_actions: bool):
        """``(arrays, meta)`` of one batch, or ``None`` once a failure was handed to the driver
        (this object is then closed)."""
        try:  # (a dead worker closes the graph's channels: execute itself may raise)
            ref = self.dag.execute(bool(random_actions))
            wake = time.monotonic() + SLEEP_SHARE * (min(self.recent) if self.recent else 0.0)
            self.settled()  # the previous batch's settle, sent and awaited while this one is collected
            # sleep through most of the batch: ray.get on a graph's result spins a core
            time.sleep(max(0.0, wake - time.monotonic()))
            batch, meta = ray.get(ref, timeout=self.timeout_s)
        except (GetTimeoutError, RayChannelError, RayActorError, RayTaskError) as exc:
            self._failed(exc)
            return None
        self.unsent = meta  # (sending it costs about 0.4 ms: done while the next batch runs)
        self.recent.append(meta["collect_time"])
        return batch, meta

    def settled(self) -> None:
        """Send the last batch's ``settle`` if not yet sent and wait for it (the driver's
        figures then include every batch)."""
        if self.unsent is not None:
            meta, self.unsent = self.unsent, None
            self.settling = self.driver.settle.remote(0, meta)
        if self.settling is not None:
            ref, self.settling = self.settling, None
            self.timeout_s = float(driver_get(ref, CONTROL_TIMEOUT_S))

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, RayTaskError):
            cause = unwrap(exc)
            kind = "fatal" if isinstance(cause, FatalWorkerError) else "error"
            name = type(cause).__name__
        elif isinstance(exc, RayActorError):
            kind, name = "died", ""
        elif isinstance(exc, (GetTimeoutError, RayChannelTimeoutError)):
            kind, name = "timeout", ""
        else:  # a channel closed under us: the worker is gone
            kind, name = "died", ""
        try:  # the driver hears of the batches before this one first (calls keep their order)
            self.settled()
        except Exception:  # noqa: BLE001 - a dead driver: direct_failed below says so
            pass
        try:  # the driver counts and replaces (a hung worker is killed), or raises; unbounded
            # here like collect_sync, as the driver bounds the replacement's start-up itself
            driver_get(self.driver.direct_failed.remote(0, self.handle, kind, name, str(exc)))
        finally:
            self.close()

    def close(self) -> None:
        """Tear the graph down (idempotent); the worker then serves plain calls only."""
        dag, self.dag = self.dag, None
        if dag is None:
            return
        try:
            self.settled()
        except Exception:  # noqa: BLE001 - closing: the driver's answer no longer matters
            pass
        log = logging.getLogger(DAG_LOG)
        level = log.level
        log.setLevel(logging.CRITICAL)  # a dead worker's cancel traceback is expected here
        try:
            dag.teardown()
        except Exception:  # noqa: BLE001 - a dead worker: nothing left to tear down
            pass
        finally:
            log.setLevel(level)
