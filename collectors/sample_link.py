"""The trainer's side of a sample link (see :mod:`actors.storage.sample_link`).

``RayReplayBuffer.sample()`` uses it when it cannot sample the shared storage itself (compact or
frame storage, prioritized, slices, rate limits) and the buffer actor is on this node: the
sample comes through a shared-memory slot instead of the object store. ``sample`` returns
``None`` whenever the caller should use a Ray call instead (another node, no ``/dev/shm``, the
actor busy with other links, or restarting: tried again after ``RETRY_S``).
"""
from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import ray
import torch
from tensordict import TensorDict

from actors.shm.folders import private_folder, remove_folder, remove_stale, shareable
from actors.shm.handoff import HandoffClient, WorkerFailed, layout_end, layout_views
from actors.storage.sample_link import encode
from collectors.batch import frames_tensordict

RETRY_S = 5.0  # after a link failed to open or broke: calls until then
OPEN_TIMEOUT_S = 30.0
POOL = 4  # slots whose samples are handed out as views; with all held, slot 0 is copied out


class SampleLink:
    """``sample(n, timeout)``: a TensorDict, or ``None`` (use a call)."""

    def __init__(self, actor, name: str):
        self.actor = actor
        self.name = name
        self.client: HandoffClient | None = None
        self.serving = None  # the actor's serve_samples call, for as long as the link is open
        self.folder: str | None = None
        self._lock_fd: int | None = None
        self.off = False  # another node, or no shared memory here: calls for good
        self.retry_at = 0.0
        self.samples = 0  # batches received through the link
        self._busy = threading.Lock()  # one request at a time; other threads use calls
        self.free: list[int] = []  # pool slots no sample refers to any more
        self.generation = 0  # of the open link (a slot released after it closed is not reused)

    def _open(self) -> None:
        if not shareable(1 << 20):
            self.off = True
            return
        remove_stale()
        self.folder, self._lock_fd = private_folder("samples-")
        node = ray.get_runtime_context().get_node_id()
        address = ray.get(self.actor.open_sample_link.remote(self.folder, node),
                          timeout=OPEN_TIMEOUT_S)
        if address is None:  # another node, or links enough: calls (look again later)
            self._drop()
            return
        self.serving = self.actor.serve_samples.remote(address)
        self.client = HandoffClient(self.folder, address, keep=2 * (POOL + 1), writable=True)
        self.free = list(range(1, POOL + 1))

    def sample(self, n: int, timeout: float):
        if self.off or not self._busy.acquire(blocking=False):
            return None
        try:
            return self._sample(n, timeout)
        finally:
            self._busy.release()

    def _sample(self, n: int, timeout: float):
        if self.client is None:
            if time.monotonic() < self.retry_at:
                return None
            try:
                self._open()
            except Exception:  # noqa: BLE001 - (restarting, unreachable): calls meanwhile
                self._drop()
            if self.client is None:
                return None
        conn = self.client.conn
        slot = self.free.pop() if self.free else 0
        try:
            self.client.request(False, raw=encode(n, timeout, slot))
            if not conn.poll(timeout + 5.0):
                self._drop()
                raise TimeoutError(f"replay buffer {self.name!r}: no sample of {n} within "
                                   f"{timeout + 5.0:g}s.")
            _, where = self.client.receive_where()
            self.samples += 1
            if slot == 0 or where[2] or not where[1]:  # (a copy: slot 0 is written again next time)
                self._release(self.generation, slot)
                return frames_tensordict(self.client.slots.arrays(*where), [n])
            return self._views(where, n, slot)
        except WorkerFailed as exc:  # sample() raised in the actor: as a call would
            self._drop(stop=False)
            if exc.cause is not None:
                raise exc.cause from None
            raise RuntimeError(exc.text) from None
        except (EOFError, OSError):  # the actor is gone or restarting: calls handle it
            self._drop(stop=False)
            return None

    def _views(self, where: tuple, n: int, slot: int) -> TensorDict:
        """The sample as views of its slot, which goes back to the pool once none is left."""
        path, layout, _ = where
        layout = tuple(layout)
        # one object per sample: the finalizer fires once no tensor of this sample is left
        owner = self.client.slots.mapped(path)[:layout_end(layout)].view(np.ndarray)
        weakref.finalize(owner, self._release, self.generation, slot)
        whole = torch.from_numpy(owner)  # (its storage keeps ``owner`` alive)
        return TensorDict(layout_views(whole, layout), batch_size=[n])

    def _release(self, generation: int, slot: int) -> None:
        if slot and generation == self.generation:
            self.free.append(slot)

    def _drop(self, stop: bool = True) -> None:
        self.retry_at = time.monotonic() + RETRY_S
        self.close(stop)

    def close(self, stop: bool = True) -> None:
        """Tell the actor to stop serving this link; remove the folder. Idempotent."""
        client, self.client = self.client, None
        self.generation += 1
        self.free = []
        if client is not None:
            client.close(stop)
        self.serving = None
        remove_folder(self.folder, self._lock_fd)
        self.folder, self._lock_fd = None, None
