"""TorchRL's ``interruptor`` for ``SyncDataCollector``: cut the batch in flight short.

TorchRL's rollout polls ``interruptor.collection_stopped()`` after every env step. Here the
steps run in an env actor and the interruptor lives in the trainer's process, so a thread of
the trainer polls it while a batch is in flight and asks the env actor to stop after its
current step (``preempt``). Stopped before a batch is asked for, the env actor is told first:
that batch keeps exactly one step. Either way the rest of the batch is padding with traj id -1,
as TorchRL's.
"""
from __future__ import annotations

import threading

import ray
from ray.exceptions import RayError

POLL_S = 0.001  # the interruptor has no wake-up: it is read every millisecond while a batch runs


def check_interruptor(interruptor, cls_name: str) -> None:
    """``None`` or an object with a callable ``collection_stopped()``; TypeError otherwise."""
    if interruptor is not None and not callable(getattr(interruptor, "collection_stopped", None)):
        raise TypeError(
            f"{cls_name}: interruptor must have a collection_stopped() method (TorchRL's "
            f"_Interruptor has one); got {type(interruptor).__name__}. Pass such an object "
            "or None.")


class InterruptWatch:
    """Polls ``interruptor`` while :meth:`batch` is active and preempts ``worker`` once."""

    def __init__(self, interruptor, worker, timeout_s: float = 30.0, refresh=None):
        self.interruptor = interruptor
        self.worker = worker  # the env actor's handle
        self.refresh = refresh  # () -> the env actor's current handle (it may be replaced)
        self.timeout_s = timeout_s
        self._in_flight = threading.Event()
        self._done = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def before(self) -> None:
        """Call before asking for a batch: tells the env actor now if collection is stopped,
        otherwise watches until :meth:`after`."""
        if self.interruptor.collection_stopped():
            try:
                ray.get(self.worker.preempt.remote(True), timeout=self.timeout_s)
            except (RayError, TimeoutError):  # gone or restarting: the collect path deals
                if self.refresh is not None:
                    self.worker = self.refresh()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="interruptor-watch",
                                            daemon=True)
            self._thread.start()
        self._done.clear()
        self._in_flight.set()

    def after(self) -> None:
        """The batch arrived: stop watching."""
        self._in_flight.clear()
        self._done.set()

    def close(self) -> None:
        self._closed = True
        self._in_flight.set()  # wakes the thread, which sees _closed and ends
        self._done.set()

    def _watch(self) -> None:
        while True:
            self._in_flight.wait()
            if self._closed:
                return
            while self._in_flight.is_set() and not self._closed:
                if self.interruptor.collection_stopped():
                    self.worker.preempt.remote()  # an idle worker ignores it
                    self._done.wait()  # once per batch
                    break
                self._done.wait(POLL_S)
