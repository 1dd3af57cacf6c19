"""``BackgroundWriter``: collect on a thread of the driver and write each batch into the
replay-buffer actor, resending (with the batch's id) until the buffer acknowledges it.

The buffer ignores an id it already holds, so a resend after its restart stores the batch once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, OwnerDiedError, RayActorError, RayTaskError

from actors.collection import Collection, Ledger
from actors.errors import ReplayBufferUnavailable, unwrap

log = logging.getLogger("ray_collectors.writer")

WRITTEN_IDS_KEPT = 50_000


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
        self.written_ids: deque = deque(maxlen=WRITTEN_IDS_KEPT)  # acknowledged, oldest first
        self.written_batches = 0
        self.resends = 0

    def batch_id(self, meta: dict) -> tuple:
        """Unique across collectors sharing a buffer: (collector, worker, restarts, index)."""
        return (self.name, meta["worker"], meta["restarts"], meta["batch_index"])

    def write(self, buffer, refs: list, meta: dict) -> int:
        """Write one batch into the buffer actor, resending until acknowledged; raises
        :class:`ReplayBufferUnavailable` after ``write_timeout_s``."""
        batch_id = self.batch_id(meta)
        deadline = time.monotonic() + self.write_timeout_s
        while True:
            try:
                n = ray.get(buffer.extend_ref.remote(refs, batch_id),
                            timeout=max(0.1, deadline - time.monotonic()))
                self.written_ids.append(batch_id)
                self.written_batches += 1
                return n
            except RayTaskError as exc:
                if not isinstance(unwrap(exc), (ObjectLostError, OwnerDiedError)):
                    raise
                # the worker that owned this batch died before the buffer fetched it
                self.ledger.undeliver(meta, "lost_before_write")
                return 0
            except (RayActorError, GetTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise ReplayBufferUnavailable(
                        f"replay buffer unavailable: no acknowledgement of batch {batch_id} "
                        f"within write_timeout_s={self.write_timeout_s:g} ({exc!r}).") from None
                self.resends += 1
                time.sleep(0.2)

    def start(self, buffer, total_frames: int = -1) -> bool:
        if self.thread is not None and self.thread.is_alive():
            return False
        self.stop_event.clear()
        self.total = total_frames
        self.thread = threading.Thread(target=self._run, args=(buffer,), daemon=True,
                                       name=f"{self.name}-writer")
        self.thread.start()
        return True

    def _run(self, buffer) -> None:
        try:
            while not self.stop_event.is_set():
                if self.total > 0 and self.frames >= self.total:
                    break
                refs, meta = self.collection.next_ready()
                while not self.stop_event.is_set():
                    with self.write_lock:
                        if not self.paused.is_set():
                            self.write(buffer, refs, meta)
                            self.frames += meta["frames"]
                            break
                    time.sleep(0.005)
                else:
                    self.ledger.undeliver(meta, "stopped")
        except BaseException as exc:  # noqa: BLE001 - reported through is_running()/stats()
            self.error = exc
            log.exception("background collection of %s stopped", self.name)
        finally:
            self.collection.cancel_inflight()

    def stop(self, timeout: float = 10.0) -> bool:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

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
