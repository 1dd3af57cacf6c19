"""Keep the main thread of an env actor's process asleep while the actor serves a trainer.

Ray runs a task loop on the main thread of every actor process, and that loop checks for signals
every 10 ms, taking the GIL each time. An env actor that serves batches from a thread of its
own (``serve``) does nothing on its main thread, yet it wakes 100 times a second. With dozens of
actors on a few cores, those wake-ups cost a good part of the machine (0.29 of 2 cores for 64
idle actors, measured; 0.02 with the main thread parked).

:class:`MainThreadPark` parks that thread inside Python's handler of one signal: the handler
sleeps ``interval_s``, returns so that Ray runs whatever it queued for the main thread meanwhile
(a Ray call to the actor waits at most that long to start), and a small thread sends the signal
again. Signals that Ray or the user handle (SIGTERM, SIGINT) still interrupt the sleep, and a
handler that raises (SIGTERM's SystemExit) ends the park for good.

>>> park = MainThreadPark(0.1)   # in the actor's __init__ (Python installs handlers there)
>>> with park:                   # in the method that serves
...     serve_batches()
"""
from __future__ import annotations

import signal
import threading

import ray

SIGNAL = signal.SIGUSR2
AUTO_INTERVAL_S = 0.1  # main_thread_sleep_s=None, for an actor given under AUTO_BELOW_CPU
AUTO_BELOW_CPU = 0.2


def park_interval(setting: float | None) -> float | None:
    """The sleep of this process's main thread for ``CollectorOptions.main_thread_sleep_s``:
    None (no park) outside a Ray actor, for 0, and for None (auto) unless this actor was given
    under ``AUTO_BELOW_CPU`` CPU."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    if setting is None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        return AUTO_INTERVAL_S if cpus < AUTO_BELOW_CPU else None
    return setting or None


class MainThreadPark:
    """Parks the main thread in ``interval_s`` sleeps while used as a context manager.

    Inactive (a no-op context manager) when not created on the main thread, when ``interval_s``
    is ``None`` or when the signal already has a handler (the user's own, say)."""

    interval_s: float | None
    installed: bool
    _active: bool
    _wake: threading.Event
    _returned: threading.Event
    _thread: threading.Thread | None

    def __init__(self, interval_s: float | None):
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r}: expected seconds > 0, or None for no park")
        self.interval_s = interval_s
        self._active = False
        self._wake = threading.Event()  # set: stop sleeping now
        self._returned = threading.Event()  # the handler returned: the main thread is Ray's again
        self._thread = None
        self._main = threading.main_thread().ident
        self.installed = (interval_s is not None
                          and threading.current_thread() is threading.main_thread()
                          and signal.getsignal(SIGNAL) == signal.SIG_DFL)
        if self.installed:
            signal.signal(SIGNAL, self._sleep)

    def _sleep(self, _signum, _frame) -> None:
        try:
            if self._active:
                self._wake.wait(self.interval_s)
        except BaseException:  # another signal's handler raised (SIGTERM's SystemExit): the
            self._active = False  # process is ending, and its main thread must not sleep again
            self._wake.set()
            raise
        finally:
            self._returned.set()

    def _rearm(self) -> None:
        while self._active:
            self._returned.clear()
            signal.pthread_kill(self._main, SIGNAL)
            while not self._returned.wait(1.0):  # Ray runs the handler at its next check
                if not self._active:
                    return
            # let the handler's frame end first: a signal that arrives while Python still runs
            # it is handled at once, and the thread would sleep again without Ray's turn
            if self._wake.wait(0.002):
                return

    def __enter__(self) -> "MainThreadPark":
        if self.installed and not self._active:
            self._wake.clear()
            self._active = True
            self._thread = threading.Thread(target=self._rearm, daemon=True, name="main-park")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Wake the main thread for good (until the next ``with``); idempotent."""
        self._active = False
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
