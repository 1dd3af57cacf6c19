"""``DataCollectorBase``: what every collector shares (driver actor, iteration, weights, stats)."""
from __future__ import annotations

import functools
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

from actors.coordination import driver as driver_body
from actors.stepping.env_worker import WorkerPlan
from actors.errors import CollectorError
from actors.options import CollectorOptions
from actors.stepping.policy_runner import module_device
from actors.stepping.env_building import shippable
from actors.stepping.vector_rollout import AUTO_MIN_ENVS, native_vector_problem
from collectors import trainer_threads, validate
from collectors.background import BackgroundMixin
from collectors.batch import assemble, finish, on_storage_device, real_frames
from collectors.control import CONTROL_TIMEOUT_S, ControlMixin
from collectors.local_route import LocalRoute, batch_problem
from collectors.resources import check_feasible, on_cpu, worker_gpus
from collectors.figures import FiguresMixin
from collectors.introspection import IntrospectionMixin
from collectors.iteration import IterationMixin
from collectors.runtime import (driver_get as _ray_get, ensure_ray, kill_quietly as _kill_quietly,
                                near_caller, plan_with_key, wait_dead as _wait_dead)
from collectors.shipping import ship_by_value
from collectors.trajectories import Trajectories, check_trajectory_options, each_step
from collectors.weight_sync import WeightWatcher


