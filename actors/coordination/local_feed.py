"""Background collection into a replay-buffer actor on the driver's node, with no Ray call per
batch: env actors leave batches in their shared-memory slots (:mod:`actors.shm.handoff`), the
driver names them to the buffer's intake in groups (:mod:`actors.storage.intake`), and asks each
env actor again once the buffer acknowledged its batch. The driver handles names and metas only.

Used by :class:`~actors.coordination.background_writer.BackgroundWriter` when every env actor and
the buffer run on the driver's node, ``/dev/shm`` is usable and the buffer keeps no checkpoints
(a checkpointing buffer may restart from its last checkpoint; the writer then resends the batches
written since, which it keeps in the object store: that path stays). Everything else is as in the
writer: one batch id per batch (the buffer stores an id once), the ledger (produced = delivered +
dropped), hang deadlines and replacements, fencing at ``stop()``, the rate limiter, and
``write_timeout_s`` for a buffer that does not come back.
"""
from __future__ import annotations

import logging
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from actors.errors import CollectorError, ReplayBufferUnavailable
from actors.shm.folders import private_folder, remove_folder, remove_stale, shareable
from actors.shm.handoff import CONNECT_TIMEOUT_S, HandoffClient, WorkerFailed

log = logging.getLogger("ray_collectors.feed")

CONTROL_TIMEOUT_S = 30.0
POLL_S = 0.1  # how often a waiting feed looks at stop() and pause()
DEPTH = 2  # requests in flight per env actor: it collects the next batch while one is written


def feed_problem(options, worker_info: list, buffer_infos: list, here: str) -> str | None:
    """Why background collection into this buffer (its shards' ``info()``) cannot take the
    local feed (None: it can)."""
    if options.shared_memory is False:
        return "shared_memory=False"
    if any(info.get("checkpoint_dir") for info in buffer_infos):
        return "the buffer keeps checkpoints: batches stay resendable through the object store"
    nodes = {info.get("node_id") for info in worker_info} | {i.get("node_id") for i in buffer_infos}
    if nodes != {here}:
        return "the env actors or the buffer run on another node than the driver"
    if not shareable(1 << 20):
        return "this machine has no usable /dev/shm"
    return None


