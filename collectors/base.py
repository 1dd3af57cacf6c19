"""``DataCollectorBase``: what every collector shares (driver actor, iteration, weights, stats)."""
from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
import uuid
import warnings
import weakref

import ray
import torch
from ray.exceptions import ObjectLostError

from actors import driver as driver_body
from actors.env_worker import WorkerPlan
from actors.errors import CollectorError
from actors.options import CollectorOptions, options_doc
from actors.vector_rollout import AUTO_MIN_ENVS, native_vector_problem
from collectors import validate
from collectors.batch import assemble, mark_truncated, split_trajectories
from collectors.direct_path import DirectRoute, direct_problem
from collectors.runtime import driver_get as _ray_get
from collectors.runtime import ensure_ray, kill_quietly as _kill_quietly, near_caller
from collectors.runtime import wait_dead as _wait_dead
from collectors.shipping import ship_by_value
from collectors.weight_sync import WeightWatcher

CONTROL_TIMEOUT_S = 30.0  # bound of control calls (they never wait behind a batch in flight)
AUTO_SYNC_POLL_S = 0.05  # during start(): how often the trainer's policy is checked for changes



class DataCollectorBase:
    """Collects TorchRL-layout TensorDict batches from env actors coordinated by a driver actor.

    Subclasses choose the number of workers, the layout (``single``, ``stack``, ``cat``) and
    whether batches are gathered synchronously or yielded as they come (``_async``).

    Args:
        create_env_fn: a gymnasium id, or a callable returning a ``gymnasium.Env`` (multi
            collectors: also a list with one per worker).
        policy: ``None`` (uniform random), an ``nn.Module`` mapping the observation tensor to
            the action, a ``TensorDictModule``, or a callable TensorDict -> TensorDict.

    {options}
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _document(cls)

    _layout = "single"
    _async = False
    _multi = False

    def __init__(self, create_env_fn, policy=None, *, frames_per_batch: int,
                 total_frames: int = -1, **kwargs):
        cls_name = type(self).__name__
        kwargs = validate.split_torchrl_options(kwargs, cls_name)
        options = CollectorOptions.build(cls_name, frames_per_batch=frames_per_batch,
                                         total_frames=total_frames, **kwargs)
        self._check_options(options, cls_name)
        if options.policy_factory is not None and policy is not None:
            raise TypeError(f"{cls_name}: pass policy or policy_factory, not both.")
        env_fns = self._env_fns(create_env_fn, options.num_workers)
        # a policy built by its factory here too: for the checks, and as the weights' reference
        self._reference_policy = options.policy_factory() if options.policy_factory else policy
        spec, kind = validate.build_spec(env_fns[0], options.create_env_kwargs,
                                         self._reference_policy, options.num_envs,
                                         options.exploration_type)
        for other in {id(f): f for f in env_fns[1:] if f is not env_fns[0]}.values():
            other_spec, _ = validate.build_spec(other, options.create_env_kwargs,
                                                self._reference_policy, options.num_envs,
                                                options.exploration_type)
            if other_spec != spec:
                raise ValueError(f"{cls_name}: the env factories of the workers make different "
                                 f"envs (spaces {other_spec} vs {spec}); their batches could not "
                                 "be stacked. Give every worker the same kind of env.")
        options = self._native_vector(options, env_fns, spec, cls_name)
        steps, self.requested_frames_per_batch = self._batch_geometry(options)
        if self.requested_frames_per_batch != options.frames_per_batch:
            warnings.warn(
                f"{cls_name}: frames_per_batch={options.frames_per_batch} is rounded up to "
                f"{self.requested_frames_per_batch} (a multiple of num_envs"
                f"{'' if self._async else ' x num_workers'}), as TorchRL does; "
                "stats()['requested_frames_per_batch'] says so too.", stacklevel=3)
        capacity = getattr(options.replay_buffer, "capacity", None)
        if isinstance(capacity, int) and capacity < steps * options.num_envs:
            raise ValueError(
                f"{cls_name}: the replay buffer holds {capacity} frames, less than one worker "
                f"batch of {steps * options.num_envs}; raise its capacity or lower frames_per_batch.")
        self.options = options
        self.frames_per_batch = self.requested_frames_per_batch
        self.total_frames = options.total_frames
        self.num_envs = options.num_envs
        self.num_workers = options.num_workers
        self.policy = policy
        self.policy_kind = kind
        self.spec = spec
        self.init_random_frames = options.init_random_frames
        self.postproc = options.postproc
        self.replay_buffer = options.replay_buffer
        self.name = options.name or f"{cls_name}-{uuid.uuid4().hex[:6]}"
        self.policy_version = 0
        self._masked = options.check_finite == "drop_episode"  # dropped episodes leave masked frames
        self._frames = 0
        self._iter = 0
        self._t_start = None
        self._closed = False
        self._final_stats = None
        self._worker_handles: list = []
        self.config = None  # the DeploymentConfig, loaded when the driver starts
        self.worker_info: list[dict] = []  # per env worker at start: pid, node_id
        self._weights_lock = threading.RLock()
        self._watcher = (WeightWatcher(policy) if options.auto_sync_weights
                         and isinstance(policy, torch.nn.Module) else None)
        self._sync_thread: threading.Thread | None = None
        self._filler = None  # start() with a buffer in this process (e.g. TorchRL's)
        self._sync_stop = threading.Event()
        self._direct: DirectRoute | None = None  # when batches take a compiled graph
        self._start_driver(create_env_fn, env_fns, policy, kind, spec, steps)
        try:
            self._direct = DirectRoute(self, self._driver, options, self.worker_info, self._async)
        except BaseException:
            self.shutdown(timeout=5.0, raise_on_error=False)
            raise
        if options.seed is not None:
            self.set_seed(options.seed)

    # -- construction ------------------------------------------------------------------------
    def _check_options(self, options: CollectorOptions, cls_name: str) -> None:
        """What a subclass does not take (checked before anything starts)."""
        if options.preemptive_threshold is not None and (not self._multi or self._async):
            raise ValueError(f"preemptive_threshold is only for MultiSyncDataCollector; "
                             f"{cls_name} got {options.preemptive_threshold!r}. Remove it.")
        if options.cat_results is not None and (not self._multi or self._async):
            raise ValueError(
                f"cat_results is only for MultiSyncDataCollector ({cls_name} yields one worker's "
                f"batch at a time); got {options.cat_results!r}. Remove it.")
        if hasattr(options.replay_buffer, "actor"):  # batches go straight to the buffer actor
            skipped = [k for k in ("postproc", "split_trajs", "set_truncated", "post_collect_hook")
                       if getattr(options, k)] + ([] if options.track_traj_ids else ["track_traj_ids"])
            if skipped:
                raise ValueError(
                    f"{cls_name}: {skipped} act on batches in the trainer, but with a "
                    "RayReplayBuffer batches go from the env actors straight to the buffer actor. "
                    "Remove them, or transform the samples you draw from the buffer.")
        if options.compact_obs and hasattr(options.replay_buffer, "actor") and \
                not getattr(options.replay_buffer, "compact_obs", False):
            raise ValueError(
                f"{cls_name}: compact_obs=True with a RayReplayBuffer that stores ('next', obs) "
                "copies; create the buffer with compact_obs=True (it keeps episode-final "
                "observations apart), or drop compact_obs here.")
        if options.num_workers > 1 and not self._multi:
            raise TypeError(f"{cls_name} has one env actor; got num_workers="
                            f"{options.num_workers}. Use a multi collector for several.")
        problem = direct_problem(options, self._async, cls_name)
        if options.compiled_graph and problem:
            raise ValueError(f"{cls_name}: compiled_graph=True, but {problem}. Pass "
                             "compiled_graph=None (use it where possible) or False.")

    @staticmethod
    def _native_vector(options: CollectorOptions, env_fns: tuple, spec: dict,
                       cls_name: str) -> CollectorOptions:
        """Resolve ``native_vector`` to True or False: a gymnasium id with a native vectorized
        implementation runs as one vector env per actor unless the options need per-env envs."""
        problem = "the env is a TorchRL env" if spec.get("torchrl") else next(
            (p for p in (native_vector_problem(f, options) for f in env_fns) if p), None)
        if options.native_vector and problem:
            raise ValueError(f"{cls_name}: native_vector=True, but {problem}. Pass "
                             "native_vector=None (use it where possible) or False.")
        wanted = options.native_vector if options.native_vector is not None else \
            options.num_envs >= AUTO_MIN_ENVS  # where it is faster (measured in vector_rollout)
        return options.model_copy(update={"native_vector": problem is None and wanted})

    def _env_fns(self, create_env_fn, num_workers: int) -> tuple:
        if isinstance(create_env_fn, (list, tuple)):
            if len(create_env_fn) != num_workers:
                raise ValueError(
                    f"create_env_fn is a list of {len(create_env_fn)} factories but num_workers="
                    f"{num_workers}; give one factory per worker or a single factory.")
            return tuple(create_env_fn)
        return (create_env_fn,) * num_workers

    def _batch_geometry(self, options: CollectorOptions) -> tuple[int, int]:
        """Steps per worker batch, and the frames per yielded batch after rounding up."""
        workers = 1 if self._async else options.num_workers
        per_worker = math.ceil(options.frames_per_batch / workers)
        steps = math.ceil(per_worker / options.num_envs)
        return steps, steps * options.num_envs * workers

    def _start_driver(self, create_env_fn, env_fns, policy, kind, spec, steps) -> None:
        from collectors.config import load_config  # late: config imports are optional weight

        options = self.options
        self.config = load_config(options.config)
        ensure_ray(**self.config.ray_init_kwargs())
        num_gpus = options.num_gpus
        if num_gpus is None and (options.policy_device or "cpu").startswith("cuda"):
            num_gpus = 1  # the policy runs on a GPU inside the env actor: Ray must give it one
        actor_options = self.config.worker_options(num_cpus=options.num_cpus, num_gpus=num_gpus,
                                                   resources=options.resources)
        check_feasible(actor_options, options.num_workers, type(self).__name__)
        ship_by_value(create_env_fn, options.create_env_kwargs, policy, options.policy_factory,
                      options.init_fn)
        plan = WorkerPlan(env_fns=env_fns, policy=policy, policy_kind=kind, spec=spec,
                          steps=steps, options=options.for_workers(),
                          policy_factory=options.policy_factory)
        try:
            self._plan_ref = ray.put(plan)
        except Exception as exc:
            raise TypeError(
                f"the env factory, its kwargs or the policy cannot be pickled for the env "
                f"actors: {exc!r}. Use a module-level function or a gymnasium id."
            ) from exc
        driver_cls = ray.remote(driver_body.Driver).options(
            name=f"{self.name}/driver", max_concurrency=16,
            **near_caller(self.config.driver_options()))
        self._driver = driver_cls.remote(
            self.name, [self._plan_ref], options.for_workers(), actor_options,
            steps_per_worker=steps, placement=self.config.placement_options())
        self._finalizer = weakref.finalize(self, _kill_quietly, self._driver)
        startup = options.startup_timeout_s + (self.config.placement.timeout_s
                                               if self.config.placement.strategy else 0.0)
        try:  # the driver bounds each step; this bounds the whole, should the driver hang
            self.worker_info = _ray_get(self._driver.ready.remote(), timeout=startup + 30.0)
            self._worker_handles = ray.get(self._driver.worker_handles.remote(), timeout=30.0)
        except BaseException:
            self.shutdown(timeout=5.0, raise_on_error=False)
            raise

    def _collect_through_driver(self, random_actions: bool) -> tuple[list, list]:
        """The driver asks the workers; this fetches their batches: ``(arrays, metas)``."""
        self._direct.settled()
        for _ in range(3):
            if self._async:
                results = [_ray_get(self._driver.next_ready.remote(random_actions))]
            else:
                results = _ray_get(self._driver.collect_sync.remote(
                    random_actions, preempt=self.options.preemptive_threshold))
            try:
                return ray.get([refs[0] for refs, _ in results]), [m for _, m in results]
            except ObjectLostError:
                # a worker died after handing its batch over: count it lost, collect again
                _ray_get(self._driver.lost.remote([m for _, m in results]), timeout=CONTROL_TIMEOUT_S)
        raise CollectorError("three batches in a row were lost with their env workers.")

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
            self.shutdown(raise_on_error=False)
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
        if self.options.pre_collect_hook is not None:
            self.options.pre_collect_hook()
        if self.options.update_at_each_batch:
            self.update_policy_weights_()
        else:
            self._sync_if_changed()
        if self.options.reset_at_each_iter:
            _ray_get(self._driver.broadcast.remote("reset"), timeout=CONTROL_TIMEOUT_S)
        random_actions = self._random_now()
        if self.replay_buffer is not None and hasattr(self.replay_buffer, "actor"):
            metas = _ray_get(self._driver.collect_into.remote(
                self.replay_buffer.actor, random_actions, self._async))
            self._frames += sum(m["frames"] for m in metas)
            self._iter += 1
            return None
        direct = self._direct.batch(random_actions, self._iter)
        if direct is not None:
            parts, metas = [direct[0]], [direct[1]]
        else:
            parts, metas = self._collect_through_driver(random_actions)
        self._direct.collected(metas)
        workers = [m["worker"] for m in metas] if self._multi else None
        layout = "single" if self._async else self._layout
        batch = assemble(parts, workers, layout, self.options.compact_obs)
        valid = sum(m["frames"] for m in metas)
        if self.options.preemptive_threshold is not None or self._masked:
            batch.set(("collector", "mask"), batch.get(("collector", "traj_ids")) >= 0)
        self._frames += valid
        self._iter += 1
        if self.options.set_truncated:
            mark_truncated(batch)
        if self.options.split_trajs:
            batch = split_trajectories(batch)
        if self.postproc is not None:
            batch = self.postproc(batch)
        if not self.options.track_traj_ids:
            batch = batch.exclude(("collector", "traj_ids"))
        if self.options.storing_device not in (None, "cpu"):
            batch = batch.to(self.options.storing_device)
        if self.options.post_collect_hook is not None:
            self.options.post_collect_hook(batch)
        if self.replay_buffer is not None:  # a local buffer (e.g. TorchRL's): extend it here
            if self._filler is not None:
                self._filler.extend(batch.reshape(-1))
            else:
                self.replay_buffer.extend(batch.reshape(-1))
            return None
        return batch

    # -- control -----------------------------------------------------------------------------
    def set_seed(self, seed: int, static_seed: bool = False) -> int:
        """Seed every env and the policy RNGs; every env starts a new episode from it.

        Env ``k`` of the run (worker ``w``, env ``e``: ``k = w * num_envs + e``) gets
        ``seed + k``; with ``static_seed=True`` every env gets ``seed`` itself. Returns the last
        seed used, as TorchRL does.
        """
        self._check_open()
        seed = CollectorOptions.build(type(self).__name__, frames_per_batch=1, seed=seed).seed
        if not isinstance(static_seed, bool):
            raise TypeError(f"static_seed must be a bool; got {static_seed!r}.")
        _ray_get(self._driver.set_seed.remote(seed, static_seed), timeout=CONTROL_TIMEOUT_S)
        return int(seed) if static_seed else int(seed) + self.num_workers * self.num_envs - 1

    def reset(self, reset_idx=None, *, index=None) -> None:
        """Start fresh episodes (and trajectory ids) at the next batch.

        ``reset_idx`` (TorchRL's multi collectors) or ``index`` (TorchRL's ``Collector``): a
        sequence of bools, one per worker for multi collectors (all envs of the worker), one
        per env for a single-worker collector with ``num_envs > 1``. ``None`` resets all.
        """
        self._check_open()
        if reset_idx is not None and index is not None:
            raise TypeError("reset() takes reset_idx or index, not both.")
        mask = reset_idx if reset_idx is not None else index
        if mask is None:
            _ray_get(self._driver.broadcast.remote("reset"), timeout=CONTROL_TIMEOUT_S)
            return
        flags = [bool(x) for x in (mask.tolist() if hasattr(mask, "tolist") else mask)]
        if self._multi:
            if len(flags) != self.num_workers:
                raise ValueError(f"reset_idx has {len(flags)} entries; expected one per worker "
                                 f"({self.num_workers}).")
            calls = {w: ("reset", ()) for w, f in enumerate(flags) if f}
        else:
            if len(flags) != self.num_envs:
                raise ValueError(f"reset index has {len(flags)} entries; expected one per env "
                                 f"({self.num_envs}).")
            calls = {0: ("reset", ([e for e, f in enumerate(flags) if f],))}
        _ray_get(self._driver.call_workers.remote(calls), timeout=CONTROL_TIMEOUT_S)

    def update_policy_weights_(self, policy_or_weights=None, *, worker_ids=None,
                               weights_dict=None, model_id=None) -> None:
        """Send new weights to the workers, once, through Ray's object store.

        With no argument the weights are read from the policy object given at construction.
        Accepts an ``nn.Module``, a TensorDict of parameters (``TensorDict.from_module``) or a
        state dict. ``worker_ids`` (an int or a list) limits the update to those workers. Every
        frame collected afterwards records the new ``policy_version``.
        """
        self._check_open()
        if model_id not in (None, "policy"):
            raise NotImplementedError(
                f"model_id={model_id!r}: only the collector's own policy ('policy') has weights "
                "to update here.")
        if weights_dict is not None and policy_or_weights is not None:
            raise TypeError("pass policy_or_weights or weights_dict, not both.")
        if self.policy_kind == "random" and policy_or_weights is None and weights_dict is None:
            return
        weights = self._state_dict_from(weights_dict if weights_dict is not None else policy_or_weights)
        if isinstance(worker_ids, int) and not isinstance(worker_ids, bool):
            worker_ids = [worker_ids]
        if worker_ids is not None:
            worker_ids = [int(w) for w in worker_ids]
            bad = [w for w in worker_ids if not 0 <= w < self.num_workers]
            if bad:
                raise ValueError(f"worker_ids {bad} out of range: this collector has workers "
                                 f"0..{self.num_workers - 1}.")
        with self._weights_lock:
            if self._watcher is not None and policy_or_weights is None and weights_dict is None \
                    and worker_ids is None:
                self._watcher.mark_current()
            ref = ray.put(weights)
            self.policy_version += 1
            self._direct.settled()  # (the driver's policy-lag figures follow the order of events)
            _ray_get(self._driver.set_weights.remote([ref], self.policy_version, worker_ids), timeout=CONTROL_TIMEOUT_S)

    def _sync_if_changed(self) -> None:
        """Automatic weight sync: send the policy's weights if the trainer changed them."""
        if self._watcher is not None:
            with self._weights_lock:
                if self._watcher.changed():
                    self.update_policy_weights_()

    def _sync_loop(self) -> None:
        """During ``start()``: watch the trainer's policy and send changed weights."""
        while not self._sync_stop.wait(AUTO_SYNC_POLL_S):
            try:
                self._sync_if_changed()
            except Exception:  # noqa: BLE001 - the collector is closing; nothing to sync into
                return

    def _state_dict_from(self, source) -> dict:
        if source is None:
            if self.policy is None:
                raise TypeError("this collector's policy is built by policy_factory inside the env "
                                "actors: pass the weights, update_policy_weights_(weights).")
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
        if not isinstance(self._reference_policy, torch.nn.Module):
            raise TypeError("weights can only be updated when the policy is a torch.nn.Module.")
        ref_sd = self._reference_policy.state_dict()
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
        self._direct.settled()
        out = {"frames": self._frames, "iter": self._iter, "policy_version": self.policy_version,
               "worker_states": _ray_get(self._driver.broadcast.remote("state_dict"), timeout=CONTROL_TIMEOUT_S)}
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
            handles = ray.get(self._driver.worker_handles.remote(), timeout=CONTROL_TIMEOUT_S)
            ray.get([h.load_state_dict.remote(s) for h, s in zip(handles, workers)],
                    timeout=CONTROL_TIMEOUT_S)

    # -- background collection ---------------------------------------------------------------
    def start(self) -> None:
        """Collect in the background, inside the driver actor, into the replay buffer.

        Runs until ``total_frames`` or :meth:`async_shutdown`; the trainer only samples.
        """
        self._check_open()
        if self.replay_buffer is None:
            raise RuntimeError("start() streams into a replay buffer: pass replay_buffer="
                               "collectors.RayReplayBuffer(...) (or a TorchRL ReplayBuffer) when "
                               "building the collector.")
        if self._t_start is None:
            self._t_start = time.perf_counter()
        self._direct.close()  # a thread collects from here on: batches go through the driver
        if not hasattr(self.replay_buffer, "actor"):  # a buffer in this process: a thread fills it
            from collectors.local_fill import LocalFiller

            if self._filler is None:
                self._filler = LocalFiller(self, self.replay_buffer)
            self._filler.start()
            return
        remaining = -1 if self.total_frames < 0 else max(0, self.total_frames - self._frames)
        self._sync_if_changed()
        _ray_get(self._driver.start.remote(self.replay_buffer.actor, remaining), timeout=CONTROL_TIMEOUT_S)
        if self._watcher is not None and self._sync_thread is None:
            self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                                 name=f"{self.name}-weight-sync")
            self._sync_thread.start()

    def is_running(self) -> bool:
        """Whether background collection is going on."""
        if self._closed:
            return False
        if self._filler is not None:
            return self._filler.is_running()
        return bool(ray.get(self._driver.is_running.remote(), timeout=CONTROL_TIMEOUT_S))

    @contextlib.contextmanager
    def pause(self):
        """Stop background writes inside the block (e.g. to checkpoint the buffer)."""
        self._check_open()
        if self._filler is not None:
            self._filler.pause(True)
            try:
                yield self
            finally:
                self._filler.pause(False)
            return
        ray.get(self._driver.pause.remote(True), timeout=self.options.write_timeout_s + CONTROL_TIMEOUT_S)
        try:
            yield self
        finally:
            if not self._closed:
                ray.get(self._driver.pause.remote(False), timeout=CONTROL_TIMEOUT_S)

    def async_shutdown(self, timeout: float | None = None, close_env: bool = True) -> None:
        """Stop background collection (no write reaches the buffer once this returns), then
        shut everything down (see :meth:`shutdown`). ``stats()`` still answers."""
        if self._closed:
            return
        timeout = 10.0 if timeout is None else float(timeout)
        if self._filler is not None:  # fenced: nothing reaches the buffer once this returns
            self._filler.stop(timeout)
        try:
            ray.get(self._driver.stop.remote(timeout), timeout=timeout + 5)
        except Exception:  # noqa: BLE001 - forced by shutdown() below
            pass
        self.shutdown(timeout, close_env=close_env)

    def background_error(self) -> str | None:
        """The error that stopped background collection, if any."""
        if self._filler is not None:
            return None if self._filler.error is None else repr(self._filler.error)
        return None if self._closed else ray.get(self._driver.background_error.remote(),
                                                 timeout=CONTROL_TIMEOUT_S)

    # -- figures -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plain-dict figures; still answers after ``shutdown()``."""
        if self._closed:
            return dict(self._final_stats or self._local_stats({}))
        try:
            if self._direct is not None:  # (None only while construction fails)
                self._direct.settled()
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
            "frames_per_batch_asked": self.options.frames_per_batch,
            "frames_per_s": frames / elapsed if elapsed > 0 else 0.0,
            "running": driver.get("running", False),
            "written_batch_ids": driver.get("written_batch_ids", []),
            "buffer_resends": driver.get("buffer_resends", 0),  # sends retried, unanswered
            # batches sent again because the buffer restarted from an older checkpoint
            "buffer_restart_resends": driver.get("buffer_restart_resends", 0),
            "policy_version": self.policy_version,
            "workers": driver.get("workers", self.num_workers),
            "workers_alive": driver.get("workers_alive", 0),
            "episodes": sum(p.get("episodes", 0) for p in per),
            "mean_return": (sum(returns) / len(returns)) if returns else float("nan"),
            "recent_returns": list(returns),
            "restarts": sum(p.get("restarts", 0) for p in per),
            "env_errors": sum(p.get("env_errors", 0) for p in per),
            "lost_frames": sum(sum(p.get("dropped", {}).values()) for p in per),
            "env_error_log": driver.get("env_error_log", []),  # the last env errors, with tracebacks
            "per_worker": per,
            # the node each env worker started on (``ray.get_runtime_context().get_node_id()``)
            "worker_nodes": [info.get("node_id") for info in self.worker_info],
            "placement": (self.config.placement.strategy if self.config else None) or "none",
            "compiled_graph_batches": self._direct.batches if self._direct else 0,
        }
        for i, p in enumerate(per):
            for key in ("frames", "delivered", "policy_version", "restarts", "env_errors", "timeouts"):
                out[f"worker_{i}/{key}"] = p.get(key, 0)
        return out

    # -- lifecycle ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"collector {self.name!r} is shut down; create a new one.")

    def shutdown(self, timeout: float | None = None, close_env: bool = True,
                 raise_on_error: bool = True) -> None:
        """Stop every actor of this collector within ``timeout`` (default 10 s, plus a margin).

        Graceful first (workers close their envs; ``close_env=False`` skips that), then
        ``ray.kill``. With ``raise_on_error`` (TorchRL's default) an env whose ``close()``
        raised is reported as :class:`CollectorError` once everything is stopped; a worker
        that does not close in time is killed, which is not an error. Idempotent.
        """
        if self._closed:
            return
        if self._filler is not None:
            self._filler.stop(5.0 if timeout is None else min(float(timeout), 5.0))
        self._sync_stop.set()
        if self._sync_thread is not None and self._sync_thread is not threading.current_thread():
            self._sync_thread.join(5.0)
        timeout = 10.0 if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        try:
            if self._direct is not None:
                self._direct.close()  # settles the last batch, then tears the graph down
        except Exception:  # noqa: BLE001 - a dead driver or worker: stopped below anyway
            pass
        try:
            self._final_stats = self._local_stats(ray.get(self._driver.stats.remote(), timeout=min(2.0, timeout)))
        except Exception:  # noqa: BLE001
            self._final_stats = self._local_stats({})
        self._closed = True
        handles = list(self._worker_handles)
        problems = []
        try:
            handles = ray.get(self._driver.worker_handles.remote(), timeout=min(2.0, timeout)) + handles
            grace = max(0.1, deadline - time.monotonic() - 1.0) if close_env else 0.0
            problems = ray.get(self._driver.shutdown.remote(grace),
                               timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a hung or dead driver: forced below
            pass
        for h in handles + [self._driver]:
            _kill_quietly(h)
        _wait_dead(handles + [self._driver], deadline + 2.0)
        self._finalizer.detach()
        if raise_on_error and problems:
            raise CollectorError(f"collector {self.name!r} shut down, with errors: {problems}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(raise_on_error=exc[0] is None)
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


def _document(cls) -> None:
    """Put the options in ``cls``'s docstring and constructor signature, so ``help(cls)`` and
    ``inspect.signature(cls)`` are the reference."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "Keyword Args:" not in doc:
        doc = doc.replace("{options}", "").rstrip() + "\n\n" + options_doc()
    cls.__doc__ = doc
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("create_env_fn", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("policy", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    for name, field in CollectorOptions.model_fields.items():
        default = inspect.Parameter.empty if field.is_required() else field.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
    cls.__signature__ = inspect.Signature(params[1:])


_document(DataCollectorBase)
