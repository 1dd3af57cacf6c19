"""Background collection into a replay buffer that lives in the trainer's process (such as
TorchRL's ``ReplayBuffer``), as TorchRL's single-process collector does with ``start()``.

A thread of the trainer asks the driver for batches and extends the buffer. It shares the
trainer's GIL: the trainer's Python work and this thread's batch assembly take turns. A
:class:`~collectors.RayReplayBuffer` decouples collection fully (the batches never enter the
trainer's process). Writes are fenced: once :meth:`LocalFiller.stop` returns, nothing more
reaches the buffer, even if the thread is still waiting for a batch.
"""
from __future__ import annotations

import threading


class LocalFiller:
    """``start()``, ``pause(bool)``, ``stop(timeout)``; ``extend(batch)`` is the fenced write."""

    def __init__(self, collector, buffer):
        self.collector = collector
        self.buffer = buffer
        self.lock = threading.Lock()  # held around each write and by stop()
        self.closed = False
        self.paused = threading.Event()
        self.resumed = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"{self.collector.name}-local-fill")
        self.thread.start()

    def _run(self) -> None:
        c = self.collector
        try:
            while not self.closed and (c.total_frames < 0 or c._frames < c.total_frames):
                c._collect_one()  # extends the buffer through extend() below
        except BaseException as exc:  # noqa: BLE001 - reported by background_error()
            if not self.closed:
                self.error = exc

    def extend(self, batch, steps: bool = False) -> bool:
        """Write ``batch`` unless stopped (waits while paused); True if written. ``steps``:
        ``batch`` is a list of time steps, each added on its own (``extend_buffer=False``)."""
        with self.lock:
            while self.paused.is_set() and not self.closed:
                self.resumed.wait(0.1)
            if self.closed:
                return False
            if steps:
                for step in batch:
                    self.buffer.add(step)
            else:
                self.buffer.extend(batch)
            return True

    def pause(self, paused: bool) -> None:
        """Stop (or resume) writes; returns once no write is in progress."""
        with self.lock:
            if paused:
                self.paused.set()
            else:
                self.paused.clear()
                self.resumed.notify_all()

    def stop(self, timeout: float) -> None:
        with self.lock:  # after this, no extend() writes
            self.closed = True
            self.resumed.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.closed
