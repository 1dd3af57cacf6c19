"""The local route: batches and weights between the trainer and env actors on its node go
through shared memory, while Ray stays the control plane.

- Weights: a :class:`~actors.shm.weight_board.WeightBoard` in the collector's private folder. The
  trainer writes a change once; each actor copies it in before its next batch. Used whenever
  every worker runs on this node and the policy is an ``nn.Module``, for every collector.
- Batches (not during ``start()``, no ``RayReplayBuffer`` or ``preemptive_threshold``; async
  with ``prefetch=1``): each actor serves :mod:`actors.shm.handoff` requests. Sync collectors ask
  all workers of a round, then wait on their sockets with the driver's hang deadline; async ones
  keep one request in flight per worker and take whichever batch is ready first (the oldest
  request among those ready), asking that worker again once its batch is copied out.
- The driver keeps the ledger: the batches' metas reach it in bulk (``settle_many``, every
  ``SETTLE_EVERY`` batches or ``SETTLE_AFTER_S``, and before any other call to the driver, so
  its figures always include every batch). A batch that fails (the actor died, raised or missed
  its deadline) is reported to it; it counts the frames dropped and replaces the actor (or
  raises ``CollectorError``), and the trainer asks the replacement in the same round.

    >>> route = LocalRoute(collector, driver, options, worker_info, version=lambda: 0)  # doctest: +SKIP
    >>> parts, metas = route.collect(random_actions=False)  # None: use the driver
"""
from __future__ import annotations

import time
import weakref
from multiprocessing.connection import wait as wait_ready

import numpy as np
import ray
import torch

from actors.errors import CollectorError
from actors.shm.handoff import HandoffClient, WorkerFailed
from actors.shm.folders import private_folder, remove_folder, remove_stale, shareable
from actors.shm.weight_board import WeightBoard
from collectors.control import CONTROL_TIMEOUT_S
from collectors.runtime import driver_get
from collectors.ray_route import RayRoute
from collectors.settle import BulkSettle


def batch_problem(options, is_async: bool, cls_name: str) -> str | None:
    """Why a collector's batches cannot take the local route (None: they can, if local)."""
    if is_async and options.prefetch > 1:
        return f"prefetch={options.prefetch}: the local route keeps one batch in flight per worker"
    if hasattr(options.replay_buffer, "actor"):
        return "with a RayReplayBuffer batches go from the env actors to the buffer actor"
    if options.preemptive_threshold is not None:
        return "preemptive_threshold needs the driver to watch every batch"
    return None


def batch_bytes(spec: dict, frames: int) -> int:
    """About how many bytes one worker batch of ``frames`` takes in its slot (observations
    twice, the policy's outputs, 256 bytes of flags and ids; 4 KiB a frame for a TorchRL env's
    spec, which does not say)."""
    if "obs" not in spec:
        return 4096 * frames
    per_frame = 256
    for part, copies in (("obs", 2), ("outputs", 1)):
        for shape, dtype in spec.get(part, {}).values():
            per_frame += copies * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return per_frame * frames


