"""The replay-buffer actor body: a ring of preallocated tensors, samplers, a rate limiter,
atomic checkpoints, and idempotent writes (every batch carries an id)."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict

import torch
from tensordict import TensorDict

from actors.storage import checkpoints
from actors.storage.buffer_state import BufferStateMixin
from actors.storage.compact_storage import CompactNext
from actors.storage.gather import Leaves, rows
from actors.storage.buffer_writes import BufferWritesMixin, arrays_to_frames  # noqa: F401
from actors.coordination.metrics import Metrics
from actors.storage.sample_link import SampleLinkMixin
from actors.storage.samplers import make_sampler
from actors.shm.folders import remove_stale, shareable
from actors.storage.shared_ring import GEN, SharedRing
from actors.storage.side_files import SideFiles

log = logging.getLogger("ray_collectors.buffer")

WEIGHT_KEY = "priority_weight"  # TorchRL's key for importance weights of prioritized samples
SAMPLE_KEYS = ("index", WEIGHT_KEY, "_weight")  # added by sampling: dropped when written back
SEEN_IDS = 50_000  # batch ids remembered to drop resends (a resend comes within seconds)


class RateLimiter:
    """Reverb's sample-to-insert ratio: ``inserts * spi - samples`` stays inside a band."""

    def __init__(self, min_size: int, samples_per_insert: float | None, error_buffer: float | None):
        self.min_size = int(min_size)
        self.spi = samples_per_insert
        self.inserts = 0
        self.samples = 0
        if self.spi is not None:
            if self.spi <= 0:
                raise ValueError(f"samples_per_insert must be positive; got {self.spi}.")
            need = 2 * max(1.0, self.spi)
            if error_buffer is None:
                error_buffer = need
            if 2 * error_buffer < need:
                raise ValueError(
                    f"error_buffer={error_buffer} with samples_per_insert={self.spi} makes a band "
                    f"of {2 * error_buffer}, narrower than {need}: inserts and samples could block "
                    f"each other forever. Use error_buffer >= {need / 2}.")
            offset = self.spi * max(1, self.min_size)
            self.min_diff, self.max_diff = offset - error_buffer, offset + error_buffer

    def can_sample(self, size: int, n: int) -> bool:
        if size < max(1, self.min_size):
            return False
        return self.spi is None or self.inserts * self.spi - (self.samples + n) >= self.min_diff

    def can_insert(self, n: int) -> bool:
        return self.spi is None or self.inserts < self.min_size or \
            (self.inserts + n) * self.spi - self.samples <= self.max_diff + self.spi * n

    def state(self) -> dict:
        return {"inserts": self.inserts, "samples": self.samples}


