"""``aSyncDataCollector``: one env actor that collects in the background."""
from __future__ import annotations

from collectors.base import DataCollectorBase


class aSyncDataCollector(DataCollectorBase):  # noqa: N801 - TorchRL's legacy name
    """One env actor that keeps collecting while the trainer trains.

    Iterating yields each batch as it is ready (the actor works one batch ahead). With
    ``replay_buffer=rb`` and :meth:`start`, the driver actor streams batches into the buffer
    actor on its own, outside the trainer's process and GIL, until ``total_frames`` or
    :meth:`async_shutdown`.

    Example:
        >>> rb = RayReplayBuffer(100_000, batch_size=256)
        >>> c = aSyncDataCollector("CartPole-v1", frames_per_batch=500, total_frames=5000,
        ...                        replay_buffer=rb)
        >>> c.start()
        >>> batch = rb.sample()     # while collection runs
        >>> c.async_shutdown()
    """

    _async = True