class LocalRoute:
    """Shared-memory batches and weights for ``owner`` (a collector) when its workers run on
    this node. ``version()`` gives the trainer's newest policy version."""

    def __init__(self, owner, driver, options, worker_info: list, *, is_async: bool, version):
        self.name = owner.name
        self.driver = driver
        self.version = version
        self.folder: str | None = None
        self._lock_fd: int | None = None
        self.board: WeightBoard | None = None
        self.clients: dict[int, tuple] = {}  # worker -> (handle, HandoffClient)
        self.ledger = BulkSettle(driver, version)  # metas to the driver; its hang deadlines
        self.batches = 0  # batches that came through the hand-off
        self.serving = False
        self.inflight: dict[int, float] = {}  # async: worker -> deadline of its request
        self.asked: dict[int, float] = {}  # async: worker -> when it was asked (oldest first)
        self.taken: int | None = None  # async: the worker whose batch the trainer is copying
        # async: workers the last wait found ready, oldest request first, served before waiting
        # again (one wait over all the sockets per batch would cost O(workers) per batch)
        self.known_ready: list[tuple[int, HandoffClient]] = []
        here = ray.get_runtime_context().get_node_id()
        nodes = {info.get("node_id") for info in worker_info}
        problem = None
        if options.shared_memory is False:
            problem = "shared_memory=False"
        elif nodes != {here}:
            problem = f"env actors run on nodes {sorted(map(str, nodes))}, not only on the trainer's ({here})"
        elif not shareable(1 << 20):
            problem = "this machine has no /dev/shm, or is not x86 (the weights' seqlock needs it)"
        batches = problem or batch_problem(options, is_async, type(owner).__name__)
        slots = options.num_workers * batch_bytes(
            owner.spec, -(-owner.requested_frames_per_batch // max(1, options.num_workers)))
        if batches is None and not shareable(slots):
            batches = (f"/dev/shm has room for less than twice the {options.num_workers} env "
                       f"actors' batch slots (about {slots / 2**20:.0f} MiB); give /dev/shm more "
                       "room (e.g. docker run --shm-size) or collect smaller batches")
        if options.shared_memory is True and batches:
            raise ValueError(f"{type(owner).__name__}: shared_memory=True, but {batches}. Pass "
                             "shared_memory=None (use it where possible) or False.")
        self.direct: RayRoute | None = None  # batches by Ray calls to the env actors instead
        if batches is not None and batch_problem(options, is_async, type(owner).__name__) is None:
            self.direct = RayRoute(self.name, driver, version)
        if problem:
            return
        remove_stale()  # folders of trainers that died (their lock is free)
        self.folder, self._lock_fd = private_folder("collector-")
        # left to the garbage collector, the route closes before the driver is killed
        weakref.finalize(owner, self.close)
        policy = owner._reference_policy
        if isinstance(policy, torch.nn.Module) and owner.policy_kind != "random":
            self.board = WeightBoard(self.folder, policy.state_dict(), options.num_workers)
            driver_get(driver.use_board.remote(self.board.spec()), CONTROL_TIMEOUT_S)
        if batches is None:
            self.serving = True
            self._attach(range(options.num_workers))

    # -- weights -----------------------------------------------------------------------------
    def push(self, state: dict, version: int, worker_ids=None) -> bool:
        """Write ``state`` to the board for ``worker_ids`` (all by default); False: no board."""
        if self.board is None:
            return False
        self.board.write(state, version, worker_ids)
        return True

    # -- batches -----------------------------------------------------------------------------
    def _attach(self, indices) -> None:
        """Connect to workers ``indices`` (the driver's current ones); a dead one is reported."""
        handles = driver_get(self.driver.worker_handles.remote(True), CONTROL_TIMEOUT_S)
        self.ledger.now()
        opening = [(i, handles[i], handles[i].open_handoff.remote(self.folder))
                   for i in indices if handles[i] is not None]
        for i, handle, ref in opening:
            try:
                address = ray.get(ref, timeout=CONTROL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - dead or hung: the driver replaces it
                self._report(i, handle, "died", "", repr(exc))
                self._attach([i])  # (bounded: the driver raises once its restarts run out)
                continue
            handle.serve.remote()
            self.clients[i] = (handle, HandoffClient(self.folder, address))

    def collect(self, random_actions: bool):
        """One batch from every worker, in worker order: ``(arrays list, metas list)``, or
        ``None`` when batches do not take this route. The arrays are views of the workers'
        slots: copy them before the next call. Workers this route cannot serve: the Ray route's."""
        if not self.serving:
            return self.direct.collect(random_actions) if self._direct_serving() else None
        pending: dict = {}  # worker -> deadline
        for i in sorted(self.clients):
            self._ask(i, random_actions, pending)
        results = {}
        while pending:
            now = time.monotonic()
            conns = {self.clients[i][1].conn: i for i in pending}
            ready = wait_ready(list(conns), timeout=max(0.0, min(pending.values()) - now))
            if not ready:
                for i, deadline in list(pending.items()):
                    if deadline <= time.monotonic():
                        del pending[i]
                        self._failed(i, "timeout", "", f"no batch within {self.ledger.timeouts[i]:g}s")
                        self._ask(i, random_actions, pending)
                continue
            for conn in ready:
                i = conns[conn]
                del pending[i]
                try:
                    results[i] = self.clients[i][1].receive()
                except WorkerFailed as exc:
                    self._failed(i, exc.kind, type(exc.cause).__name__ if exc.cause else "",
                                 exc.text, exc.cause)
                    self._ask(i, random_actions, pending)
                except (EOFError, OSError) as exc:
                    self._failed(i, "died", "", repr(exc))
                    self._ask(i, random_actions, pending)
        if not results:
            raise CollectorError(f"no worker of {self.name!r} is left to collect from.")
        order = sorted(results)
        metas = [results[i][1] for i in order]
        for i, meta in zip(order, metas):
            self.ledger.add(i, meta)
        self.batches += 1
        return [results[i][0] for i in order], metas

    def collect_any(self, random_actions: bool):
        """Async: the first batch any worker has ready, ``([arrays], [meta])`` (views of its
        slot), or ``None`` when batches do not take this route. Every worker keeps one request
        in flight; the one served is asked again by :meth:`release`, once the trainer copied
        its batch out."""
        if not self.serving:
            return self.direct.collect_any(random_actions) if self._direct_serving() else None
        for i in sorted(self.clients):
            if i not in self.inflight:
                self._ask(i, random_actions, self.inflight)
                self.asked[i] = time.monotonic()
        while True:
            if not self.inflight:
                raise CollectorError(f"no worker of {self.name!r} is left to collect from.")
            if not self.known_ready:
                self._wait_any(random_actions)
                continue
            i, client = self.known_ready.pop()
            if i not in self.inflight or self.clients.get(i, (None, None))[1] is not client:
                continue  # (replaced since that wait: its new client may have no reply yet)
            del self.inflight[i]
            try:
                arrays, meta = self.clients[i][1].receive()
            except WorkerFailed as exc:
                self._failed(i, exc.kind, type(exc.cause).__name__ if exc.cause else "",
                             exc.text, exc.cause)
                self._ask_async(i, random_actions)
                continue
            except (EOFError, OSError) as exc:
                self._failed(i, "died", "", repr(exc))
                self._ask_async(i, random_actions)
                continue
            self.taken = i
            self.ledger.add(i, meta)
            self.batches += 1
            return [arrays], [meta]

    def _wait_any(self, random_actions: bool) -> None:
        """Wait until some requests in flight have replies (``known_ready``, the oldest request
        last) or their deadlines pass (those workers are reported and asked again)."""
        conns = {self.clients[i][1].conn: i for i in self.inflight}
        now = time.monotonic()
        ready = {conns[c] for c in
                 wait_ready(list(conns), timeout=max(0.0, min(self.inflight.values()) - now))}
        now = time.monotonic()  # (checked even while others deliver: a hung one is noticed)
        for i, deadline in list(self.inflight.items()):
            if deadline <= now and i not in ready:
                del self.inflight[i]
                self._failed(i, "timeout", "", f"no batch within {self.ledger.timeouts[i]:g}s")
                self._ask_async(i, random_actions)
        order = sorted(ready, key=lambda j: -self.asked.get(j, 0.0))
        self.known_ready = [(i, self.clients[i][1]) for i in order]

    def _direct_serving(self) -> bool:
        return self.direct is not None and self.direct.serving

    def release(self, random_actions: bool) -> None:
        """Async: the trainer copied the batch :meth:`collect_any` gave; its worker may now
        write the next one into its slot."""
        if self._direct_serving():
            self.direct.release(random_actions)
        i, self.taken = self.taken, None
        if i is not None and self.serving and i in self.clients and i not in self.inflight:
            self._ask_async(i, random_actions)

    def _ask_async(self, i: int, random_actions: bool) -> None:
        self._ask(i, random_actions, self.inflight)
        self.asked[i] = time.monotonic()

    def _ask(self, i: int, random_actions: bool, pending: dict) -> None:
        """Send worker ``i`` a request (replacing it first while it is gone); no-op for a worker
        the driver could not replace."""
        for _ in range(100):  # each failure uses up the driver's restart budget, which raises
            if i not in self.clients:
                return
            try:
                self.clients[i][1].request(random_actions)
            except OSError as exc:
                self._failed(i, "died", "", repr(exc))
                continue
            pending[i] = time.monotonic() + self.ledger.timeouts[i]
            return
        raise CollectorError(f"worker {i} of {self.name!r} could not be asked for a batch.", worker=i)

    def _failed(self, i: int, kind: str, cause: str, message: str, error=None) -> None:
        handle, client = self.clients.pop(i)
        client.close(stop=False)
        self._report(i, handle, kind, cause, message, error)
        self._attach([i])

    def _report(self, i: int, handle, kind: str, cause: str, message: str, error=None) -> None:
        """The driver counts the batch dropped and replaces worker ``i`` (or raises)."""
        try:  # it hears of the batches before this one first
            self.settled()
        except Exception:  # noqa: BLE001 - a dead driver: direct_failed below says so
            pass
        driver_get(self.driver.direct_failed.remote(i, handle, kind, cause, message, error))

    def settled(self) -> None:
        """Before any other call to the driver: its figures include every batch so far."""
        self.ledger.flush()
        if self.direct is not None:
            self.direct.ledger.flush()

    # -- lifecycle ---------------------------------------------------------------------------
    def stop_serving(self) -> None:
        """Batches go through the driver from here on (the board stays); idempotent. Requests
        still in flight (async) are counted dropped, as the driver counts its own."""
        self.serving = False
        self.known_ready = []
        if self.direct is not None:
            self.direct.stop()
        if self.inflight:
            cancelled, self.inflight = sorted(self.inflight), {}
            try:
                self.settled()
                driver_get(self.driver.cancelled.remote(cancelled), CONTROL_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - closing: a dead driver counts nothing more
                pass
        clients, self.clients = self.clients, {}
        for _, client in clients.values():
            client.close()
        try:
            self.settled()
        except Exception:  # noqa: BLE001 - closing: the driver's answer no longer matters
            pass

    def close(self) -> None:
        """Stop serving and remove the folder (board, sockets, slots); idempotent."""
        self.stop_serving()
        remove_folder(self.folder, self._lock_fd)
        self.folder, self._lock_fd = None, None
