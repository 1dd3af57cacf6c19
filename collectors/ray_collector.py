"""``RayCollector``: TorchRL's Ray collector's argument names, mapped onto our collectors.

TorchRL's ``RayCollector`` runs ``num_collectors`` remote collectors and gathers them in sync
(``torch.stack`` of their rollouts) or async order. Here each of them is one env actor: the
result is a ``MultiSyncDataCollector`` (``sync=True``) or a ``MultiaSyncDataCollector``.

Example:
    >>> c = RayCollector("CartPole-v1", frames_per_batch=200, num_collectors=2, sync=True)
    >>> c.next().batch_size
    torch.Size([2, 100])
"""
from __future__ import annotations

import ray

REMOTE_KEYS = ("num_cpus", "num_gpus", "resources", "memory")


def RayCollector(create_env_fn, policy=None, *, frames_per_batch: int, total_frames: int = -1,  # noqa: N802
                 num_collectors: int | None = None, sync: bool = False,
                 ray_init_config: dict | None = None, remote_configs: dict | None = None,
                 collector_class=None, collector_kwargs: dict | None = None,
                 num_workers_per_collector: int = 1, update_after_each_batch: bool = False,
                 max_weight_update_interval: int = -1, use_env_creator: bool = False, **kwargs):
    """Build our multi collector from TorchRL ``RayCollector`` arguments (see the module doc).

    ``ray_init_config`` starts Ray with those arguments when it is not running yet;
    ``remote_configs`` (``num_cpus``, ``num_gpus``, ``resources``) size each env actor;
    ``collector_kwargs`` are merged into the keyword arguments; ``update_after_each_batch`` is
    ``update_at_each_batch``. Values that would need TorchRL's own remote collectors
    (another ``collector_class``, ``num_workers_per_collector > 1``, a
    ``max_weight_update_interval``) raise ``NotImplementedError``.
    """
    from collectors.multi_collectors import MultiaSyncDataCollector, MultiSyncDataCollector

    if collector_class is not None and getattr(collector_class, "__name__", "") not in (
            "Collector", "SyncDataCollector"):
        raise NotImplementedError(f"collector_class={collector_class!r}: each remote collector "
                                  "here is one env actor (TorchRL's Collector semantics).")
    if num_workers_per_collector != 1:
        raise NotImplementedError(
            f"num_workers_per_collector={num_workers_per_collector}: use num_envs for several "
            "envs per actor, or more num_collectors.")
    if max_weight_update_interval not in (-1, None):
        raise NotImplementedError("max_weight_update_interval: weights follow the trainer's "
                                  "policy before every batch here (auto_sync_weights).")
    if not isinstance(use_env_creator, bool):
        raise TypeError(f"use_env_creator must be a bool; got {use_env_creator!r}.")
    extra = dict(collector_kwargs or {})
    clash = set(extra) & set(kwargs)
    if clash:
        raise ValueError(f"collector_kwargs repeat keyword arguments {sorted(clash)}.")
    kwargs.update(extra)
    for key, value in (remote_configs or {}).items():
        if key not in REMOTE_KEYS:
            raise NotImplementedError(f"remote_configs[{key!r}]: only {REMOTE_KEYS} are applied.")
        if key == "memory":
            raise NotImplementedError("remote_configs['memory']: set it in the deployment config "
                                      "(resources.env_worker.memory).")
        kwargs[key] = value
    if num_collectors is None:
        num_collectors = len(create_env_fn) if isinstance(create_env_fn, (list, tuple)) else 1
    if sync and frames_per_batch % num_collectors:
        raise ValueError(f"frames_per_batch={frames_per_batch} must be divisible by "
                         f"num_collectors={num_collectors} with sync=True (as TorchRL's RayCollector).")
    if ray_init_config and not ray.is_initialized():
        ray.init(**ray_init_config)
    cls = MultiSyncDataCollector if sync else MultiaSyncDataCollector
    return cls(create_env_fn, policy, num_workers=num_collectors, frames_per_batch=frames_per_batch,
               total_frames=total_frames, update_at_each_batch=update_after_each_batch, **kwargs)
