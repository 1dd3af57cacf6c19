"""``DataCollectorBase``: what every collector shares (driver actor, iteration, weights, stats)."""
from __future__ import annotations

import contextlib
import math
import time
import uuid
import weakref

import ray
import torch
from ray.exceptions import ObjectLostError, RayTaskError

from actors.driver import Driver, WorkerFailure
from collectors import validate
from collectors.batch import assemble, mark_truncated, split_trajectories
from collectors.shipping import ship_by_value
from collectors.errors import CollectorError, EnvCreationError, ReplayBufferUnavailable
from collectors.runtime import ensure_ray, kill_quietly as _kill_quietly, near_caller
from collectors.runtime import wait_dead as _wait_dead


def _ray_get(ref, timeout=None):
    """``ray.get`` that turns a worker failure inside the driver into ``CollectorError``."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, WorkerFailure):
            if cause.kind == "buffer":
                raise ReplayBufferUnavailable(str(cause)) from None
            if cause.kind == "init":
                raise EnvCreationError(str(cause)) from None
            raise CollectorError(str(cause), worker=cause.worker) from None
        raise


class DataCollectorBase:
    """Collects TorchRL-layout TensorDict batches from env actors coordinated by a driver actor.

    Subclasses choose the number of workers, the layout (``single``, ``stack``, ``cat``) and
    whether batches are gathered synchronously or yielded as they come (``_async``).
    """

    _layout = "single"
    _async = False
    _multi = False

    def __init__(self, create_env_fn, policy=None, *, frames_per_batch: int, total_frames: int = -1,
                 num_envs: int = 1, num_workers: int = 1, create_env_kwargs: dict | None = None,
                 max_frames_per_traj: int | None = None, init_random_frames: int | None = 0,
                 reset_at_each_iter: bool = False, split_trajs: bool = False, postproc=None,
                 seed: int | None = None, set_truncated: bool = False, replay_buffer=None,
                 update_at_each_batch: bool = False, preemptive_threshold: float | None = None,
                 name: str | None = None, config=None, sample_timeout_s: float | None = None,
                 startup_timeout_s: float = 60.0, max_restarts: int = 3,
                 restart_window_s: float = 60.0, restart_backoff_s: float = 0.0,
                 on_worker_error: str = "restart", check_finite: bool | str = False,
                 check_obs_space: bool = False,
                 prefetch: int = 1, num_cpus: float | None = None, num_gpus: float | None = None,
                 resources: dict | None = None, write_timeout_s: float = 30.0,
                 worker_nice: int = 0, **kwargs):
        cls_name = type(self).__name__
        validate.reject_unsupported(kwargs, cls_name)
        # -- validate everything before building anything --------------------------------
        frames_per_batch = validate.positive_int("frames_per_batch", frames_per_batch)
        num_envs = validate.positive_int("num_envs", num_envs)
        num_workers = validate.positive_int("num_workers", num_workers)
        total_frames = validate.check_total_frames(total_frames)
        if max_frames_per_traj is not None and max_frames_per_traj <= 0:
            max_frames_per_traj = None  # TorchRL: -1 / 0 mean "no limit"
        if check_finite not in (False, True, "raise", "drop_episode"):
            raise ValueError(f"check_finite must be False, True ('raise') or 'drop_episode'; got {check_finite!r}.")
        check_finite = True if check_finite == "raise" else check_finite
        if on_worker_error not in ("restart", "raise"):
            raise ValueError(f"on_worker_error must be 'restart' or 'raise'; got {on_worker_error!r}.")
        if sample_timeout_s is not None and sample_timeout_s <= 0:
            raise ValueError(f"sample_timeout_s must be positive or None; got {sample_timeout_s!r}.")
        if preemptive_threshold is not None:
            if not self._multi or self._async:
                raise ValueError(f"preemptive_threshold is only for MultiSyncDataCollector; {cls_name} got it.")
            if not 0.0 < preemptive_threshold <= 1.0:
                raise ValueError(f"preemptive_threshold must be in (0, 1]; got {preemptive_threshold!r}.")
        if replay_buffer is not None and not hasattr(replay_buffer, "extend"):
            raise TypeError(f"replay_buffer must be a collectors.RayReplayBuffer (or have extend()); "
                            f"got {type(replay_buffer).__name__}.")
        if postproc is not None and not callable(postproc):
            raise TypeError(f"postproc must be callable; got {type(postproc).__name__}.")
        env_fns = create_env_fn if isinstance(create_env_fn, (list, tuple)) else None
        if env_fns is not None:
            if len(env_fns) != num_workers:
                raise ValueError(
                    f"create_env_fn is a list of {len(env_fns)} factories but num_workers="
                    f"{num_workers}; give one factory per worker or a single factory.")
        probe_fn = env_fns[0] if env_fns else create_env_fn
        spec, kind = validate.build_spec(probe_fn, create_env_kwargs, policy, num_envs)

        per_worker = frames_per_batch if self._async else math.ceil(frames_per_batch / num_workers)
        steps = math.ceil(per_worker / num_envs)
        self.requested_frames_per_batch = steps * num_envs * (1 if self._async else num_workers)
        self.frames_per_batch = self.requested_frames_per_batch
        self.total_frames = total_frames
        self.num_envs = num_envs
        self.num_workers = num_workers
        self.policy = policy
        self.policy_kind = kind
        self.spec = spec
        self.init_random_frames = int(init_random_frames or 0)
        self.reset_at_each_iter = reset_at_each_iter
        self.split_trajs = split_trajs
        self.postproc = postproc
        self.set_truncated = set_truncated
        self.replay_buffer = replay_buffer
        self.update_at_each_batch = update_at_each_batch
        self.preemptive_threshold = preemptive_threshold
        self.max_frames_per_traj = max_frames_per_traj
        self._masked = check_finite == "drop_episode"  # dropped episodes leave masked frames
        self.name = name or f"{cls_name}-{uuid.uuid4().hex[:6]}"
        self.policy_version = 0
        self._frames = 0
        self._iter = 0
        self._t_start = None
        self._closed = False
        self._final_stats = None
        self._seed = seed
        self._worker_handles: list = []

        from collectors.config import load_config  # late: config imports are optional weight

        self.config = load_config(config)
        ensure_ray(**self.config.ray_init_kwargs())
        options = self.config.worker_options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources)
        worker_config = {
            "create_env_fn": probe_fn if env_fns is None else None,
            "create_env_fns": list(env_fns) if env_fns else None,
            "create_env_kwargs": create_env_kwargs, "num_envs": num_envs, "policy": policy,
            "policy_kind": kind, "spec": spec, "steps": steps, "seed": seed,
            "num_workers": num_workers, "max_frames_per_traj": max_frames_per_traj,
            "check_finite": check_finite, "check_obs_space": check_obs_space,
            "on_env_error": on_worker_error,
            "max_restarts": max_restarts, "restart_window_s": restart_window_s,
            "restart_backoff_s": restart_backoff_s, "nice": worker_nice,
        }
        check_feasible(options, num_workers, cls_name)
        ship_by_value(create_env_fn, create_env_kwargs, policy)
        try:
            config_ref = ray.put(worker_config)
        except Exception as exc:
            raise TypeError(
                f"the env factory, its kwargs or the policy cannot be pickled for the env "
                f"actors: {exc!r}. Use a module-level function or a gymnasium id."
            ) from exc
        self._config_ref = config_ref
        driver_cls = ray.remote(Driver).options(
            name=f"{self.name}/driver", num_cpus=0, max_concurrency=16,
            **near_caller(self.config.driver_options()))
        self._driver = driver_cls.remote(
            self.name, [config_ref], num_workers, options, steps_per_worker=steps,
            envs_per_worker=num_envs, sample_timeout_s=sample_timeout_s,
            startup_timeout_s=startup_timeout_s, max_restarts=max_restarts,
            restart_window_s=restart_window_s, restart_backoff_s=restart_backoff_s,
            on_worker_error=on_worker_error, prefetch=prefetch,
            placement=self.config.placement_options(num_workers, options),
            write_timeout_s=write_timeout_s)
        self._finalizer = weakref.finalize(self, _kill_quietly, self._driver)
        try:
            self.worker_info = _ray_get(self._driver.ready.remote())
            self._worker_handles = ray.get(self._driver.worker_handles.remote())
        except Exception:
            self.shutdown(timeout=5.0)
            raise
        if seed is not None:
            self.set_seed(seed)

    # -- iteration ---------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.total_frames < 0:
            raise RuntimeError("this collector is endless (total_frames=-1): it has no length.")
        return math.ceil(self.total_frames / self.frames_per_batch)

    def __iter__(self):
        self._check_open()
        try:
            while self.total_frames < 0 or self._frames < self.total_frames:
                out = self._collect_one()
                yield out
        except (Exception, KeyboardInterrupt):
            self.shutdown()
            raise

    def next(self):
        """One batch (TorchRL's ``collector.next()``)."""
        return self._collect_one()

    def rollout(self):
        """Collect and return one batch (counted like an iteration step)."""
        return self._collect_one()

    def _random_now(self) -> bool:
        return self._frames < self.init_random_frames

    def _collect_one(self):
        self._check_open()
        if self._t_start is None:
            self._t_start = time.perf_counter()
        if self.update_at_each_batch:
            self.update_policy_weights_()
        if self.reset_at_each_iter:
            _ray_get(self._driver.broadcast.remote("reset"))
        random_actions = self._random_now()
        if self.replay_buffer is not None and hasattr(self.replay_buffer, "actor"):
            metas = _ray_get(self._driver.collect_into.remote(
                self.replay_buffer.actor, random_actions, self._async))
            self._frames += sum(m["frames"] for m in metas)
            self._iter += 1
            return None
        for attempt in range(3):
            if self._async:
                results = [_ray_get(self._driver.next_ready.remote(random_actions))]
            else:
                results = _ray_get(self._driver.collect_sync.remote(
                    random_actions, preempt=self.preemptive_threshold))
            try:
                parts = ray.get([refs[0] for refs, _ in results])
                break
            except ObjectLostError:
                # a worker died after handing its batch over: count it lost, collect again
                _ray_get(self._driver.lost.remote([m for _, m in results]))
        else:
            raise CollectorError("three batches in a row were lost with their env workers.")
        workers = [m["worker"] for _, m in results] if self._multi else None
        layout = "single" if self._async else self._layout
        batch = assemble(parts, workers, layout)
        valid = sum(m["frames"] for _, m in results)
        if self.preemptive_threshold is not None or self._masked:
            batch.set(("collector", "mask"), batch.get(("collector", "traj_ids")) >= 0)
        self._frames += valid
        self._iter += 1
        if self.set_truncated:
            mark_truncated(batch)
        if self.split_trajs:
            batch = split_trajectories(batch)
        if self.postproc is not None:
            batch = self.postproc(batch)
        if self.replay_buffer is not None:  # a local buffer (e.g. TorchRL's): extend it here
            self.replay_buffer.extend(batch.reshape(-1))
            return None
        return batch

    # -- control -----------------------------------------------------------------------------
    def set_seed(self, seed: int, static_seed: bool = False) -> int:
        """Seed every env (``seed + env slot``) and the policy RNGs; envs restart from it."""
        self._check_open()
        self._seed = seed
        _ray_get(self._driver.broadcast.remote("set_seed", seed))
        return int(seed) + self.num_workers * self.num_envs - 1

    def reset(self, reset_idx=None) -> None:
        """Start fresh episodes (and trajectory ids) in every env at the next batch."""
        self._check_open()
        _ray_get(self._driver.broadcast.remote("reset"))

    def update_policy_weights_(self, policy_or_weights=None, *, worker_ids=None,
                               weights_dict=None, **_ignored) -> None:
        """Send new weights to the workers, once, through Ray's object store.

        With no argument the weights are read from the policy object given at construction.
        Accepts an ``nn.Module``, a TensorDict of parameters (``TensorDict.from_module``) or a
        state dict. Every frame collected afterwards records the new ``policy_version``.
        """
        self._check_open()
        if self.policy_kind == "random" and policy_or_weights is None and weights_dict is None:
            return
        weights = self._state_dict_from(weights_dict if weights_dict is not None else policy_or_weights)
        ref = ray.put(weights)
        self.policy_version += 1
        if isinstance(worker_ids, int):
            worker_ids = [worker_ids]
        _ray_get(self._driver.set_weights.remote([ref], self.policy_version, worker_ids))

    def _state_dict_from(self, source) -> dict:
        if source is None:
            source = self.policy
        if isinstance(source, torch.nn.Module):
            sd = source.state_dict()
        elif hasattr(source, "flatten_keys"):  # a TensorDict of parameters
            sd = {k: v for k, v in source.flatten_keys(".").items()}
        elif isinstance(source, dict):
            sd = source
        else:
            raise TypeError(
                f"update_policy_weights_ takes an nn.Module, a TensorDict or a state dict; "
                f"got {type(source).__name__}.")
        if not isinstance(self.policy, torch.nn.Module):
            raise TypeError("weights can only be updated when the policy is a torch.nn.Module.")
        ref_sd = self.policy.state_dict()
        sd = {k: (v.data if isinstance(v, torch.nn.Parameter) else v) for k, v in sd.items()}
        missing = sorted(set(ref_sd) - set(sd))
        unexpected = sorted(set(sd) - set(ref_sd))
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the policy: missing keys {missing[:5]}, unexpected keys "
                f"{unexpected[:5]}. Pass the policy's own state_dict().")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(ref_sd[k].shape):
                raise ValueError(
                    f"weight {k!r}: expected shape {tuple(ref_sd[k].shape)}, got {tuple(v.shape)}.")
        return {k: v.detach().to("cpu").clone() for k, v in sd.items()}

    def state_dict(self) -> dict:
        self._check_open()
        out = {"frames": self._frames, "iter": self._iter, "policy_version": self.policy_version,
               "worker_states": _ray_get(self._driver.broadcast.remote("state_dict"))}
        if isinstance(self.policy, torch.nn.Module):
            out["policy_state_dict"] = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        self._check_open()
        self._frames = int(state.get("frames", 0))
        self._iter = int(state.get("iter", 0))
        if "policy_state_dict" in state and isinstance(self.policy, torch.nn.Module):
            self.policy.load_state_dict(state["policy_state_dict"])
            self.update_policy_weights_()
        self.policy_version = max(self.policy_version, int(state.get("policy_version", 0)))
        workers = state.get("worker_states") or []
        if workers:
            ray.get([h.load_state_dict.remote(s) for h, s in zip(
                ray.get(self._driver.worker_handles.remote()), workers)])

    # -- background collection ---------------------------------------------------------------
    def start(self) -> None:
        """Collect in the background, inside the driver actor, into the replay buffer.

        Runs until ``total_frames`` or :meth:`async_shutdown`; the trainer only samples.
        """
        self._check_open()
        if self.replay_buffer is None or not hasattr(self.replay_buffer, "actor"):
            raise RuntimeError("start() streams into a replay buffer: pass replay_buffer="
                               "collectors.RayReplayBuffer(...) when building the collector.")
        if self._t_start is None:
            self._t_start = time.perf_counter()
        remaining = -1 if self.total_frames < 0 else max(0, self.total_frames - self._frames)
        _ray_get(self._driver.start.remote(self.replay_buffer.actor, remaining))

    def is_running(self) -> bool:
        """Whether background collection is going on."""
        if self._closed:
            return False
        return bool(ray.get(self._driver.is_running.remote(), timeout=10))

    @contextlib.contextmanager
    def pause(self):
        """Stop background writes inside the block (e.g. to checkpoint the buffer)."""
        self._check_open()
        ray.get(self._driver.pause.remote(True))
        try:
            yield self
        finally:
            if not self._closed:
                ray.get(self._driver.pause.remote(False))

    def async_shutdown(self, timeout: float = 10.0) -> None:
        """Stop background collection (no write reaches the buffer once this returns), then
        shut everything down. ``stats()`` still answers."""
        if self._closed:
            return
        try:
            ray.get(self._driver.stop.remote(timeout), timeout=timeout + 5)
        except Exception:  # noqa: BLE001 - forced by shutdown() below
            pass
        self.shutdown(timeout)

    def background_error(self) -> str | None:
        """The error that stopped background collection, if any."""
        return None if self._closed else ray.get(self._driver.background_error.remote(), timeout=10)

    # -- figures -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plain-dict figures; still answers after ``shutdown()``."""
        if self._closed:
            return dict(self._final_stats or self._local_stats({}))
        try:
            driver = ray.get(self._driver.stats.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - stats never raise
            driver = {}
        return self._local_stats(driver)

    def _local_stats(self, driver: dict) -> dict:
        elapsed = time.perf_counter() - self._t_start if self._t_start else 0.0
        per = driver.get("per_worker", [])
        returns = driver.get("episode_returns", [])
        frames = self._frames + driver.get("background_frames", 0)
        out = {
            "frames": frames, "batches": self._iter + driver.get("written_batches", 0)
            if driver.get("background_frames") else self._iter, "total_frames": self.total_frames,
            "completed": self.total_frames > 0 and frames >= self.total_frames,
            "requested_frames_per_batch": self.requested_frames_per_batch,
            "frames_per_s": frames / elapsed if elapsed > 0 else 0.0,
            "running": driver.get("running", False),
            "written_batch_ids": driver.get("written_batch_ids", []),
            "buffer_resends": driver.get("buffer_resends", 0),
            "policy_version": self.policy_version,
            "workers": driver.get("workers", self.num_workers),
            "workers_alive": driver.get("workers_alive", 0),
            "episodes": sum(p.get("episodes", 0) for p in per),
            "mean_return": (sum(returns) / len(returns)) if returns else float("nan"),
            "recent_returns": list(returns),
            "restarts": sum(p.get("restarts", 0) for p in per),
            "env_errors": sum(p.get("env_errors", 0) for p in per),
            "lost_frames": sum(sum(p.get("dropped", {}).values()) for p in per),
            "per_worker": per,
        }
        for i, p in enumerate(per):
            for key in ("frames", "delivered", "policy_version", "restarts", "env_errors", "timeouts"):
                out[f"worker_{i}/{key}"] = p.get(key, 0)
        return out

    # -- lifecycle ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"collector {self.name!r} is shut down; create a new one.")

    def shutdown(self, timeout: float = 10.0, raise_on_error: bool = False) -> None:
        """Stop every actor of this collector within ``timeout`` (plus a small margin).

        Graceful first (workers close their envs), then ``ray.kill``. Idempotent.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        try:
            self._final_stats = self._local_stats(ray.get(self._driver.stats.remote(), timeout=min(2.0, timeout)))
        except Exception:  # noqa: BLE001
            self._final_stats = self._local_stats({})
        self._closed = True
        handles = list(self._worker_handles)
        try:
            handles = ray.get(self._driver.worker_handles.remote(), timeout=min(2.0, timeout)) + handles
            ray.get(self._driver.shutdown.remote(max(0.1, deadline - time.monotonic() - 1.0)),
                    timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - forced below
            pass
        for h in handles + [self._driver]:
            _kill_quietly(h)
        _wait_dead(handles + [self._driver], deadline + 2.0)
        self._finalizer.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, frames_per_batch="
                f"{self.frames_per_batch}, total_frames={self.total_frames}, "
                f"num_workers={self.num_workers}, num_envs={self.num_envs})")


def check_feasible(options: dict, num_workers: int, who: str) -> None:
    """Reject at once a worker request that no node, or the whole cluster, can hold.

    (A request that fits the totals but cannot be placed still fails, after
    ``startup_timeout_s`` or the placement timeout, instead of pending forever.)
    """
    need = {"CPU": float(options.get("num_cpus", 0) or 0), "GPU": float(options.get("num_gpus", 0) or 0)}
    need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    need = {k: v for k, v in need.items() if v > 0}
    if not need:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        raise ValueError(
            f"{who}: each env worker asks for {need}, but no node has that much "
            f"(nodes: {[{k: node.get(k, 0) for k in need} for node in nodes]}). Lower "
            "num_cpus/num_gpus/resources (or resources.env_worker in the config).")
    total = {k: sum(node.get(k, 0) for node in nodes) for k in need}
    short = {k: v * num_workers for k, v in need.items() if v * num_workers > total[k] + 1e-9}
    if short:
        raise ValueError(
            f"{who}: {num_workers} env workers need {short} in all, but the cluster has "
            f"{ {k: total[k] for k in short} }. Use fewer workers or smaller requests.")
