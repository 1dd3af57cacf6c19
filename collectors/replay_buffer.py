"""``RayReplayBuffer``: a handle on a replay-buffer actor; picklable, so tasks and actors can
share it."""
from __future__ import annotations

import time
import uuid

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.buffer import ReplayBufferActor, RateLimiter
from actors.samplers import SAMPLERS
from collectors.errors import ReplayBufferUnavailable
from collectors.runtime import ensure_ray, kill_quietly, wait_dead


class RayReplayBuffer:
    """A replay buffer hosted in a Ray actor.

    Args:
        capacity: frames held; older frames are overwritten (a ring).
        batch_size: default for ``sample()``.
        sampler: ``"random"`` (uniform with replacement), ``"without_replacement"`` (epochs),
            ``"prioritized"`` (``alpha``, ``beta``, ``eps``) or ``"slice"`` (``slice_len`` or
            ``num_slices``).
        min_size: frames needed before ``sample()`` returns.
        samples_per_insert, error_buffer: Reverb's sample-to-insert rate limiter.
        checkpoint_dir: restore from it at start (and after a crash); with
            ``checkpoint_every=k`` a checkpoint is written every k batches from collectors.
        prefetch: ``sample()`` keeps the next sample in flight.
        timeout_s: default bound of every blocking call.

    Example:
        >>> rb = RayReplayBuffer(10_000, batch_size=256)
        >>> with SyncDataCollector("CartPole-v1", frames_per_batch=500, total_frames=1000,
        ...                        replay_buffer=rb) as c:
        ...     for _ in c:         # yields None: batches go straight to the buffer actor
        ...         pass
        >>> len(rb), rb.write_count
        (1000, 1000)
    """

    def __init__(self, capacity: int, *, batch_size: int | None = None, sampler: str = "random",
                 alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-8,
                 slice_len: int | None = None, num_slices: int | None = None, min_size: int = 0,
                 samples_per_insert: float | None = None, error_buffer: float | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 prefetch: bool = False, timeout_s: float = 30.0, max_restarts: int | None = None,
                 seed: int | None = None, name: str | None = None, config=None, _actor=None):
        self.name = name or f"ReplayBuffer-{uuid.uuid4().hex[:6]}"
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.timeout_s = timeout_s
        self._pending = None
        self._pending_n = None
        if _actor is not None:
            self.actor = _actor
            return
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int; got {capacity!r}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}; got {sampler!r}.")
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (nothing waits forever); got {timeout_s!r}.")
        RateLimiter(min_size, samples_per_insert, error_buffer)  # rejects deadlocking bands now
        kwargs = {}
        if sampler == "prioritized":
            kwargs = {"alpha": alpha, "beta": beta, "eps": eps}
        elif sampler == "slice":
            kwargs = {"slice_len": slice_len, "num_slices": num_slices}
            SAMPLERS["slice"](1, 0, **kwargs)  # validates now
        from collectors.config import load_config

        cfg = load_config(config)
        ensure_ray(**cfg.ray_init_kwargs())
        options = cfg.resources.replay_buffer.options()
        restarts = max_restarts if max_restarts is not None else (-1 if checkpoint_dir else 0)
        self.actor = ray.remote(ReplayBufferActor).options(
            name=f"{self.name}/replay-buffer", max_concurrency=8, max_restarts=restarts,
            **options).remote(
            capacity, sampler=sampler, batch_size=batch_size, sampler_kwargs=kwargs,
            min_size=min_size, samples_per_insert=samples_per_insert, error_buffer=error_buffer,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, seed=seed,
            default_timeout_s=timeout_s, name=self.name)
        self._call("ready")

    @classmethod
    def from_checkpoint(cls, path: str, capacity: int | None = None, **kwargs) -> "RayReplayBuffer":
        """A new buffer restored from a checkpoint written by :meth:`checkpoint`."""
        import json
        import os

        with open(os.path.join(path, "meta.json")) as fh:
            meta = json.load(fh)
        kwargs.setdefault("sampler", meta["sampler"])
        rb = cls(capacity or meta["capacity"], **kwargs)
        rb._call("load_checkpoint", os.path.abspath(path))
        return rb

    def __reduce__(self):
        return (_rebuild, (self.actor, self.name, self.batch_size, self.timeout_s))

    def _call(self, method: str, *args, timeout: float | None = None, **kwargs):
        """Call the actor; while it restarts (from its checkpoint), retry until the timeout."""
        deadline = time.monotonic() + (timeout or self.timeout_s + 5)
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args, **kwargs),
                               timeout=max(0.1, deadline - time.monotonic()))
            except ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise ReplayBufferUnavailable(
                        f"replay buffer {self.name!r} did not come back within the timeout.") from None
                time.sleep(0.2)
                continue
            except RayActorError as exc:
                raise ReplayBufferUnavailable(
                    f"replay buffer {self.name!r} is gone ({exc.__class__.__name__}); configure "
                    "checkpoint_dir for restarts.") from None
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, (TimeoutError, ValueError, TypeError, FileNotFoundError)):
                    raise exc.cause from None
                raise

    # -- data --------------------------------------------------------------------------------
    def extend(self, td, batch_id=None) -> int:
        return self._call("extend", td, batch_id)

    def add(self, td) -> int:
        return self._call("extend", td.unsqueeze(0) if td.batch_dims == 0 else td)

    def sample(self, batch_size: int | None = None, timeout: float | None = None):
        """A TensorDict of ``batch_size`` frames (with ``index``, and ``_weight`` if prioritized)."""
        n = batch_size or self.batch_size
        timeout = self.timeout_s if timeout is None else timeout
        if self.prefetch:
            if self._pending is None or self._pending_n != n:
                self._pending = self.actor.sample_arrays.remote(n, timeout)
            ref = self._pending
            self._pending = self.actor.sample_arrays.remote(n, timeout)
            self._pending_n = n
        else:
            ref = self.actor.sample_arrays.remote(n, timeout)
        try:
            arrays = ray.get(ref, timeout=timeout + 5)
            return _to_tensordict(arrays, n)
        except ray.exceptions.RayTaskError as exc:
            self._pending = None
            if isinstance(exc.cause, (TimeoutError, ValueError)):
                raise exc.cause from None
            raise
        except RayActorError:
            raise ReplayBufferUnavailable(f"replay buffer {self.name!r} is gone.") from None

    def update_priority(self, index, priority) -> None:
        self._call("update_priority", index, priority)

    def __len__(self) -> int:
        return self._call("length")

    @property
    def write_count(self) -> int:
        return self.info()["write_count"]

    def info(self) -> dict:
        return self._call("info")

    def batch_ids(self) -> list:
        return self._call("batch_ids")

    def empty(self) -> None:
        self._call("empty")

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, state: dict) -> None:
        self._call("load_state_dict", state)

    def checkpoint(self, path: str) -> str:
        return self._call("checkpoint", path, timeout=600)

    def shutdown(self) -> None:
        """Stop the actor and wait until it is gone (idempotent)."""
        kill_quietly(self.actor)
        wait_dead([self.actor], time.monotonic() + 10)

    def __repr__(self) -> str:
        return f"RayReplayBuffer(name={self.name!r})"


def _to_tensordict(arrays: dict, n: int):
    import numpy as np
    import torch
    from tensordict import TensorDict

    from collectors.batch import _nest

    return TensorDict(_nest({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}),
                      batch_size=[n])


def _rebuild(actor, name, batch_size, timeout_s):
    return RayReplayBuffer(0, name=name, batch_size=batch_size, timeout_s=timeout_s, _actor=actor)