class ReplayBufferActor(BufferStateMixin, BufferWritesMixin, SampleLinkMixin):
    """Frames are stored flat: any batch dims of a written TensorDict become frames."""

    def __init__(self, capacity: int, *, sampler: str = "random", batch_size: int | None = None,
                 sampler_kwargs: dict | None = None, min_size: int = 0,
                 samples_per_insert: float | None = None, error_buffer: float | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 seed: int | None = None, default_timeout_s: float = 30.0, name: str = "buffer",
                 share: bool = False, compact_obs: bool | str = False):
        self.capacity = int(capacity)
        self.batch_size = batch_size
        self.sampler_name = sampler
        self.sampler = make_sampler(sampler, self.capacity, seed=seed, **(sampler_kwargs or {}))
        self.limiter = RateLimiter(min_size, samples_per_insert, error_buffer)
        self.storage: TensorDict | None = None
        # compact_obs: each observation stored once, ("next", obs) rebuilt at sample time;
        # "frames": stacked observations also store each frame once
        self.compact = CompactNext(self.capacity, frames=compact_obs == "frames") \
            if compact_obs else None
        self.share = share  # shared memory for same-node samplers
        self.ring: SharedRing | None = None
        self.cursor = 0
        self.size = 0
        self.write_count = 0
        self.seen: OrderedDict = OrderedDict()  # the last SEEN_IDS batch ids, oldest first
        self.batches = 0  # batches written (with or without an id)
        self.cond = threading.Condition()
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = int(checkpoint_every)
        self.default_timeout_s = default_timeout_s
        self.insert_time = 0.0
        self.sample_time = 0.0
        self.sampled_frames = 0
        self.restored_from = None
        self.metrics = Metrics(name, "replay-buffer")
        if share:
            remove_stale()
        self.reserved: set = set()  # batch ids being written right now
        self.fenced: set = set()  # epochs of stopped background collections: writes refused
        self.writing: dict = {}  # epoch -> writes in progress
        self.incarnation = uuid.uuid4().hex  # tells writers that this actor restarted
        self.checkpointed_batches = 0  # value of ``batches`` in the last completed checkpoint
        self.checkpoint_lock = threading.Lock()
        self.checkpoint_thread: threading.Thread | None = None
        self.checkpoint_pending = False
        self._link_servers: dict = {}  # sample links opened, not yet serving (see sample_link)
        self._link_count = 0  # sample links open
        self._leaves = Leaves()  # the storage's leaf tensors, listed once per storage
        if checkpoint_dir and checkpoints.has_versions(checkpoint_dir):
            self.load_checkpoint(checkpoint_dir)  # a damaged one raises: never silently empty
        elif checkpoint_dir:
            checkpoints.claim(checkpoint_dir)  # a foreign directory is refused now, not later

    # -- writes ------------------------------------------------------------------------------
    def _check(self, td: TensorDict) -> None:
        if td.shape[0] > self.capacity:
            raise ValueError(
                f"extend of {td.shape[0]} frames is larger than the capacity {self.capacity}; "
                "write smaller batches or raise capacity.")
        if self.storage is None:
            return
        want = {k: (tuple(v.shape[1:]), v.dtype) for k, v in
                self.storage.items(include_nested=True, leaves_only=True)}
        got = {k: (tuple(v.shape[1:]), v.dtype) for k, v in td.items(include_nested=True, leaves_only=True)}
        if self.compact is not None and self.compact.keys:  # their next values are not stored
            got = {k: (self.compact.stored_shape(k if isinstance(k, tuple) else (k,), shape), dtype)
                   for k, (shape, dtype) in got.items()
                   if not (isinstance(k, tuple) and k[0] == "next" and k[1:] in self.compact.keys)}
        if set(want) != set(got):
            raise ValueError(
                f"keys do not match the storage: missing {sorted(map(str, set(want) - set(got)))}, "
                f"unexpected {sorted(map(str, set(got) - set(want)))}.")
        for key, (shape, dtype) in want.items():
            if got[key] != (shape, dtype):
                raise ValueError(
                    f"entry {key!r}: storage holds per-frame shape {shape} and dtype {dtype}, got "
                    f"shape {got[key][0]} and dtype {got[key][1]}.")

    def extend(self, td: TensorDict, batch_id=None, timeout: float | None = None, *,
               group_ids: list | None = None) -> int:
        """Write frames (all batch dims flattened); returns how many were written (0 if a dup).
        ``group_ids``: the frames are several batches, written only if none of them is stored."""
        if not isinstance(td, TensorDict) and hasattr(td, "to_tensordict"):
            td = td.to_tensordict()
        if td.batch_dims == 0:
            td = td.unsqueeze(0)
        if td.batch_size.numel() == 0:  # e.g. a batch whose every frame was dropped
            return 0
        td = td.reshape(-1)
        for key in [k for k in td.keys(include_nested=True, leaves_only=True)
                    if (k if isinstance(k, str) else k[-1]) in SAMPLE_KEYS]:
            td = td.exclude(key)
        self._check(td)
        t0 = time.perf_counter()
        n = td.shape[0]
        ids = list(group_ids) if group_ids else ([] if batch_id is None else [batch_id])
        ids = [tuple(i) if isinstance(i, list) else i for i in ids]
        with self.cond:
            for bid in ids:
                # a send of the same id in progress (e.g. a resend while the first waits for
                # the rate limiter): wait for its outcome, so the batch is stored exactly once
                self._wait(lambda bid=bid: bid not in self.reserved, timeout,
                           f"an earlier send of batch {bid} to finish")
            if any(bid in self.seen for bid in ids):
                return 0
            self.reserved.update(ids)
            idx = (torch.arange(n) + self.cursor) % self.capacity
            touched = None  # the slots readers of the shared ring must skip until end()
            try:
                self._wait(lambda: self.limiter.can_insert(n), timeout,
                           f"room to insert {n} frames under samples_per_insert={self.limiter.spi}")
                if self.ring is not None:
                    touched = idx if self.compact is None else \
                        torch.cat([idx, self.compact.touched(idx, self.size)])
                    self.ring.begin(touched)
                if self.compact is not None:
                    td = self.compact.strip(td, idx, self.storage, self.size)
            except BaseException:
                if touched is not None:
                    self.ring.end(touched, self.size)
                self.reserved.difference_update(ids)
                self.cond.notify_all()
                raise
            if self.storage is None:
                self.storage = self._allocate(td[:1])
            self.storage[idx] = td
            self.cursor = (self.cursor + n) % self.capacity
            self.size = min(self.capacity, self.size + n)
            if self.ring is not None:
                self.ring.end(idx if touched is None else touched, self.size)
            self.write_count += n
            self.limiter.inserts += n
            self.sampler.on_write(idx, self.storage, self.size)
            for bid in ids:
                self.seen[bid] = None
            self.reserved.difference_update(ids)
            while len(self.seen) > SEEN_IDS:
                self.seen.popitem(last=False)
            before, self.batches = self.batches, self.batches + max(1, len(ids))
            self.insert_time += time.perf_counter() - t0
            self.metrics.buffer(self.size, inserted=n)
            self.cond.notify_all()
            if self.checkpoint_every and self.checkpoint_dir and \
                    before // self.checkpoint_every != self.batches // self.checkpoint_every:
                self._checkpoint_soon()
        return n

    def _allocate(self, template: TensorDict) -> TensorDict:
        """Zeroed ``[capacity, ...]`` storage shaped like ``template``; in shared memory when
        asked for and ``/dev/shm`` has room."""
        leaves = dict(template.items(include_nested=True, leaves_only=True))
        nbytes = self.capacity * sum(v[0].numel() * v.element_size() for v in leaves.values())
        if self.share and shareable(nbytes):
            try:
                self.ring = SharedRing(leaves, self.capacity)
            except OSError as exc:  # e.g. /dev/shm not writable: samplers use calls
                log.warning("replay buffer storage stays private (%r)", exc)
        if self.ring is None:
            return template.expand(self.capacity).clone().zero_()
        if self.compact is not None:  # the side stores go beside the ring
            self.compact.share(SideFiles(self.ring))
        storage = TensorDict(batch_size=[self.capacity])
        for key, tensor in self.ring.tensors.items():
            storage.set(key, tensor)
        return storage

    def storage_location(self, sampled: int = 0) -> dict | None:
        """Where same-node samplers map the storage (``None`` if not shared yet); also counts
        the ``sampled`` frames they drew since they last said."""
        self._count_samples(sampled)
        with self.cond:  # (a write may be moving the side stores)
            if self.ring is None:
                return None
            side = None if self.compact is None else \
                {**self.compact.layout(), "gen": int(self.ring.header[GEN])}
            return {**self.ring.location(), "node_id": _node_id(),
                    "min_size": self.limiter.min_size, "side": side}

    def _count_samples(self, n: int) -> None:
        if n:
            with self.cond:
                self.limiter.samples += n
                self.sampled_frames += n
            self.metrics.buffer(self.size, sampled=n)

    def close(self) -> None:
        """Remove the shared-memory files (idempotent); samplers fall back to calls."""
        if self.ring is not None:
            self.ring.close()

    def fence(self, epoch: str) -> None:
        """Refuse writes of ``epoch`` from now on, and return once none is in progress."""
        with self.cond:
            self.fenced.add(epoch)
            self._wait(lambda: not self.writing.get(epoch), None,
                       f"writes of the stopped collection {epoch} to finish")

    # -- reads -------------------------------------------------------------------------------
    def _wait(self, ready, timeout, what: str) -> None:
        timeout = self.default_timeout_s if timeout is None else timeout
        if not self.cond.wait_for(ready, timeout=timeout):
            raise TimeoutError(
                f"replay buffer waited {timeout:g}s for {what} (size {self.size}, inserts "
                f"{self.limiter.inserts}, samples {self.limiter.samples}); nothing arrived.")

    def sample(self, batch_size: int | None = None, timeout: float | None = None) -> TensorDict:
        out = self._sample(batch_size, timeout, 1)[0]
        return TensorDict(out, batch_size=[len(out["index"])])

    def _sample(self, batch_size: int | None, timeout: float | None, count: int,
                into: dict | None = None) -> list:
        """Up to ``count`` batches, each ``{key: tensor}`` (keys as ``TensorDict.items`` names
        them): the first waits (bounded) for the rate limiter, the others are taken only if it
        allows them right away. ``into``: tensors the first batch's values go into where their
        shapes and dtypes fit (a slot's views)."""
        n = batch_size or self.batch_size
        if not n:
            raise ValueError("sample() needs a batch_size (here or at construction).")
        t0 = time.perf_counter()
        outs = []
        with self.cond:
            self._wait(lambda: self.limiter.can_sample(self.size, n), timeout,
                       f"{n} samples (min_size={self.limiter.min_size})")
            while True:
                index, weight = self.sampler.sample(n, self.storage, self.size)
                index = index.reshape(-1).long()
                rebuilt = self.compact.rebuilt_keys if self.compact is not None else None
                dest, into = into or {}, None
                out = {k: rows(t, index, dest.get(k))
                       for k, t in self._leaves.of(self.storage, skip=rebuilt)}
                if self.compact is not None:
                    self.compact.rebuild(out, index, self.storage, dest)
                self.limiter.samples += n
                out["index"] = index
                if weight is not None:
                    out[WEIGHT_KEY] = weight
                outs.append(out)
                if len(outs) >= count or not self.limiter.can_sample(self.size, n):
                    break
            self.cond.notify_all()
        self.sampled_frames += n * len(outs)
        self.metrics.buffer(self.size, sampled=n * len(outs))
        self.sample_time += time.perf_counter() - t0
        return outs

    def sample_arrays(self, batch_size: int | None = None, timeout: float | None = None,
                      count: int = 1) -> list[dict]:
        """Up to ``count`` samples as ``[{key: ndarray}]``: Ray ships numpy arrays without
        pickling them, and one call for several batches saves round trips."""
        return [{k: v.numpy() for k, v in out.items()}
                for out in self._sample(batch_size, timeout, max(1, int(count)))]

    def update_priority(self, index, priority) -> None:
        with self.cond:
            self.sampler.update_priority(torch.as_tensor(index), torch.as_tensor(priority, dtype=torch.float64))

    def __len__(self) -> int:
        return self.size

    def length(self) -> int:
        return self.size

    def info(self, sampled: int = 0) -> dict:
        self._count_samples(sampled)
        return {"size": self.size, "capacity": self.capacity, "write_count": self.write_count,
                "batches": self.batches, "inserts": self.limiter.inserts,
                "samples": self.limiter.samples, "insert_time": self.insert_time,
                "sample_time": self.sample_time, "restored_from": self.restored_from,
                "checkpointed_batches": self.checkpointed_batches,
                "checkpoint_dir": self.checkpoint_dir,
                "pid": os.getpid(), "node_id": _node_id(), "storage_bytes": self.storage_bytes()}

    def storage_bytes(self) -> int:
        """Bytes the stored frames take: the ring, plus what compact_obs keeps apart."""
        ring = 0 if self.storage is None else sum(
            v.numel() * v.element_size() for v in self.storage.values(include_nested=True, leaves_only=True))
        return ring + (self.compact.nbytes() if self.compact is not None else 0)

    def batch_ids(self) -> list:
        """Ids of the last ``SEEN_IDS`` batches written with one, oldest first."""
        return list(self.seen)

    def empty(self) -> None:
        with self.cond:
            self.cursor = self.size = 0
            self.sampler.reset()
            self.seen.clear()
            if self.compact is not None:  # same stored keys, no side rows
                self.compact = self.compact.emptied()
            if self.ring is not None:
                self.ring.stamp_all(0)

    def ready(self) -> dict:
        return self.info()


def _node_id() -> str | None:
    """The Ray node this actor runs on (``None`` when used as a plain object, outside Ray)."""
    import ray  # late, as elsewhere here: the body is usable without Ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