class LocalFeed:
    """One ``start()``'s feed; ``run()`` until the writer stops, reaches its total, or fails."""

    def __init__(self, writer, collection, routes, epoch: str, write_timeout_s: float):
        self.writer, self.collection, self.pool = writer, collection, collection.pool
        self.ledger = collection.ledger
        self.routes, self.epoch, self.write_timeout_s = routes, epoch, write_timeout_s
        self.clients: dict[int, tuple] = {}  # worker -> (handle, HandoffClient)
        # worker -> deadlines of its requests, oldest first (DEPTH at most: one per slot); the
        # oldest runs now, the next waits in the socket and starts as soon as it is done
        self.inflight: dict[int, list] = {}
        self.ready: list = []  # [(worker, meta, where)]: received, not yet written, in order
        self.intakes: dict[int, Connection] = {}  # shard -> its buffer actor's intake
        remove_stale()
        self.folder, self._lock_fd = private_folder("feed-")

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        w = self.writer
        try:
            for shard in self.routes.alive():
                try:
                    self._connect_intake(shard, time.monotonic() + self.write_timeout_s)
                except ActorDiedError:  # (others are left): its batches go to them
                    self.routes.mark_dead(shard)
            for i, _ in self.pool.alive():
                self._attach(i)
            while not w.stop_event.is_set():
                if w.total > 0 and w.frames >= w.total:
                    break
                paused = w.paused.is_set()
                self._receive(block=paused)  # (paused: replies are taken, none is written)
                if not self.ready or paused:
                    continue
                with w.write_lock:
                    if not w.paused.is_set():
                        self._write_ready()
        finally:
            self.close()

    def _receive(self, block: bool = False) -> None:
        """Take every reply that is there, waiting up to ``POLL_S`` when none is ready yet (or
        ``block``); replace workers that failed or missed their deadline."""
        asked = {i: pending for i, pending in self.inflight.items() if pending}
        if not asked and not self.ready:
            raise CollectorError(f"no worker of {self.pool.name!r} is left to collect from.")
        conns = {self.clients[i][1].conn: i for i in asked}
        now = time.monotonic()
        wait = min([POLL_S] + [d[0] - now for d in asked.values()])
        if self.ready and not block:
            wait = 0.0
        if not conns:  # (all replied, paused: nothing to wait on but time)
            time.sleep(max(0.0, wait))
            return
        for conn in wait_ready(list(conns), timeout=max(0.0, wait)):
            i = conns[conn]
            pending = self.inflight[i]
            pending.pop(0)
            try:
                meta, where = self.clients[i][1].receive_where()
            except WorkerFailed as exc:
                self._failed(i, exc.kind, type(exc.cause).__name__ if exc.cause else "",
                             exc.text, exc.cause)
                continue
            except (EOFError, OSError) as exc:
                self._failed(i, "died", "", repr(exc))
                continue
            if pending:  # the next request starts now
                pending[0] = time.monotonic() + self.collection.timeout(i)
            self.collection.settle(i, meta)  # delivered; undelivered if it never lands
            self.ready.append((i, meta, where))
        now = time.monotonic()
        for i, pending in list(self.inflight.items()):
            if pending and pending[0] <= now:
                pending.pop(0)
                self._failed(i, "timeout", "", "")

    def _write_ready(self) -> None:
        """Name every received batch to its shard's intake, one message per shard; ask their
        workers again."""
        w = self.writer
        take, planned = 0, w.frames
        for _, meta, _ in self.ready:  # up to total_frames, as the writer stops there
            if w.total > 0 and planned >= w.total:
                break
            take += 1
            planned += meta["frames"]
        taken, self.ready = self.ready[:take], self.ready[take:]
        shards: dict[int, list] = {}
        for item in taken:
            shards.setdefault(self.routes.route(item[1]), []).append(item)
        sent = {shard: self._post(shard, group) for shard, group in shards.items()}
        for shard, group in shards.items():  # (every shard writes while the acks are read)
            try:
                self._write_group(shard, group, sent[shard])
            except ActorDiedError:  # a shard gone for good: its batches go to the others
                if not self.routes.mark_dead(shard):
                    raise ReplayBufferUnavailable("replay buffer unavailable: every shard is gone.") from None
                log.warning("replay buffer shard %d is gone; writing to the others", shard)
                self.ready = group + self.ready

    def _items(self, group: list) -> list:
        return [(self.writer.batch_id(meta), where) for _, meta, where in group]

    def _post(self, shard: int, group: list) -> bool:
        """Send ``group`` to a connected shard without waiting for its answer (``False``:
        not sent; :meth:`_send` connects and sends it)."""
        intake = self.intakes.get(shard)
        if intake is None:
            return False
        try:
            intake.send((self.epoch, self._items(group)))
            return True
        except OSError:
            self._close_intake(shard)
            return False

    def _write_group(self, shard: int, group: list, sent: bool = False) -> None:
        w = self.writer
        items = self._items(group)
        ids = [bid for bid, _ in items]
        acks = self._send(shard, items, sent)
        held = [item for item, ack in zip(group, acks) if ack.get("rate_wait")]
        if held:  # sent again on the next round, in their order
            w.rate_waits += 1
            self.ready = held + self.ready
        for (i, meta, _), bid, ack in zip(group, ids, acks):
            if ack.get("rate_wait"):
                continue
            if "error" in ack:
                raise RuntimeError(f"the replay buffer could not write batch {bid}: "
                                   f"{ack['error']}\n{ack.get('traceback', '')}")
            if ack.get("fenced"):
                if meta["frames"]:
                    self.ledger.undeliver(meta, "stopped")
            else:
                w.written_ids.append(bid)
                w.written_batches += 1
                w.frames += meta["frames"]
                w.feed_batches += 1
            self._ask(i)

    def _send(self, shard: int, items: list, sent: bool = False) -> list:
        """The shard's acknowledgements of ``items`` (``sent``: already sent by :meth:`_post`);
        a buffer that restarts is reconnected to and sent the same items again (the slots
        still hold them; ids stop duplicates)."""
        deadline = time.monotonic() + self.write_timeout_s
        while True:
            try:
                if shard not in self.intakes:
                    self._connect_intake(shard, deadline)
                intake = self.intakes[shard]
                if not sent:
                    intake.send((self.epoch, items))
                sent = False  # (a retry sends again)
                # (a buffer held by its rate limiter answers within about a second)
                if intake.poll(max(0.1, deadline - time.monotonic()) + 2.0):
                    return intake.recv()
                raise ReplayBufferUnavailable(
                    f"replay buffer unavailable: no acknowledgement of {len(items)} batches within "
                    f"write_timeout_s={self.write_timeout_s:g}.")
            except (EOFError, OSError):
                self._close_intake(shard)
                self.writer.resends += 1
                self._retry_until(deadline, "it went away and did not come back")

    def _connect_intake(self, shard: int, deadline: float) -> None:
        """Open ``shard``'s intake; raises ``ActorDiedError`` for a shard gone for good when
        other shards are left."""
        while True:
            try:
                address = ray.get(self.routes.targets[shard].open_intake.remote(self.folder),
                                  timeout=max(0.1, deadline - time.monotonic()))
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(address)
                sock.settimeout(None)
                self.intakes[shard] = Connection(sock.detach())
                return
            except (RayActorError, GetTimeoutError, OSError) as exc:
                if isinstance(exc, ActorDiedError) and len(self.routes.alive()) > 1:
                    raise
                self._retry_until(deadline, f"its intake did not open ({exc!r})")

    def _retry_until(self, deadline: float, what: str) -> None:
        """Wait a little before trying again; past ``deadline``, ``ReplayBufferUnavailable``."""
        if time.monotonic() >= deadline:
            raise ReplayBufferUnavailable(f"replay buffer unavailable: {what}, within "
                                          f"write_timeout_s={self.write_timeout_s:g}.") from None
        time.sleep(0.2)

    # -- workers -----------------------------------------------------------------------------
    def _attach(self, i: int) -> None:
        """Connect to worker ``i`` (the pool's current one) and ask it for a batch; a worker
        that cannot be reached is replaced (bounded: the pool raises once its budget is spent)."""
        while self.pool.is_alive(i):
            handle = self.pool.handle(i)
            try:
                address = ray.get(handle.open_handoff.remote(self.folder, DEPTH),
                                  timeout=CONTROL_TIMEOUT_S)
                handle.serve.remote()
                client = HandoffClient(self.folder, address)
            except Exception as exc:  # noqa: BLE001 - dead or hung: replaced, then tried again
                self.collection.failed(i, handle, "died", "", repr(exc))
                continue
            self.clients[i] = (handle, client)
            self.inflight[i] = []
            for _ in range(DEPTH):
                self._ask(i)
            return

    def _ask(self, i: int) -> None:
        if i not in self.clients:
            return
        try:
            self.clients[i][1].request(self.writer.frames < self.writer.random_frames)
        except OSError as exc:
            self._failed(i, "died", "", repr(exc))
            return
        pending = self.inflight[i]
        pending.append(time.monotonic() + self.collection.timeout(i) if not pending
                       else float("inf"))  # (queued: its deadline starts with it)

    def _failed(self, i: int, kind: str, cause: str, message: str, error=None) -> None:
        """Count worker ``i``'s batch dropped (and its queued requests), replace the worker (or
        raise), attach the new one. Batches it delivered before stay ready: their slot files
        outlive it (see ``HandoffServer.serve``)."""
        handle, client = self.clients.pop(i)
        client.close(stop=False)
        for _ in self.inflight.pop(i, []):
            self.ledger.drop(i, "worker_died", self.collection.worker_frames[i])
        self.collection.failed(i, handle, kind, cause, message, error)
        self._attach(i)

    # -- end ---------------------------------------------------------------------------------
    def _close_intake(self, shard: int) -> None:
        intake = self.intakes.pop(shard, None)
        if intake is not None:
            intake.close()

    def close(self) -> None:
        """Requests in flight count as cancelled, received batches not written as stopped; the
        workers go back to plain calls; the folder goes. Idempotent."""
        for i, pending in self.inflight.items():
            for _ in pending:
                self.ledger.drop(i, "cancelled", self.collection.worker_frames[i])
        self.inflight = {}
        for _, meta, _ in self.ready:
            if meta["frames"]:
                self.ledger.undeliver(meta, "stopped")
        self.ready = []
        clients, self.clients = self.clients, {}
        for _, client in clients.values():
            client.close()
        for shard in list(self.intakes):
            self._close_intake(shard)
        remove_folder(self.folder, self._lock_fd)
        self.folder, self._lock_fd = None, None
