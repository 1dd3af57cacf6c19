"""``SyncDataCollector``: one env actor, batches gathered on request."""
from __future__ import annotations

from collectors.base import DataCollectorBase


class SyncDataCollector(DataCollectorBase):
    """Steps ``num_envs`` gymnasium envs in one Ray actor; yields TorchRL-layout batches.

    Nothing steps between a yield and the next request, so a weight update applies to the very
    next batch.

    Example:
        >>> from collectors import SyncDataCollector
        >>> with SyncDataCollector("CartPole-v1", frames_per_batch=4, total_frames=8, seed=0) as c:
        ...     for batch in c:
        ...         print(batch.batch_size, batch["next", "reward"].shape)
        torch.Size([4]) torch.Size([4, 1])
        torch.Size([4]) torch.Size([4, 1])
    """

    _layout = "single"
