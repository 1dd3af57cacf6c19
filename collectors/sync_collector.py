"""``SyncDataCollector``: one env actor, batches gathered on request; and TorchRL 0.14's front
door, ``Collector(..., num_collectors=N, sync=...)``, which builds a multi collector."""
from __future__ import annotations

import inspect

import ray

from collectors.base import DataCollectorBase
from collectors.interrupt import InterruptWatch, check_interruptor

BACKENDS = (None, "ray", "direct", "process", "multiprocessing")  # TorchRL's names: our Ray actors


class SyncDataCollector(DataCollectorBase):
    """Steps ``num_envs`` gymnasium envs in one Ray actor; yields TorchRL-layout batches.

    Nothing steps between a yield and the next request, so a weight update applies to the very
    next batch.

    As TorchRL 0.14's ``Collector``, it also takes ``num_collectors`` and ``sync``: with
    ``num_collectors=N`` it returns a ``MultiSyncDataCollector`` (``sync=True``) or a
    ``MultiaSyncDataCollector`` (``sync=False`` or ``None``) with N env actors. ``backend`` may be
    ``None``, ``"ray"``, ``"process"`` or ``"direct"`` (all run on Ray actors here);
    ``backend_options`` are merged into the keyword arguments, as TorchRL does.

    ``interruptor`` (TorchRL's, or any object with ``collection_stopped()``): once it says
    stopped, the batch in flight ends after the env actor's current step (one step if it was
    stopped before the batch was asked for) and the rest of the batch is padding with
    ``("collector", "traj_ids") == -1``, as TorchRL's. Only real steps count towards
    ``total_frames``.

    Example:
        >>> from collectors import SyncDataCollector
        >>> with SyncDataCollector("CartPole-v1", frames_per_batch=4, total_frames=8, seed=0) as c:
        ...     for batch in c:
        ...         print(batch.batch_size, batch["next", "reward"].shape)
        torch.Size([4]) torch.Size([4, 1])
        torch.Size([4]) torch.Size([4, 1])
    """

    _layout = "single"

    def __new__(cls, *args, backend=None, backend_options=None, num_collectors=None, sync=None,
                **kwargs):
        if cls is not SyncDataCollector and any(
                v is not None for v in (backend, backend_options, num_collectors, sync)):
            raise TypeError("backend, backend_options, num_collectors and sync are only for "
                            "Collector (SyncDataCollector) itself.")
        if backend not in BACKENDS:
            raise NotImplementedError(
                f"backend={backend!r}: ray-collectors runs every collector on Ray actors; use "
                f"one of {BACKENDS} (all the same here).")
        if num_collectors is not None and (isinstance(num_collectors, bool) or
                                           not isinstance(num_collectors, int) or num_collectors < 1):
            raise ValueError(f"num_collectors must be a positive integer; got {num_collectors!r}.")
        if sync is not None and not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool or None; got {sync!r}.")
        if backend_options is not None and not isinstance(backend_options, dict):
            raise TypeError(f"backend_options must be a dict; got {type(backend_options).__name__}.")
        clash = set(backend_options or {}) & set(kwargs)
        if clash:
            raise ValueError(f"backend_options repeat keyword arguments {sorted(clash)}.")
        if num_collectors is None:
            if sync is not None:
                raise ValueError("sync is for several collectors: pass num_collectors too.")
            if backend_options:
                raise ValueError("backend_options are for several collectors (num_collectors).")
            return super().__new__(cls)
        from collectors.multi_collectors import MultiaSyncDataCollector, MultiSyncDataCollector

        multi = MultiSyncDataCollector if sync else MultiaSyncDataCollector
        return multi(*args, num_workers=num_collectors, **{**kwargs, **(backend_options or {})})

    def __init__(self, create_env_fn, policy=None, *, backend=None, backend_options=None,
                 num_collectors=None, sync=None, interruptor=None, **kwargs):
        check_interruptor(interruptor, type(self).__name__)
        if interruptor is not None and kwargs.get("replay_buffer") is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: interruptor with a replay_buffer: a cut batch is padding "
                "after its last real step, which a buffer must not store. Use one of them.")
        self.interruptor = interruptor  # TorchRL's: stopped, the batch in flight is cut short
        self._interrupt: InterruptWatch | None = None
        super().__init__(create_env_fn, policy, **kwargs)
        if interruptor is not None:
            self._interrupt = InterruptWatch(interruptor, self._worker_handles[0],
                                             refresh=self._current_worker)

    def _current_worker(self):
        """The env actor's handle now (the driver may have replaced it)."""
        handles = ray.get(self._driver.worker_handles.remote(alive_only=True), timeout=30.0)
        return handles[0] if handles else self._worker_handles[0]

    def _collect_one(self):
        """A batch; with an ``interruptor`` (see :mod:`collectors.interrupt`) watched meanwhile."""
        if self._interrupt is None:
            return super()._collect_one()
        self._check_open()
        self._interrupt.before()
        try:
            return super()._collect_one()
        finally:
            self._interrupt.after()

    def shutdown(self, *args, **kwargs) -> None:
        watch = getattr(self, "_interrupt", None)  # (a constructor that raised set none)
        if watch is not None:
            watch.close()
        super().shutdown(*args, **kwargs)


_sig = inspect.signature(SyncDataCollector)
SyncDataCollector.__signature__ = _sig.replace(parameters=[
    *_sig.parameters.values(),
    inspect.Parameter("interruptor", inspect.Parameter.KEYWORD_ONLY, default=None)])
