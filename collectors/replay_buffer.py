"""``RayReplayBuffer``: a handle on a replay-buffer actor; picklable, so tasks and actors can
share it."""
from __future__ import annotations

import inspect
import os
import time
import uuid
from collections import deque

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.storage import replay_buffer as buffer_body
from actors.errors import unwrap
from actors.storage.samplers import SAMPLERS
from collectors.errors import ReplayBufferUnavailable
from collectors.local_sampler import LocalSampler
from collectors.sample_link import SampleLink
from collectors.runtime import buffer_gone, ensure_ray, kill_quietly, near_caller, wait_dead

# errors raised inside the buffer actor that are the caller's to handle, re-raised as themselves
CALLER_ERRORS = (TimeoutError, ValueError, TypeError, FileNotFoundError)  # CheckpointError too


class RayReplayBuffer:
    """A replay buffer hosted in a Ray actor.

    Args:
        capacity: frames held; older frames are overwritten (a ring).
        batch_size: default for ``sample()``.
        sampler: a name or a TorchRL sampler object (``RandomSampler``,
            ``SamplerWithoutReplacement``, ``PrioritizedSampler``, ``SliceSampler``, mapped onto
            ours); ``"random"`` (uniform with replacement), ``"without_replacement"`` (epochs),
            ``"prioritized"`` or ``"slice"``.
        alpha: prioritized sampler: priority exponent (0 is uniform).
        beta: prioritized sampler: importance-weight exponent (``priority_weight`` in samples).
        eps: prioritized sampler: added to every priority, so none is zero.
        slice_len: slice sampler: frames per slice (give it or ``num_slices``).
        num_slices: slice sampler: slices per batch (``batch_size / num_slices`` frames each).
        drop_last: sampler without replacement: skip an epoch's last, short batch and start the
            next epoch.
        min_size: frames needed before ``sample()`` returns.
        samples_per_insert: Reverb's rate limiter: samples allowed per inserted frame
            (``None``: no limit).
        error_buffer: the band around ``samples_per_insert`` within which neither side waits
            (a band that could deadlock is refused).
        checkpoint_dir: restore from it at start (and after a crash), and write checkpoints
            there.
        checkpoint_every: ``k > 0``: a checkpoint every ``k`` batches from collectors (on a
            thread of the actor); 0: only when ``checkpoint()`` is called.
        prefetch: ``k`` (``True`` is 1): ``sample()`` fetches ``k`` batches per actor call and
            keeps the next call in flight, so a training loop rarely waits on a round trip.
            Batches are then drawn up to ``2k`` steps ahead (with ``"prioritized"``, before the
            latest ``update_priority``); ``False`` draws each batch when asked. Not used while
            sampling locally.
        timeout_s: default bound of every blocking call.
        max_restarts: how often Ray restarts a dead buffer actor (``None``: forever with a
            ``checkpoint_dir``, to restore from it; else never; ``-1``: forever).
        seed: seeds the samplers (the actor's and the local one), for reproducible samples.
        local_sampling: with the uniform sampler and no ``samples_per_insert``, the storage
            lives in shared memory and a process on the buffer's node samples it directly,
            without a call to the actor (compact storage included: it rebuilds next values and
            stacks itself). Other samples (prioritized, slices, rate limits) a process on the
            node gets through a shared-memory slot the actor writes them into, not the object
            store (without ``prefetch``). ``None``: whenever possible; ``False``: always call.
        compact_obs: store each observation once (TorchRL's name). ``("next", obs)`` is rebuilt
            at sample time from the following slot of the same trajectory; the next
            observations that slot does not hold (episode ends, the last frame of each write)
            are kept apart, so samples equal those of the plain storage. Halves the memory of
            pixel observations.
            ``"frames"``: as ``True``, and stacked observations (``[S, ...]`` from gymnasium's
            ``FrameStackObservation``, e.g. Pong's ``[4, 84, 84]``) also store each frame once:
            a slot keeps its newest frame and the stack is rebuilt from the slots before it
            where the data shows it is the previous stack shifted (the rest is kept whole).
            About a quarter of ``True``'s memory for 4-frame stacks.
        name: names the actor ``<name>/replay-buffer`` (default: a fresh unique name); a
            collector writing to it names its batches after itself.
        num_shards: ``N > 1``: N buffer actors (shards), each with ``capacity / N`` frames, its
            own sampler and checkpoint (``checkpoint_dir/shard-<i>``), placed one per node on a
            cluster and all on this node on one machine (``placement.shards`` in the config).
            Collectors write each batch into the shard on its env actor's node (else one picked
            by a stable hash); ``sample`` draws from the shards in proportion to their sizes
            (prioritized: their total priority), so it stays uniform over every stored frame;
            slices never span shards; ``len``, ``write_count`` and ``info()`` add up, with
            each shard's figures under ``info()["shards"]``. Not with ``prefetch``,
            ``samples_per_insert`` or ``sampler="without_replacement"`` (refused).
        config: the deployment config (a path, a dict or a ``DeploymentConfig``; default
            ``configs/local.yaml``'s settings): where Ray runs and ``resources.replay_buffer``
            (CPUs, a node to pin the actor to).

    Example:
        >>> rb = RayReplayBuffer(10_000, batch_size=256)
        >>> with SyncDataCollector("CartPole-v1", frames_per_batch=500, total_frames=1000,
        ...                        replay_buffer=rb) as c:
        ...     for _ in c:         # yields None: batches go straight to the buffer actor
        ...         pass
        >>> len(rb), rb.write_count
        (1000, 1000)
    """

    def __new__(cls, *args, num_shards: int = 1, **kwargs):
        if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
            raise ValueError(f"num_shards must be an int >= 1 (buffer actors); got {num_shards!r}.")
        if cls is RayReplayBuffer and num_shards != 1:
            from collectors.sharded_buffer import ShardedReplayBuffer

            return super().__new__(ShardedReplayBuffer)
        return super().__new__(cls)

    def __init__(self, capacity: int, *, batch_size: int | None = None, sampler: str = "random",
                 alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-8,
                 slice_len: int | None = None, num_slices: int | None = None,
                 drop_last: bool = False, min_size: int = 0,
                 samples_per_insert: float | None = None, error_buffer: float | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 prefetch: bool | int = False, timeout_s: float = 30.0, max_restarts: int | None = None,
                 seed: int | None = None, local_sampling: bool | None = None,
                 compact_obs: bool | str = False, name: str | None = None, num_shards: int = 1,
                 config=None, _actor=None, _options: dict | None = None):
        del num_shards  # 1 here: __new__ made a ShardedReplayBuffer for more
        self.name = name or f"ReplayBuffer-{uuid.uuid4().hex[:6]}"
        self.capacity = capacity
        self.batch_size = batch_size
        if not isinstance(prefetch, int) or prefetch < 0:  # bool is an int: True means 1
            raise ValueError(f"prefetch must be a bool or an int >= 0 (batches per call); "
                             f"got {prefetch!r}.")
        self.prefetch = int(prefetch)
        self.timeout_s = timeout_s
        self._ready: deque = deque()  # prefetched batches (arrays), oldest first
        self._pending = None  # the call in flight for the next ``prefetch`` batches
        self._pending_n = None
        torchrl_kwargs = {}
        if not isinstance(sampler, str):  # a TorchRL sampler object: its settings become ours
            from collectors.torchrl_samplers import from_torchrl

            sampler, torchrl_kwargs = from_torchrl(sampler, capacity)
            alpha = torchrl_kwargs.get("alpha", alpha)
            beta = torchrl_kwargs.get("beta", beta)
            eps = torchrl_kwargs.get("eps", eps)
            slice_len = torchrl_kwargs.get("slice_len", slice_len)
            num_slices = torchrl_kwargs.get("num_slices", num_slices)
            drop_last = torchrl_kwargs.get("drop_last", drop_last)
        if not (isinstance(compact_obs, bool) or (isinstance(compact_obs, str) and compact_obs == "frames")):
            raise TypeError(f"compact_obs must be a bool or 'frames' (each frame of stacked "
                            f"observations stored once); got {compact_obs!r}.")
        self.compact_obs = compact_obs
        self.sampler_name, self.beta, self.slice_spec = sampler, beta, (slice_len, num_slices)
        can_share = sampler == "random" and samples_per_insert is None
        if local_sampling and not can_share:
            raise ValueError(
                "local_sampling=True needs sampler='random' and no samples_per_insert (the "
                f"actor decides those samples); got sampler={sampler!r}, samples_per_insert="
                f"{samples_per_insert!r}. Leave local_sampling=None to pick automatically.")
        self._share = can_share if local_sampling is None else bool(local_sampling)
        self._local = None
        self._link: SampleLink | None = None  # samples the actor draws, through shared memory
        if _actor is not None:
            self.actor = _actor
            self._local = LocalSampler(self.actor, self.name, seed) if self._share else None
            self._link = SampleLink(self.actor, self.name) if local_sampling is not False else None
            return
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int; got {capacity!r}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}; got {sampler!r}.")
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (nothing waits forever); got {timeout_s!r}.")
        buffer_body.RateLimiter(min_size, samples_per_insert, error_buffer)  # rejects deadlocking bands now
        if checkpoint_dir is not None:
            from actors.storage.checkpoints import check_claimable

            check_claimable(os.path.abspath(checkpoint_dir))  # a foreign directory: refused here
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool; got {drop_last!r}.")
        if drop_last and sampler != "without_replacement":
            raise ValueError(f"drop_last is for sampler='without_replacement'; got it with "
                             f"sampler={sampler!r}. Remove it or change the sampler.")
        kwargs = {}
        if sampler == "without_replacement":
            kwargs = {"drop_last": drop_last}
        elif sampler == "prioritized":
            kwargs = {"alpha": alpha, "beta": beta, "eps": eps}
        elif sampler == "slice":
            kwargs = {"slice_len": slice_len, "num_slices": num_slices}
            SAMPLERS["slice"](1, 0, **kwargs)  # validates now
        from collectors.config import load_config

        cfg = load_config(config)
        ensure_ray(**cfg.ray_init_kwargs())
        options = near_caller(cfg.resources.replay_buffer.options()) if _options is None else _options
        restarts = max_restarts if max_restarts is not None else (-1 if checkpoint_dir else 0)
        self.actor = ray.remote(buffer_body.ReplayBufferActor).options(
            name=f"{self.name}/replay-buffer", max_concurrency=8, max_restarts=restarts,
            **options).remote(
            capacity, sampler=sampler, batch_size=batch_size, sampler_kwargs=kwargs,
            min_size=min_size, samples_per_insert=samples_per_insert, error_buffer=error_buffer,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, seed=seed,
            default_timeout_s=timeout_s, name=self.name, share=self._share,
            compact_obs=compact_obs)
        self._local = LocalSampler(self.actor, self.name, seed) if self._share else None
        self._link = SampleLink(self.actor, self.name) if local_sampling is not False else None
        self._call("ready")

    @classmethod
    def from_checkpoint(cls, path: str, capacity: int | None = None, **kwargs) -> "RayReplayBuffer":
        """A new buffer restored from a checkpoint written by :meth:`checkpoint`."""
        from actors.storage.checkpoints import current_meta

        if os.path.exists(os.path.join(path, "shards.json")):  # written by a sharded buffer
            from collectors.sharded_buffer import ShardedReplayBuffer

            return ShardedReplayBuffer.from_checkpoint(path, capacity, **kwargs)
        meta = current_meta(path)
        kwargs.setdefault("sampler", meta["sampler"])
        compact = meta.get("compact")
        kwargs.setdefault("compact_obs", compact is not None and ("frames" if "frames" in compact else True))
        rb = cls(capacity or meta["capacity"], **kwargs)
        rb._call("load_checkpoint", os.path.abspath(path))
        return rb

    def __reduce__(self):
        return (_rebuild, (self.actor, self.name, self.batch_size, self.timeout_s, self._share,
                           self.capacity, self.compact_obs, self._link is not None))

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
                raise buffer_gone(self.name, exc) from None
            except ray.exceptions.RayTaskError as exc:
                if isinstance(unwrap(exc), CALLER_ERRORS):
                    raise unwrap(exc) from None
                raise

    # -- data --------------------------------------------------------------------------------
    def extend(self, td, batch_id=None) -> int:
        """Write frames; returns how many were written. Each call carries a batch id (a fresh
        one when none is given), so a retry while the actor restarts stores nothing twice.
        Frames on a GPU (``storing_device="cuda"``) are stored from a CPU copy."""
        device = getattr(td, "device", None)
        if hasattr(td, "cpu") and (device is None or device.type != "cpu"):
            td = td.cpu()  # (no copy of leaves already on the CPU)
        return self._call("extend", td, batch_id or (self.name, "extend", uuid.uuid4().hex))

    def add(self, td) -> int:
        return self.extend(td.unsqueeze(0) if td.batch_dims == 0 else td)

    def sample(self, batch_size: int | None = None, timeout: float | None = None):
        """A TensorDict of ``batch_size`` frames (with ``index``, and ``priority_weight`` if
        prioritized, as TorchRL's losses read it)."""
        n = batch_size or self.batch_size
        timeout = self.timeout_s if timeout is None else timeout
        if not n:
            raise ValueError("sample() needs a batch_size (here or at construction).")
        if self._local is not None:  # same node: straight from the shared storage
            out = self._local.sample(n, timeout)
            if out is not None:
                return out
        if self._link is not None and not self.prefetch:  # same node: the actor's sample, by slot
            out = self._link.sample(n, timeout)
            if out is not None:
                return out
        try:
            if not self.prefetch:
                arrays = self._call("sample_arrays", n, timeout, timeout=timeout + 5)[0]
                return _to_tensordict(arrays, n)
            if self._pending_n != n:  # another batch size: drop what was drawn ahead
                self._drop_prefetched()
            if not self._ready:
                if self._pending is None:
                    self._pending = self.actor.sample_arrays.remote(n, timeout, self.prefetch)
                ref, self._pending_n = self._pending, n
                self._pending = None
                self._ready.extend(ray.get(ref, timeout=timeout + 5))
                self._pending = self.actor.sample_arrays.remote(n, timeout, self.prefetch)
            return _to_tensordict(self._ready.popleft(), n)
        except ray.exceptions.RayTaskError as exc:
            self._pending = None
            if isinstance(unwrap(exc), CALLER_ERRORS):
                raise unwrap(exc) from None
            raise
        except RayActorError as exc:
            self._pending = None
            raise buffer_gone(self.name, exc) from None

    def update_priority(self, index, priority) -> None:
        self._call("update_priority", index, priority)

    def update_tensordict_priority(self, td, priority_key="td_error") -> None:
        """TorchRL's: set the priorities of the frames of a sampled ``td`` (its ``"index"``)
        from ``td[priority_key]``, reduced with ``max`` over any trailing dimensions."""
        index = td.get("index")
        priority = td.get(priority_key).detach()
        while priority.ndim > index.ndim:
            priority = priority.amax(-1)
        self.update_priority(index.reshape(-1), priority.reshape(-1).to("cpu"))

    def __len__(self) -> int:
        return self._call("length")

    @property
    def write_count(self) -> int:
        return self.info()["write_count"]

    def info(self) -> dict:
        sampled = 0
        if self._local is not None:
            sampled, self._local.unreported = self._local.unreported, 0
        # (link_samples: samples this handle got through the shared-memory link)
        return {**self._call("info", sampled),
                "link_samples": self._link.samples if self._link is not None else 0}

    def stats(self) -> dict:
        """The same figures as :meth:`info` (TorchRL users look for ``stats``)."""
        return self.info()

    def write_target(self):
        """The buffer actor: collectors write each batch into it."""
        return self.actor

    def batch_ids(self) -> list:
        return self._call("batch_ids")

    def _drop_prefetched(self) -> None:
        self._ready.clear()
        self._pending = self._pending_n = None

    def empty(self) -> None:
        self._drop_prefetched()
        self._call("empty")

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, state: dict) -> None:
        self._drop_prefetched()
        self._call("load_state_dict", state)

    def checkpoint(self, path: str) -> str:
        return self._call("checkpoint", path, timeout=600)

    def shutdown(self) -> None:
        """Stop the actor and wait until it is gone (idempotent)."""
        if self._local is not None:
            self._local.close()
        if self._link is not None:
            self._link.close()
        try:  # removes its shared-memory files; a hung or dead actor is killed all the same
            ray.get(self.actor.close.remote(), timeout=2)
        except Exception:  # noqa: BLE001
            pass
        kill_quietly(self.actor)
        wait_dead([self.actor], time.monotonic() + 10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __repr__(self) -> str:
        return f"RayReplayBuffer(name={self.name!r})"


# what help() and inspect show: __init__'s arguments (not __new__'s, which only picks the class)
RayReplayBuffer.__signature__ = inspect.signature(RayReplayBuffer.__init__).replace(
    parameters=list(inspect.signature(RayReplayBuffer.__init__).parameters.values())[1:])


def _to_tensordict(arrays: dict, n: int):
    from collectors.batch import frames_tensordict

    return frames_tensordict(arrays, [n])


def _rebuild(actor, name, batch_size, timeout_s, share=False, capacity=0, compact_obs=False,
             link=False):
    rb = RayReplayBuffer(capacity, name=name, batch_size=batch_size, timeout_s=timeout_s,
                         local_sampling=share, compact_obs=compact_obs, _actor=actor)
    rb._link = SampleLink(actor, name) if link else None
    return rb
