"""The replay-buffer actor's state: ``state_dict`` / ``load_state_dict`` and checkpoints
(written on a thread of their own, so writers never wait for the disk; restored from JSON and
memory-mapped tensors only, see :mod:`actors.storage.checkpoints`)."""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict

from actors.storage import checkpoints

log = logging.getLogger("ray_collectors.buffer")


class BufferStateMixin:
    """What ``ReplayBufferActor`` saves and restores: its storage, counters, sampler state and
    the batch ids it has seen."""

    def _meta(self) -> dict:
        return {"capacity": self.capacity, "cursor": self.cursor, "size": self.size,
                "write_count": self.write_count, "limiter": self.limiter.state(),
                "sampler": self.sampler_name, "sampler_state": self.sampler.state(),
                "batches": self.batches,
                "seen": [list(b) if isinstance(b, tuple) else b for b in self.seen],
                "compact": None if self.compact is None else self.compact.meta()}

    def shard_state(self) -> dict:
        """What a sharded handle weighs this shard by: its size, and with priorities their
        total and smallest value over the stored frames (``alpha`` applied)."""
        with self.cond:
            out = {"size": self.size, "total_priority": float(self.size), "min_priority": 1.0}
            tree = getattr(self.sampler, "tree", None)
            if tree is not None and self.size:
                out["total_priority"] = float(tree.total)
                out["min_priority"] = float(tree.min(self.size))
            return out

    def state_dict(self) -> dict:
        with self.cond:
            return {"storage": None if self.storage is None else self.storage.clone(),
                    "meta": json.loads(json.dumps(self._meta())),
                    "priorities": self._tensors()}

    def load_state_dict(self, state: dict) -> None:
        with self.cond:
            self._restore(state["meta"], state["storage"], state.get("priorities") or {})

    def _tensors(self) -> dict:
        """Sampler state (and the compact side store) as tensors: copies, safe to write out."""
        out = {k: v.clone() for k, v in self.sampler.tensors().items()}
        if self.compact is not None:
            out["compact"] = self.compact.tensors()
        return out

    def _restore(self, meta: dict, storage, tensors: dict) -> None:
        if meta["capacity"] != self.capacity:
            raise ValueError(f"state has capacity {meta['capacity']}, this buffer {self.capacity}.")
        was_compact = meta.get("compact") is not None
        if was_compact != (self.compact is not None):
            raise ValueError(
                f"the state was written by a buffer with compact_obs={was_compact}, this one has "
                f"compact_obs={self.compact is not None}; open it with compact_obs={was_compact}.")
        if self.compact is not None:
            self.compact.load(meta["compact"], tensors.get("compact") or {})
        if self.ring is not None:  # samplers that mapped it move to the new one
            self.ring.close()
            self.ring = None
            if self.compact is not None:  # (its side stores join the new ring below)
                self.compact.share(None)
        if storage is not None and self.share:
            shared = self._allocate(storage[:1])
            for key, tensor in storage.items(include_nested=True, leaves_only=True):
                shared.get(key).copy_(tensor)
            if self.ring is not None:
                self.ring.stamp_all(meta["size"])
            storage = shared
        self.storage = storage
        self.cursor, self.size, self.write_count = meta["cursor"], meta["size"], meta["write_count"]
        self.limiter.inserts = meta["limiter"]["inserts"]
        self.limiter.samples = meta["limiter"]["samples"]
        self.seen = OrderedDict.fromkeys(tuple(b) if isinstance(b, list) else b for b in meta["seen"])
        self.batches = meta.get("batches", len(self.seen))
        self.sampler.load(meta["sampler_state"], tensors, self.storage, self.size)

    def checkpoint(self, path: str) -> str:
        """Write storage, sampler state and counters to the checkpoint directory ``path``.

        The state is copied under the lock (a memory copy), then written outside it, so writers
        wait for the copy only, never for the disk. See :mod:`actors.storage.checkpoints` for the
        atomic, durable format; a directory that is not a checkpoint of ours is refused.
        """
        path = os.path.abspath(path)
        checkpoints.claim(path)  # refuse a foreign directory before copying anything
        with self.cond:
            storage = None if self.storage is None else self.storage.clone()
            tensors = self._tensors()
            meta = self._meta()
        with self.checkpoint_lock:  # one writer of the directory at a time
            checkpoints.write(path, storage, tensors, meta)
        if path == os.path.abspath(self.checkpoint_dir or ""):
            with self.cond:
                self.checkpointed_batches = max(self.checkpointed_batches, meta["batches"])
        return path

    def _checkpoint_soon(self) -> None:
        """Periodic checkpoint on a thread of its own (called under the lock by ``extend``):
        the writer gets its acknowledgement without waiting for the disk."""
        if self.checkpoint_thread is not None and self.checkpoint_thread.is_alive():
            self.checkpoint_pending = True  # the running one is followed by one more
            return
        self.checkpoint_pending = False
        self.checkpoint_thread = threading.Thread(target=self._periodic_checkpoints, daemon=True)
        self.checkpoint_thread.start()

    def _periodic_checkpoints(self) -> None:
        while True:
            try:
                self.checkpoint(self.checkpoint_dir)
            except Exception:  # noqa: BLE001 - logged; the next one tries again
                log.exception("periodic checkpoint into %s failed", self.checkpoint_dir)
            with self.cond:
                if not self.checkpoint_pending:
                    return
                self.checkpoint_pending = False

    def load_checkpoint(self, path: str) -> None:
        """Restore from the newest valid version in ``path`` (JSON and memory-mapped tensors,
        validated; nothing is unpickled). Raises ``CheckpointError`` if none is valid."""
        meta, storage, tensors, version = checkpoints.read(os.path.abspath(path), self.capacity)
        self._check_restored(meta, storage)
        with self.cond:
            self._restore(meta, storage, tensors)
            self.checkpointed_batches = self.batches
        self.restored_from = version

    def _check_restored(self, meta: dict, storage) -> None:
        """The metadata must agree with what the storage holds."""
        if storage is None:
            return
        for key, tensor in storage.items(include_nested=True, leaves_only=True):
            if tensor.shape[0] != self.capacity:
                raise checkpoints.CheckpointError(
                    f"storage entry {key!r} has {tensor.shape[0]} slots, expected {self.capacity}")
