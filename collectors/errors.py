"""The public exceptions (defined in ``actors.errors``, the lowest layer, and re-exported)."""
from actors.errors import (CollectorError, ConfigError, EnvCreationError, EnvRestartsExhausted,
                           EnvSpecError, EnvStepError, PolicyError, PolicyOutputError,
                           PolicyWrapError, RayCollectorsError, ReplayBufferUnavailable, StartupTimeout,
                           WeightSyncError)

__all__ = ["CollectorError", "ConfigError", "EnvCreationError", "EnvRestartsExhausted",
           "EnvSpecError", "EnvStepError", "PolicyError", "PolicyOutputError",
           "PolicyWrapError", "RayCollectorsError", "ReplayBufferUnavailable", "StartupTimeout",
           "WeightSyncError"]