class DataCollectorBase(IterationMixin, ControlMixin, IntrospectionMixin, BackgroundMixin,
                        FiguresMixin):
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
        env_fns = self._env_fns(create_env_fn, options.num_workers)
        validate.one_per_worker(options, cls_name)
        # a policy built by its factory here too: for the checks, and as the weights' reference
        # (a policy given beside the factory stays here, as TorchRL's: the source of weights)
        factory = options.policy_factory
        if isinstance(factory, tuple):  # one per worker (TorchRL): the first is the reference
            factory = factory[0]
        self._reference_policy = factory() if factory else policy
        lives_on = module_device(self._reference_policy)
        if options.policy_device is None and (lives_on or "").startswith("cuda"):
            # as TorchRL: with no policy_device, the policy runs on the GPU it lives on (one on
            # another device, e.g. "mps", reaches the actors as a CPU copy and runs there)
            options = options.model_copy(update={"policy_device": lives_on})
        probe = functools.partial(
            validate.build_spec, policy=self._reference_policy, num_envs=options.num_envs,
            exploration_type=options.exploration_type,
            max_frames_per_traj=options.max_frames_per_traj,
            register_transforms=bool(options.auto_register_policy_transforms),
            policy_device=options.policy_device, ragged_conflicts=validate.ragged_conflicts(options))
        spec, kind = probe(env_fns[0], options.env_kwargs(0))
        others = {(id(f), repr(options.env_kwargs(i))): (f, options.env_kwargs(i))
                  for i, f in enumerate(env_fns) if i}
        others.pop((id(env_fns[0]), repr(options.env_kwargs(0))), None)
        for other, other_kwargs in others.values():
            other_spec, _ = probe(other, other_kwargs)
            if other_spec != spec:
                raise ValueError(f"{cls_name}: the env factories of the workers make different "
                                 f"envs (spaces {other_spec} vs {spec}); their batches could not "
                                 "be stacked. Give every worker the same kind of env.")
        if spec.get("env_batch") and options.num_envs > 1:
            raise ValueError(
                f"{cls_name}: the env is batched already (batch_size [{spec['env_batch']}]) and "
                f"num_envs={options.num_envs}; pass num_envs=1 with a batched env, or a factory "
                "of a single env with num_envs.")
        options = self._native_vector(options, env_fns, spec, cls_name)
        # envs per worker: num_envs, or a batched TorchRL env's batch size
        self._width = options.num_envs * (spec.get("env_batch") or 1)
        steps, self.requested_frames_per_batch = self._batch_geometry(options)
        if self.requested_frames_per_batch != options.frames_per_batch:
            warnings.warn(
                f"{cls_name}: frames_per_batch={options.frames_per_batch} is rounded up to "
                f"{self.requested_frames_per_batch} (a multiple of the envs per worker"
                f"{'' if self._async else ' x num_workers'}), as TorchRL does; "
                "stats()['requested_frames_per_batch'] says so too.", stacklevel=3)
        capacity = getattr(options.replay_buffer, "capacity", None)
        if isinstance(capacity, int) and capacity < max(steps) * self._width:
            raise ValueError(
                f"{cls_name}: the replay buffer holds {capacity} frames, less than one worker "
                f"batch of {max(steps) * self._width}; raise its capacity or lower frames_per_batch.")
        self.options = options
        self.frames_per_batch = self.requested_frames_per_batch
        self.total_frames = options.total_frames
        self.num_envs = self._width
        self.num_workers = options.num_workers
        self.policy = policy
        self.policy_kind = kind
        self.spec = spec
        self.init_random_frames = options.init_random_frames
        self.postproc = options.postproc
        self.replay_buffer = options.replay_buffer
        self.worker_idx = options.worker_idx  # TorchRL's: this collector's index among several
        self.name = options.name or f"{cls_name}-{uuid.uuid4().hex[:6]}"
        self.policy_version = 0
        self._masked = options.check_finite == "drop_episode"  # dropped episodes leave masked frames
        self._same_td = None  # return_same_td: the batch every later one is written into
        self._trajs = Trajectories() if options.trajs_per_batch else None  # trajs_per_batch
        self.traj_format = options.traj_format or "padded"  # (TorchRL's attribute)
        self._next_iter = None  # next() with trajs_per_batch: steps one iteration
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
        self._route: LocalRoute | None = None  # shared memory with workers on this node
        self._driver = None  # the driver actor's handle, once started
        self._finalizer = None  # kills the driver should this object be dropped unclosed
        self._threads_back = None  # gives the trainer's torch threads back (trainer_threads)
        self._start_driver(create_env_fn, env_fns, policy, kind, spec, steps)
        try:
            owner = weakref.ref(self)
            self._route = LocalRoute(self, self._driver, options, self.worker_info,
                                     is_async=self._async,
                                     version=lambda: getattr(owner(), "policy_version", 0))
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
        if options.cat_results is not None and (not self._multi or (
                self._async and options.cat_results != "stack")):
            raise ValueError(
                f"cat_results is only for MultiSyncDataCollector ({cls_name} yields one worker's "
                f"batch at a time; a multi async collector takes 'stack', as TorchRL's); got "
                f"{options.cat_results!r}. Remove it.")
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
        check_trajectory_options(options, cls_name)
        problem = batch_problem(options, self._async, cls_name)
        if options.shared_memory and problem:
            raise ValueError(f"{cls_name}: shared_memory=True, but {problem}. Pass "
                             "shared_memory=None (use it where possible) or False.")

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
            return tuple(map(shippable, create_env_fn))
        return (shippable(create_env_fn),) * num_workers

    def _batch_geometry(self, options: CollectorOptions) -> tuple[tuple, int]:
        """Steps of each worker's batch, and the frames per yielded batch after rounding up."""
        workers = 1 if self._async else options.num_workers
        each = getattr(self, "_worker_frames", None) or \
            (math.ceil(options.frames_per_batch / workers),) * options.num_workers
        steps = tuple(math.ceil(f / self._width) for f in each)  # (MultiSync: TorchRL's list)
        return steps, sum(steps[:workers]) * self._width

    def _start_driver(self, create_env_fn, env_fns, policy, kind, spec, steps) -> None:
        from collectors.config import load_config  # late: config imports are optional weight

        options = self.options
        self.config = load_config(options.config)
        ensure_ray(**self.config.ray_init_kwargs())
        actor_options = self.config.worker_options(num_cpus=options.num_cpus,
                                                   num_gpus=worker_gpus(options, self.config),
                                                   resources=options.resources)
        check_feasible(actor_options, options.num_workers, type(self).__name__)
        ship_by_value(create_env_fn, options.create_env_kwargs, policy, options.policy_factory,
                      options.init_fn)
        plan = WorkerPlan(env_fns=env_fns, policy=None if options.policy_factory else on_cpu(policy),
                          policy_kind=kind, spec=spec,
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
            self.name, plan_with_key(self._plan_ref), options.for_workers(), actor_options,
            steps_per_worker=steps, envs_per_worker=self._width,
            placement=self.config.placement_options())
        self._finalizer = weakref.finalize(self, _kill_quietly, self._driver)
        startup = options.startup_timeout_s + (self.config.placement.timeout_s
                                               if self.config.placement.strategy else 0.0)
        try:  # the driver bounds each step; this bounds the whole, should the driver hang
            self.worker_info = _ray_get(self._driver.ready.remote(), timeout=startup + 30.0)
            self._worker_handles = ray.get(self._driver.worker_handles.remote(), timeout=30.0)
            here = ray.get_runtime_context().get_node_id()
            lent = trainer_threads.lend(
                options.num_threads, shares=self._multi or self._async,
                workers_here=sum(info.get("node_id") == here for info in self.worker_info))
            # (at shutdown, or when the collector is dropped unclosed, as TorchRL's __del__)
            self._threads_back = weakref.finalize(self, trainer_threads.give_back, lent)
        except BaseException:
            self.shutdown(timeout=5.0, raise_on_error=False)
            raise

    def _collect_through_driver(self, random_actions: bool) -> tuple[list, list]:
        """The driver asks the workers; this fetches their batches: ``(arrays, metas)``."""
        self._route.settled()
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

    # -- iteration (the loop itself: collectors.iteration) ------------------------------------
    def _random_now(self) -> bool:
        return self._frames < self.init_random_frames

    def _collect_one(self):
        self._check_open()
        if self._t_start is None:
            self._first_batch()
        if self.options.pre_collect_hook is not None:
            self.options.pre_collect_hook()
        (self.update_policy_weights_ if self.options.update_at_each_batch else self._sync_if_changed)()
        if self.options.reset_at_each_iter:
            _ray_get(self._driver.broadcast.remote("reset"), timeout=CONTROL_TIMEOUT_S)
        random_actions = self._random_now()
        if self.replay_buffer is not None and hasattr(self.replay_buffer, "actor"):
            metas = _ray_get(self._driver.collect_into.remote(
                self.replay_buffer.write_target(), random_actions, self._async))
            self._frames += sum(m["frames"] for m in metas)
            self._iter += 1
            return None
        local = (self._route.collect_any if self._async else self._route.collect)(random_actions)
        parts, metas = local if local is not None else self._collect_through_driver(random_actions)
        layout = "single" if self._async else self._layout
        batch = assemble(parts, [m["worker"] for m in metas] if self._multi else None, layout,
                         self.options.compact_obs, self.spec.get("env_shape"))
        valid = sum(m["frames"] for m in metas)
        if local is not None and self._async:  # copied out: that worker may collect again
            self._route.release(self._frames + valid < self.init_random_frames)
        self._frames += valid
        self._iter += 1
        batch = finish(batch, self.options, self.postproc, self._masked, self.spec.get("nested"))
        if self.options.post_collect_hook is not None:
            self.options.post_collect_hook(batch)
        if self.replay_buffer is not None:  # a local buffer (e.g. TorchRL's): extend it here
            extend = self._filler.extend if self._filler is not None else self.replay_buffer.extend
            write = lambda td: extend(on_storage_device(td, self.replay_buffer))  # noqa: E731
            if self._trajs is None and not self.options.extend_buffer:  # TorchRL's add() per step
                steps = each_step(batch, layout, len(metas))
                if self._filler is not None:
                    self._filler.extend(steps, steps=True)
                else:
                    for step in steps:
                        self.replay_buffer.add(step)
                return None
            if self._trajs is None:
                write(real_frames(batch, getattr(self.replay_buffer, "storage", None)))
                return None
            self._trajs.ingest(batch)  # complete trajectories only, each flat
            if self.options.reset_at_each_iter:
                self._trajs.clear(partial_only=True)
            per_write = self.options.trajs_per_write
            while self._trajs.complete:
                trajs = self._trajs.take(per_write)
                write(torch.cat(trajs, 0) if len(trajs) > 1 else trajs[0])
            return None
        if self.options.return_same_td:
            return self._into_same_td(batch)
        return batch

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
        if getattr(self, "_closed", True):  # (True: a constructor that raised before any actor)
            return
        if self._filler is not None:
            self._filler.stop(5.0 if timeout is None else min(float(timeout), 5.0))
        self._sync_stop.set()
        if self._sync_thread is not None and self._sync_thread is not threading.current_thread():
            self._sync_thread.join(5.0)
        timeout = 10.0 if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        try:
            if self._route is not None:
                self._route.close()  # settles the last batches, stops the hand-offs
        except Exception:  # noqa: BLE001 - a dead driver or worker: stopped below anyway
            pass
        if self._driver is None:  # construction failed before any actor was started
            self._closed = True
            return
        try:
            self._final_stats = self._local_stats(ray.get(self._driver.stats.remote(), timeout=min(2.0, timeout)))
        except Exception:  # noqa: BLE001
            self._final_stats = self._local_stats({})
        self._closed = True
        if self._threads_back is not None:
            self._threads_back()  # (once: a finalizer runs at most once)
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


def options_doc(indent: str = "    ") -> str:
    """The "Keyword Args" section of the collectors' docstrings, from the field descriptions."""
    lines = ["Keyword Args:"]
    for name, field in CollectorOptions.model_fields.items():
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"{indent}{name} ({default}): {field.description}.")
    return "\n".join(lines)


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
