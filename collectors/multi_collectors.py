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


class MultiSyncDataCollector(DataCollectorBase):
    """Every worker collects its share of ``frames_per_batch``; one batch is yielded per round.

    ``cat_results="stack"`` gives ``[num_workers, T]`` (``[num_workers, num_envs, T]``);
    ``cat_results=-1`` (or ``"cat"``) concatenates along time. Frames carry
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
                 frames_per_batch: int, total_frames: int = -1, **kwargs):
        super().__init__(create_env_fn, policy, frames_per_batch=frames_per_batch,
                         total_frames=total_frames, num_workers=_workers(create_env_fn, num_workers),
                         **kwargs)
        self.cat_results = self.options.cat_results or "stack"
        self._layout = self.cat_results


class MultiaSyncDataCollector(DataCollectorBase):
    """Every worker collects full batches; the iterator yields whichever is ready first.

    Workers keep stepping while the trainer trains, at most ``prefetch`` (default 1) batches
    ahead each, so memory stays bounded however slow the consumer is.
    """

    _multi = True
    _async = True

    def __init__(self, create_env_fn, policy=None, *, num_workers: int | None = None,
                 frames_per_batch: int, total_frames: int = -1, **kwargs):
        super().__init__(create_env_fn, policy, frames_per_batch=frames_per_batch,
                         total_frames=total_frames, num_workers=_workers(create_env_fn, num_workers),
                         **kwargs)
