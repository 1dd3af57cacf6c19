"""``BackgroundWriter``: collect on a thread of the driver and write each batch into the
replay-buffer actor, resending (with the batch's id) until the buffer acknowledges it.

Batch ids are unique per collector instance (the collector's name plus a random instance id),
and the buffer stores an id once, so a resend stores nothing twice. The writer keeps the
batches the buffer acknowledged but has not yet put in a checkpoint (their object refs); when
the buffer comes back from a restart (a new incarnation in its acknowledgement) they are sent
again, so a restart loses nothing whatever ``checkpoint_every`` is.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from actors.coordination.collection import Collection, Ledger
from actors.coordination.shard_routes import ShardRoutes
from actors.errors import ReplayBufferUnavailable

log = logging.getLogger("ray_collectors.writer")

WRITTEN_IDS_KEPT = 50_000
RATE_WAIT_S = 5.0  # a write held by the buffer's rate limiter is retried after this
GROUP_MAX = 64  # batches already there written in one call per shard


class BackgroundWriter:
    """``start(buffer, total)``, ``pause()``, ``stop()``; and ``write`` for one batch."""

    def __init__(self, name: str, collection: Collection, ledger: Ledger, write_timeout_s: float):
        self.name = name
        self.collection = collection
        self.ledger = ledger
        self.write_timeout_s = write_timeout_s
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.paused = threading.Event()
        self.write_lock = threading.Lock()
        self.error: BaseException | None = None
        self.frames = 0
        self.total = -1
        self.random_frames = 0  # init_random_frames still to come when start() was called
        self.written_ids: deque = deque(maxlen=WRITTEN_IDS_KEPT)  # acknowledged, oldest first
        self.written_batches = 0
        self.resends = 0
        self.instance = uuid.uuid4().hex[:12]  # two collectors of one name never share ids
        self.incarnation: dict = {}  # shard -> its actor's incarnation, from its last acknowledgement
        self.undurable: dict = {}  # shard -> deque of (batch_id, refs, meta) not yet in a checkpoint
        self.restart_resends = 0  # batches sent again after a buffer restart
        self.rate_waits = 0  # sends the buffer's rate limiter held back (retried)
        self.write_calls = 0  # Ray calls that wrote batches through the object store
        self.epoch: str | None = None  # of the current start(): the buffer fences it at stop()
        self.buffer = None  # the ShardRoutes of the current start()
        self._routes: dict = {}  # tuple of shard handles -> their ShardRoutes
        self.feed_batches = 0  # batches written through the local feed (shared memory)
        # (buffer, epoch) -> a LocalFeed, or None when batches go through the object store
        self.feed_factory = None

    def batch_id(self, meta: dict) -> tuple:
        """Unique per collector instance: (name, instance, worker, restarts, batch index)."""
        return (self.name, self.instance, meta["worker"], meta["restarts"], meta["batch_index"])

    def routes(self, buffer) -> ShardRoutes:
        """The routes into ``buffer``: a buffer actor, or a list of shard actors (their nodes
        are asked once)."""
        targets = tuple(buffer) if isinstance(buffer, (list, tuple)) else (buffer,)
        if targets not in self._routes:
            nodes = [None]
            if len(targets) > 1:
                infos = ray.get([t.info.remote() for t in targets], timeout=self.write_timeout_s)
                nodes = [info.get("node_id") for info in infos]
            self._routes[targets] = ShardRoutes(list(targets), nodes, self.name)
        return self._routes[targets]

    def write(self, buffer, items: list, epoch: str | None = None) -> None:
        """Write batches ``[(refs, meta)]`` into the buffer actor (or the shards
        :class:`ShardRoutes` picks), one call per shard for all of them, sending again until
        each is acknowledged; raises :class:`ReplayBufferUnavailable` after ``write_timeout_s``
        without an answer. A buffer that answers but holds writers back (``samples_per_insert``)
        is waited for, as long as it takes, until :meth:`stop`."""
        routes = self.routes(buffer)
        pending = [(self.batch_id(meta), refs, meta) for refs, meta in items]
        while pending:
            shards: dict[int, list] = {}
            for item in pending:
                shards.setdefault(routes.route(item[2]), []).append(item)
            pending = []
            for shard, group in shards.items():
                target = routes.targets[shard]
                try:
                    acks = self._send(target, group, epoch, reroute=len(routes.targets) > 1)
                except ActorDiedError:  # a shard gone for good: its node's batches go elsewhere
                    if not routes.mark_dead(shard):
                        raise ReplayBufferUnavailable(
                            "replay buffer unavailable: every shard is gone.") from None
                    log.warning("replay buffer shard %d is gone; writing to the others", shard)
                    self.undurable.pop(shard, None)
                    pending += group
                    continue
                for (batch_id, refs, meta), ack in zip(group, acks):
                    self._acknowledged(shard, target, batch_id, refs, meta, ack)

    def _acknowledged(self, shard: int, target, batch_id, refs, meta: dict, ack: dict) -> None:
        if ack.get("lost") or ack.get("fenced") or ack.get("stopped"):
            if meta["frames"]:  # its data died with its worker, or the collection was stopped
                self.ledger.undeliver(meta, "lost_before_write" if ack.get("lost") else "stopped")
            return
        if shard in self.incarnation and ack["incarnation"] != self.incarnation[shard]:
            self._resend_undurable(target, shard)  # the shard restarted from its checkpoint
        self.incarnation[shard] = ack["incarnation"]
        self.written_ids.append(batch_id)
        self.written_batches += 1
        undurable = self.undurable.setdefault(shard, deque())
        undurable.append((batch_id, refs, meta))
        while len(undurable) > ack["undurable"]:
            undurable.popleft()

    def _resend_undurable(self, buffer, shard: int) -> None:
        """Send again what the restarted buffer may have lost; ids it holds are skipped."""
        undurable = list(self.undurable.get(shard, ()))
        self.restart_resends += len(undurable)
        acks = self._send(buffer, undurable) if undurable else []
        for (batch_id, _, _), ack in zip(undurable, acks):
            if ack.get("lost"):  # its data died with its worker: counted dropped, not written
                try:
                    self.written_ids.remove(batch_id)
                    self.written_batches -= 1
                except ValueError:
                    pass
        log.warning("replay buffer restarted: %d batches written since its last checkpoint were "
                    "sent again", len(undurable))

    def _send(self, buffer, group: list, epoch=None, reroute: bool = False) -> list[dict]:
        """The acknowledgements of ``group`` (``[(batch_id, refs, meta)]``), one per batch:
        ``{"lost": True}`` when its data died with its worker, ``{"fenced"/"stopped": True}``
        when collection was stopped before the buffer took it. ``reroute``: a buffer that died
        for good raises ``ActorDiedError`` (another shard takes the batches)."""
        deadline = time.monotonic() + self.write_timeout_s
        acks: list = [None] * len(group)
        todo = list(range(len(group)))
        while todo:
            call = buffer.extend_refs.remote([(group[k][0], group[k][1]) for k in todo], epoch)
            self.write_calls += 1
            try:
                got = ray.get(call, timeout=max(0.1, deadline - time.monotonic()) + RATE_WAIT_S)
            except (RayActorError, GetTimeoutError) as exc:
                if reroute and isinstance(exc, ActorDiedError):
                    raise
                if time.monotonic() >= deadline:
                    raise ReplayBufferUnavailable(
                        f"replay buffer unavailable: no acknowledgement of {len(todo)} batches "
                        f"within write_timeout_s={self.write_timeout_s:g} ({exc!r}).") from None
                self.resends += 1
                time.sleep(0.2)
                continue
            held = [k for k, ack in zip(todo, got) if ack.get("rate_wait")]
            for k, ack in zip(todo, got):
                acks[k] = ack
            if held:  # alive, but its rate limiter holds them: sent again until stop()
                if self.stop_event.is_set():
                    for k in held:
                        acks[k] = {"stopped": True}
                    break
                self.rate_waits += 1
                deadline = time.monotonic() + self.write_timeout_s
            todo = held
        return acks

    def start(self, buffer, total_frames: int = -1, random_frames: int = 0) -> bool:
        """Collect into ``buffer`` until ``total_frames`` (-1: until stopped); batches asked for
        while fewer than ``random_frames`` are written take random actions."""
        if self.thread is not None and self.thread.is_alive():
            return False
        self.stop_event.clear()
        self.total = total_frames
        self.random_frames = random_frames
        self.epoch, self.buffer = uuid.uuid4().hex, self.routes(buffer)
        self.thread = threading.Thread(target=self._run, args=(self.buffer, self.epoch), daemon=True,
                                       name=f"{self.name}-writer")
        self.thread.start()
        return True

    def _run(self, routes: ShardRoutes, epoch: str) -> None:
        try:
            feed = self.feed_factory(routes, epoch) if self.feed_factory is not None else None
            if feed is not None:
                feed.run()
                return
            while not self.stop_event.is_set():
                if self.total > 0 and self.frames >= self.total:
                    break
                items = self._ready_batches()
                while not self.stop_event.is_set():
                    with self.write_lock:
                        if not self.paused.is_set():
                            self.write(routes.targets, items, epoch)
                            self.frames += sum(meta["frames"] for _, meta in items)
                            break
                    time.sleep(0.005)
                else:
                    for _, meta in items:
                        self.ledger.undeliver(meta, "stopped")
        except BaseException as exc:  # noqa: BLE001 - reported through is_running()/stats()
            self.error = exc
            log.exception("background collection of %s stopped", self.name)
        finally:
            self.collection.cancel_inflight()

    def _ready_batches(self) -> list:
        """The next batch, and every other one already there (up to ``GROUP_MAX`` and the
        total): written in one call per shard."""
        random_actions = self.frames < self.random_frames
        items = [self.collection.next_ready(random_actions)]
        planned = self.frames + items[0][1]["frames"]
        if self.total > 0 and planned >= self.total:
            return items
        for more in self.collection.ready_now(random_actions, GROUP_MAX - 1):
            if self.total > 0 and planned >= self.total:  # (past the total: not written)
                self.ledger.undeliver(more[1], "stopped")
                continue
            items.append(more)
            planned += more[1]["frames"]
        return items

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop, and fence this start's writes in the buffer: once this returns, none lands,
        even if the thread is still inside a write (its batch is then counted as stopped)."""
        self.stop_event.set()
        stopped = True
        if self.thread is not None:
            self.thread.join(timeout)
            stopped = not self.thread.is_alive()
        if self.epoch is not None and self.buffer is not None:
            for shard in self.buffer.alive():
                try:
                    ray.get(self.buffer.targets[shard].fence.remote(self.epoch),
                            timeout=max(1.0, timeout))
                except Exception:  # noqa: BLE001 - a dead buffer takes no writes anyway
                    log.warning("could not fence the writes of %s in the replay buffer", self.name)
        return stopped

    def pause(self, paused: bool) -> None:
        """Stop (or resume) writes; returns once no write is in progress."""
        if paused:
            self.paused.set()
            with self.write_lock:
                pass
        else:
            self.paused.clear()

    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
