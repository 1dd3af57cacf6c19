"""Every exception of ray-collectors, at the lowest layer so actors raise the public types.

``collectors`` re-exports the public ones. Ray wraps an exception raised inside an actor in a
``RayTaskError`` whose ``cause`` is the original object; :func:`unwrap` gives it back, so callers
test with ``isinstance``, never by name. Each type pickles with its attributes (``__reduce__``).
"""
from __future__ import annotations

import traceback


class RayCollectorsError(Exception):
    """Base of every error this library raises on purpose."""


class CollectorError(RayCollectorsError, RuntimeError):
    """Collection cannot go on: a worker kept failing, or user code (the policy) raised.

    ``worker`` is the failing worker's index (or ``None``); the message carries the count and
    the last error with its traceback. ``original``: the policy's own exception when it raised
    inside a worker (the collector re-raises that one, with this error as its context).
    """

    def __init__(self, message: str, worker: int | None = None,
                 original: BaseException | None = None):
        super().__init__(message)
        self.worker = worker
        self.original = original

    def __reduce__(self):
        return (type(self), (self.args[0], self.worker, _picklable(self.original)))


def _picklable(exc: BaseException | None) -> BaseException | None:
    """``exc`` if it survives pickling (Ray sends errors between processes), else ``None``."""
    if exc is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception holding unpicklable state
        return None
    return exc


class StartupTimeout(CollectorError, TimeoutError):
    """Env workers (or their placement group) did not come up within the allowed time."""


class EnvCreationError(RayCollectorsError, ValueError):
    """The env could not be created from ``create_env_fn`` (unknown id, factory raised...)."""


class ConfigError(RayCollectorsError, ValueError):
    """A deployment config has an unknown key, a wrong type or an impossible request."""


class ReplayBufferUnavailable(RayCollectorsError, RuntimeError):
    """The replay-buffer actor is gone and could not be restored in time."""


class FatalWorkerError(RayCollectorsError):
    """Raised inside an env worker for a failure that a restart cannot cure: not retried."""


class PolicyError(FatalWorkerError, RuntimeError):
    """The user's policy raised inside the worker: a bug to report, not a crash to retry.
    Raised ``from`` the policy's exception, which travels with it (``original``)."""

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(message)
        self._original = original

    @property
    def original(self) -> BaseException | None:
        return self._original if self._original is not None else self.__cause__

    def __reduce__(self):
        return (type(self), (self.args[0], _picklable(self.original)))


class PolicyOutputError(FatalWorkerError, ValueError):
    """The policy produced an output that does not fit the action space or its own spec."""


class PolicyWrapError(PolicyOutputError, TypeError):
    """A plain ``nn.Module`` policy whose ``forward`` arguments name no observation the env
    has: it cannot be wrapped (a ``TypeError``, as TorchRL's)."""


class EnvSpecError(FatalWorkerError, ValueError):
    """The env returned data that does not match its declared spaces (or is not finite)."""


class WeightSyncError(FatalWorkerError, RuntimeError):
    """The weights in shared memory cannot be loaded (the actor's policy differs from the
    trainer's, or the board stayed mid-write): not cured by a restart."""


class EnvRestartsExhausted(FatalWorkerError, RuntimeError):
    """An env kept failing: more restarts than allowed within the window."""


class EnvStepError(RayCollectorsError, RuntimeError):
    """``env.step`` or ``env.reset`` raised; carries which env, its seed and the traceback."""

    def __init__(self, env_index: int, seed, phase: str, cause: BaseException | str):
        self.env_index = env_index
        self.seed = seed
        self.phase = phase
        if isinstance(cause, BaseException):
            self.tb = "".join(traceback.format_exception(cause))
            text = repr(cause)
        else:
            self.tb, text = cause, cause.strip().splitlines()[-1] if cause.strip() else ""
        super().__init__(f"env {env_index} (seed {seed}) raised in {phase}: {text}")

    def __reduce__(self):
        return (_rebuild_env_error, (self.args[0], self.env_index, self.seed, self.phase, self.tb))


def _rebuild_env_error(message, env_index, seed, phase, tb):
    err = EnvStepError.__new__(EnvStepError)
    RuntimeError.__init__(err, message)
    err.env_index, err.seed, err.phase, err.tb = env_index, seed, phase, tb
    return err


def unwrap(exc: BaseException) -> BaseException:
    """The exception raised inside an actor, out of Ray's ``RayTaskError`` wrapper(s)."""
    from ray.exceptions import RayTaskError

    for _ in range(8):  # nested actor calls wrap once per hop
        if not isinstance(exc, RayTaskError) or exc.cause is None:
            break
        exc = exc.cause
    return exc
