"""Background collection into a replay buffer: ``start()``, pause, stop."""
from __future__ import annotations

import contextlib
import threading

import ray

from collectors.control import CONTROL_TIMEOUT_S
from collectors.runtime import driver_get as _ray_get


class BackgroundMixin:
    """``DataCollectorBase``'s ``start()`` and what goes with it."""

    def start(self) -> None:
        """Collect in the background, inside the driver actor, into the replay buffer.

        Runs until ``total_frames`` or :meth:`async_shutdown`; the trainer only samples.
        """
        self._check_open()
        if self.replay_buffer is None:
            raise RuntimeError("start() streams into a replay buffer: pass replay_buffer="
                               "collectors.RayReplayBuffer(...) (or a TorchRL ReplayBuffer) when "
                               "building the collector.")
        if self._t_start is None:
            self._first_batch()
        self._route.stop_serving()  # a thread collects from here on: batches go through the driver
        if not hasattr(self.replay_buffer, "actor"):  # a buffer in this process: a thread fills it
            from collectors.local_fill import LocalFiller

            if self._filler is None:
                self._filler = LocalFiller(self, self.replay_buffer)
            self._filler.start()
            return
        remaining = -1 if self.total_frames < 0 else max(0, self.total_frames - self._frames)
        random_frames = max(0, self.init_random_frames - self._frames)  # (as iteration does)
        self._sync_if_changed()
        _ray_get(self._driver.start.remote(self.replay_buffer.write_target(), remaining, random_frames),
                 timeout=CONTROL_TIMEOUT_S)
        if self._watcher is not None and self._sync_thread is None:
            self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                                 name=f"{self.name}-weight-sync")
            self._sync_thread.start()

    def is_running(self) -> bool:
        """Whether background collection is going on."""
        if self._closed:
            return False
        if self._filler is not None:
            return self._filler.is_running()
        return bool(ray.get(self._driver.is_running.remote(), timeout=CONTROL_TIMEOUT_S))

    @contextlib.contextmanager
    def pause(self):
        """Stop background writes inside the block (e.g. to checkpoint the buffer)."""
        self._check_open()
        if self._filler is not None:
            self._filler.pause(True)
            try:
                yield self
            finally:
                self._filler.pause(False)
            return
        ray.get(self._driver.pause.remote(True), timeout=self.options.write_timeout_s + CONTROL_TIMEOUT_S)
        try:
            yield self
        finally:
            if not self._closed:
                ray.get(self._driver.pause.remote(False), timeout=CONTROL_TIMEOUT_S)

    def async_shutdown(self, timeout: float | None = None, close_env: bool = True) -> None:
        """Stop background collection (no write reaches the buffer once this returns), then
        shut everything down (see :meth:`shutdown`). ``stats()`` still answers."""
        if self._closed:
            return
        timeout = 10.0 if timeout is None else float(timeout)
        if self._filler is not None:  # fenced: nothing reaches the buffer once this returns
            self._filler.stop(timeout)
        try:
            ray.get(self._driver.stop.remote(timeout), timeout=timeout + 5)
        except Exception:  # noqa: BLE001 - forced by shutdown() below
            pass
        self.shutdown(timeout, close_env=close_env)

    def background_error(self) -> str | None:
        """The error that stopped background collection, if any."""
        if self._filler is not None:
            return None if self._filler.error is None else repr(self._filler.error)
        return None if self._closed else ray.get(self._driver.background_error.remote(),
                                                 timeout=CONTROL_TIMEOUT_S)
