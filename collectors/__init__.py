"""ray-collectors: TorchRL's collector API on Ray actors.

>>> from collectors import SyncDataCollector
>>> for batch in SyncDataCollector("CartPole-v1", frames_per_batch=200, total_frames=1000):
...     pass

Names are imported lazily, so that ``collectors.testing`` or ``collectors.policies`` (which env
actors may unpickle) do not pull in tensordict.
"""
from importlib import import_module

_EXPORTS = {
    "DataCollectorBase": "collectors.base",
    "SyncDataCollector": "collectors.sync_collector",
    "MultiSyncDataCollector": "collectors.multi_collectors",
    "MultiaSyncDataCollector": "collectors.multi_collectors",
    "aSyncDataCollector": "collectors.async_collector",
    "RayReplayBuffer": "collectors.replay_buffer",
    "RayCollector": "collectors.ray_collector",
    "CollectorOptions": "actors.options",
    "CollectorError": "collectors.errors",
    "ConfigError": "collectors.errors",
    "EnvCreationError": "collectors.errors",
    "EnvRestartsExhausted": "collectors.errors",
    "EnvSpecError": "collectors.errors",
    "PolicyError": "collectors.errors",
    "PolicyOutputError": "collectors.errors",
    "PolicyWrapError": "collectors.errors",
    "RayCollectorsError": "collectors.errors",
    "ReplayBufferUnavailable": "collectors.errors",
    "StartupTimeout": "collectors.errors",
    "WeightSyncError": "collectors.errors",
    "DeploymentConfig": "collectors.config",
    "load_config": "collectors.config",
}
# TorchRL's current names.
_ALIASES = {
    "BaseCollector": "DataCollectorBase",
    "Collector": "SyncDataCollector",
    "MultiSyncCollector": "MultiSyncDataCollector",
    "MultiAsyncCollector": "MultiaSyncDataCollector",
    "AsyncCollector": "aSyncDataCollector",
}

__all__ = sorted([*_EXPORTS, *_ALIASES])


def __getattr__(name: str):
    target = _ALIASES.get(name, name)
    if target in _EXPORTS:
        value = getattr(import_module(_EXPORTS[target]), target)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'collectors' has no attribute {name!r}")


def __dir__():
    return __all__
