"""Named exceptions of the public API."""


class CollectorError(RuntimeError):
    """Collection cannot go on: a worker kept failing, or user code (the policy) raised.

    ``worker`` is the failing worker's index (or ``None``); the message carries the count and
    the last error with its traceback.
    """

    def __init__(self, message: str, worker: int | None = None):
        super().__init__(message)
        self.worker = worker


class EnvCreationError(ValueError):
    """The env could not be created from ``create_env_fn`` (unknown id, factory raised...)."""


class ConfigError(ValueError):
    """A deployment config has an unknown key, a wrong type or an impossible request."""


class ReplayBufferUnavailable(RuntimeError):
    """The replay-buffer actor is gone and could not be restored in time."""
