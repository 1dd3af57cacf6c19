"""Many env actors behind one driver: ``MultiSyncDataCollector`` and ``MultiaSyncDataCollector``."""
from __future__ import annotations

import os

from collectors.base import DataCollectorBase


def _workers(create_env_fn, num_workers):
    if isinstance(create_env_fn, (list, tuple)):
        if num_workers is not None and num_workers != len(create_env_fn):
            raise ValueError(
                f"num_workers={num_workers} but create_env_fn lists {len(create_env_fn)} factories.")
        return len(create_env_fn)
    if num_workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    return num_workers


DEVICE_OPTIONS = ("device", "policy_device", "env_device", "storing_device")


def _one_per_worker(cls_name: str, name: str, value, num_workers: int) -> None:
    if len(value) != num_workers:
        raise ValueError(f"{cls_name}: If `{name}` is provided as a sequence, it should contain "
                         f"exactly one value per worker: {num_workers} workers, got "
                         f"{len(value)} values ({list(value)!r}).")


def _per_worker(cls_name: str, name: str, value, num_workers: int):
    """TorchRL's per-worker list for ``name``: checked, and returned as its one value when every
    worker gets the same; different values per worker raise ``NotImplementedError``."""
    if not isinstance(value, (list, tuple)):
        return value
    _one_per_worker(cls_name, name, value, num_workers)
    if any(v != value[0] for v in value):
        raise NotImplementedError(
            f"{cls_name}: {name}={list(value)!r}: different values per worker are not "
            f"implemented (every env actor here runs with the same {name}). Pass one value, "
            "or split the work into collectors with one value each.")
    return value[0]


def _lists(cls_name: str, frames_per_batch, num_workers: int, kwargs: dict):
    """Per-worker lists of TorchRL's multi collectors: ``frames_per_batch`` (the batch is their
    sum; async collectors, as TorchRL 0.14's, collect that sum in each worker's batch) and the
    device options."""
    for name in DEVICE_OPTIONS:
        if name in kwargs:
            kwargs[name] = _per_worker(cls_name, name, kwargs[name], num_workers)
    if isinstance(frames_per_batch, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in frames_per_batch):
            raise ValueError(f"{cls_name}: frames_per_batch={list(frames_per_batch)!r}: each "
                             "worker's value must be a positive integer.")
        _one_per_worker(cls_name, "frames_per_batch", frames_per_batch, num_workers)
        frames_per_batch = sum(frames_per_batch)
    return frames_per_batch


class MultiSyncDataCollector(DataCollectorBase):
    """Every worker collects its share of ``frames_per_batch``; one batch is yielded per round.

    ``cat_results="stack"`` gives ``[num_workers, T]`` (``[num_workers, num_envs, T]``);
    ``cat_results=-1`` (or ``"cat"``) concatenates along time; ``0`` along the first dim
    (``[num_workers * num_envs, T]``, or as ``-1`` with one env per worker). Frames carry
    ``("collector", "worker_id")`` and ``("collector", "policy_version")``.

    Example:
        >>> from collectors import MultiSyncDataCollector
        >>> with MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=8,
        ...                             total_frames=8) as c:
        ...     print(next(iter(c)).batch_size)
        torch.Size([2, 4])
    """

    _multi = True

    def __init__(self, create_env_fn, policy=None, *, num_workers: int | None = None,
                 frames_per_batch: int | list, total_frames: int = -1, **kwargs):
        num_workers = _workers(create_env_fn, num_workers)
        each = frames_per_batch
        frames_per_batch = _lists(type(self).__name__, frames_per_batch, num_workers, kwargs)
        if isinstance(each, (list, tuple)) and len(set(each)) > 1:  # worker i collects each[i]
            if kwargs.get("cat_results") in (None, "stack") or (
                    kwargs.get("cat_results") == 0 and kwargs.get("num_envs", 1) > 1):
                raise ValueError(
                    f"{type(self).__name__}: frames_per_batch={list(each)!r} gives workers "
                    "batches of different lengths, which cannot be stacked (TorchRL fails on "
                    "the first batch). Pass cat_results=-1 to concatenate them along time, or "
                    "one value for every worker.")
            self._worker_frames = tuple(each)
        super().__init__(create_env_fn, policy, frames_per_batch=frames_per_batch,
                         total_frames=total_frames, num_workers=num_workers, **kwargs)
        self.cat_results = "stack" if self.options.cat_results is None else self.options.cat_results
        # 0 (TorchRL: torch.cat along dim 0) is "cat" when a worker's batch is [T]
        self._layout = "cat" if self.cat_results == 0 and self._width == 1 else self.cat_results
        self.preemptive_threshold = self.options.preemptive_threshold
        # TorchRL's shared stop flag; here the driver ends the slow workers' batches, so None
        self.interruptor = None


class MultiaSyncDataCollector(DataCollectorBase):
    """Every worker collects full batches; the iterator yields whichever is ready first.

    Workers keep stepping while the trainer trains, at most ``prefetch`` (default 1) batches
    ahead each, so memory stays bounded however slow the consumer is.
    """

    _multi = True
    _async = True

    def __init__(self, create_env_fn, policy=None, *, num_workers: int | None = None,
                 frames_per_batch: int | list, total_frames: int = -1, **kwargs):
        num_workers = _workers(create_env_fn, num_workers)
        frames_per_batch = _lists(type(self).__name__, frames_per_batch, num_workers, kwargs)
        super().__init__(create_env_fn, policy, frames_per_batch=frames_per_batch,
                         total_frames=total_frames, num_workers=num_workers, **kwargs)
