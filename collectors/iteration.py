"""Iteration over a collector, as TorchRL's: ``for batch in collector``, ``next()``, ``len()``,
trajectory batches (``trajs_per_batch``), ``return_same_td`` and the settable hooks. The batch
itself comes from the collector's ``_collect_one``.

    >>> from collectors import SyncDataCollector  # doctest: +SKIP
    >>> for batch in SyncDataCollector("CartPole-v1", frames_per_batch=200, total_frames=400):
    ...     print(batch.batch_size)  # doctest: +SKIP
    torch.Size([200])
    torch.Size([200])
"""
from __future__ import annotations

import math


class IterationMixin:
    """Iteration for :class:`~collectors.base.DataCollectorBase`."""

    def __len__(self) -> int:
        if self.total_frames < 0:
            raise RuntimeError("this collector is endless (total_frames=-1): it has no length.")
        return math.ceil(self.total_frames / self.frames_per_batch)

    def __iter__(self):
        self._check_open()
        try:
            while self.total_frames < 0 or self._frames < self.total_frames:
                out = self._collect_one()
                if self._trajs is None or out is None:
                    yield out
                    continue
                self._trajs.ingest(out)  # whole trajectories (trajs_per_batch)
                if self.options.reset_at_each_iter:  # their episodes never finish
                    self._trajs.clear(partial_only=True)
                while len(self._trajs.complete) >= self.options.trajs_per_batch:
                    yield self._trajs.emit(self.options.trajs_per_batch, self.traj_format)
        except (Exception, KeyboardInterrupt):
            self.shutdown(raise_on_error=False)
            raise

    def next(self):
        """One batch (TorchRL's ``collector.next()``); ``None`` once ``total_frames`` are in."""
        if self._trajs is None:
            return self._collect_one()
        if self._next_iter is None:  # trajectories: batches come from the iteration
            self._next_iter = iter(self)
        return next(self._next_iter, None)

    def rollout(self):
        """Collect and return one batch (counted like an iteration step)."""
        return self._collect_one()

    def _into_same_td(self, batch):
        """``return_same_td=True``: the first batch's TensorDict, overwritten with ``batch``
        (a batch of another shape or key set, e.g. a preempted one, replaces it)."""
        same = self._same_td
        if same is not None and same.batch_size == batch.batch_size and \
                set(same.keys(True, True)) == set(batch.keys(True, True)):
            return same.update_(batch)
        self._same_td = batch
        return batch

    def _set_hook(self, name: str, hook) -> None:
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be callable or None; got {type(hook).__name__}.")
        self.options = self.options.model_copy(update={name: hook})

    @property
    def pre_collect_hook(self):
        """Called with no argument before each batch (settable, as on TorchRL's collectors)."""
        return self.options.pre_collect_hook

    @pre_collect_hook.setter
    def pre_collect_hook(self, hook) -> None:
        self._set_hook("pre_collect_hook", hook)

    @property
    def post_collect_hook(self):
        """Called with each batch before it is yielded or written (settable)."""
        return self.options.post_collect_hook

    @post_collect_hook.setter
    def post_collect_hook(self, hook) -> None:
        self._set_hook("post_collect_hook", hook)
