"""ray-collectors: TorchRL's collector API on Ray actors.

>>> from collectors import SyncDataCollector
>>> for batch in SyncDataCollector("CartPole-v1", frames_per_batch=200, total_frames=1000):
...     pass
"""
from collectors.base import DataCollectorBase
from collectors.config import DeploymentConfig, load_config
from collectors.errors import CollectorError, ConfigError, EnvCreationError, ReplayBufferUnavailable
from collectors.multi import MultiaSyncDataCollector, MultiSyncDataCollector
from collectors.sync import SyncDataCollector
from actors.policy import PolicyOutputError

# TorchRL's current names.
BaseCollector = DataCollectorBase
Collector = SyncDataCollector
MultiSyncCollector = MultiSyncDataCollector
MultiAsyncCollector = MultiaSyncDataCollector

__all__ = [
    "DataCollectorBase", "SyncDataCollector", "MultiSyncDataCollector", "MultiaSyncDataCollector",
    "BaseCollector", "Collector", "MultiSyncCollector", "MultiAsyncCollector",
    "CollectorError", "ConfigError", "EnvCreationError", "ReplayBufferUnavailable",
    "PolicyOutputError", "DeploymentConfig", "load_config",
]
