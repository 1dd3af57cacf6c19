"""The env-stepping actor body: one :class:`~actors.stepping.rollout.Rollout` plus weights and accounting.

Made remote by the driver side with ``ray.remote(EnvWorker)``; usable in-process for tests.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray

from actors.stepping.attr_path import resolve
from actors.stepping.main_park import MainThreadPark, park_interval
from actors.stepping.compact import compact_arrays
from actors.shm.handoff import HandoffServer
from actors.options import CollectorOptions
from actors.stepping.policy_runner import local_device
from actors.stepping.rollout import Rollout
from actors.stepping.env_building import make_env_fn
from actors.stepping.td_rollout import TensorDictRollout
from actors.stepping.vector_rollout import VectorRollout

log = logging.getLogger("ray_collectors.worker")


@dataclass(frozen=True)
class WorkerPlan:
    """What every env worker of one collector is built from; put in Ray's object store once.

    ``env_fns`` holds one factory (a gymnasium id or a callable) per worker; ``spec`` is the
    storage spec from :func:`collectors.validate.build_spec`; ``steps`` the steps per batch
    (a tuple: one per worker, TorchRL's per-worker ``frames_per_batch``).
    """

    env_fns: tuple
    policy: Any
    policy_kind: str
    spec: dict
    steps: int | tuple
    options: CollectorOptions
    policy_factory: Any = None  # builds the policy in the actor, instead of ``policy``


def worker_steps(steps: int | tuple, num_workers: int) -> tuple:
    """Steps per batch of each worker."""
    return tuple(steps) if isinstance(steps, tuple) else (steps,) * num_workers


class WorkerView:
    """What ``get_distant_attr`` sees in an env actor, as TorchRL's per-worker collector shows
    it: ``env`` (the env; a list with ``num_envs > 1`` gymnasium envs), ``policy`` (this
    actor's copy), ``frames_per_batch`` (this worker's), ``worker_idx``, ``policy_version``."""

    def __init__(self, worker: "EnvWorker"):
        r = worker.rollout
        envs = getattr(r, "envs", None)
        self.env = r.env if envs is None else (envs[0] if len(envs) == 1 else list(envs))
        self.policy = getattr(r, "policy", r.runner.policy)
        self.frames_per_batch = r.num_envs * r.steps
        self.worker_idx = worker.worker_index
        self.policy_version = r.policy_version


class EnvWorker:
    """Steps ``num_envs`` envs with a copy of the policy; see ``collect``.

    Internal: made remote by the driver with ``ray.remote(concurrency_groups=CONCURRENCY)``;
    usable in-process for tests.
    """

    # control calls never wait behind a batch; the hand-off loop has a thread of its own, so
    # plain calls (``close``, ``ready``) still answer while it serves
    CONCURRENCY = {"control": 1, "handoff": 1}

    def __init__(self, plan: WorkerPlan, *, worker_index: int = 0, id_counter: int = 0,
                 restarts: int = 0, weights=None, policy_version: int = 0,
                 seed: tuple | None = None, board: dict | None = None):
        if isinstance(plan, list):  # [ref, authkey]: the trainer's key first, for Manager proxies
            multiprocessing.current_process().authkey = plan[1]
            plan = ray.get(plan[0])
        options = plan.options
        self.worker_index = worker_index
        self._board = None  # a BoardReader: the policy's weights in shared memory
        self._handoff: HandoffServer | None = None  # batches to a trainer on this node
        self._park = MainThreadPark(park_interval(options.main_thread_sleep_s))
        self.restarts = restarts
        self.batches = 0
        self._collecting = None
        self._preempt_next = False  # preempt(next_batch=True) while idle: cut the next one
        self._lock = threading.Lock()  # guards _collecting and _deferred
        self._batch_lock = threading.Lock()  # held for a whole batch: close() waits for it
        self._profiler = None  # enable_profile(): a BatchProfiler over the next batches
        self._deferred: list = []  # control calls that arrived mid-batch: applied before the next
        self.frames = 0
        self.episodes = 0
        self.compact_obs = options.compact_obs
        # the node in every batch's meta: start() writes it to the replay shard on that node
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        if options.worker_nice:
            os.nice(options.worker_nice)  # background work: the trainer keeps its CPU share
        if plan.policy_kind != "random" or options.num_sub_threads != 1:
            import torch

            # 1 by default: tiny per-step batches, threads cost more than they give
            torch.set_num_threads(options.num_sub_threads)
        os.environ["RAY_COLLECTORS_WORKER_ID"] = str(worker_index)
        os.environ["RAY_COLLECTORS_WORKER_RESTARTS"] = str(restarts)
        if seed is not None:  # (seed, static_seed) of the latest set_seed(): replacements follow it
            options = options.model_copy(update={"seed": seed[0]})
        if options.policy_device not in (None, "cpu"):  # the GPU Ray gave this actor, by its name here
            options = options.model_copy(update={"policy_device": local_device(options.policy_device)})
        if options.init_fn is not None:
            options.init_fn()
        env_fn = make_env_fn(plan.env_fns[worker_index], options.env_kwargs(worker_index))
        width = options.num_envs * (plan.spec.get("env_batch") or 1)  # envs stepped here
        ids = dict(slot_offset=worker_index * width, id_stride=options.num_workers,
                   id_offset=worker_index, id_counter=id_counter)
        policy = self._policy(plan, options.policy_device, worker_index)
        steps = worker_steps(plan.steps, options.num_workers)[worker_index]
        if plan.spec.get("torchrl"):
            self.rollout = TensorDictRollout(env_fn, policy, plan.policy_kind,
                                             steps, options, **ids)
        elif options.native_vector:  # resolved to True/False by the collector
            self.rollout = VectorRollout(plan.env_fns[worker_index], options.env_kwargs(worker_index),
                                         policy, plan.policy_kind, plan.spec,
                                         steps, options, **ids)
        else:
            self.rollout = Rollout([env_fn] * options.num_envs, policy,
                                   plan.policy_kind, plan.spec, steps, options, **ids)

        def per_env_loop(policy, id_counter: int) -> Rollout:
            return Rollout([env_fn] * options.num_envs, policy, plan.policy_kind, plan.spec,
                           steps, options, **dict(ids, id_counter=id_counter))

        self._per_env_loop = per_env_loop
        if seed is not None and seed[1]:
            self._leave_vector_loop()
            self.rollout.set_seed(seed[0], static_seed=True)
        if weights is not None:
            self.set_weights(weights, policy_version)
        if board is not None:
            self.attach_board(board)

    @staticmethod
    def _policy(plan: WorkerPlan, device: str | None, worker_index: int = 0):
        """The policy this actor runs: built by the factory (this worker's, from a list),
        moved to its device, compiled."""
        options = plan.options
        factory = plan.policy_factory
        if isinstance(factory, (list, tuple)):
            factory = factory[worker_index]
        policy = factory() if factory is not None else plan.policy
        if policy is None or plan.policy_kind == "random":
            return policy
        if device not in (None, "cpu") and hasattr(policy, "to"):
            policy = policy.to(device)
        if options.compile_policy:
            import torch

            kwargs = options.compile_policy if isinstance(options.compile_policy, dict) else {}
            policy = torch.compile(policy, **kwargs)
        return policy

    def ready(self) -> dict:
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {"pid": os.getpid(), "node_id": self.node_id if ctx else None}

    def collect(self, random_actions: bool = False) -> tuple[dict, dict]:
        """Collect one batch; returns ``(arrays, meta)``. ``arrays`` are reused next call."""
        with self._batch_lock:
            return self._collect(random_actions)

    def _collect(self, random_actions: bool) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        with self._lock:
            self._run_deferred()
            self._collecting = self.batches + 1
            self.rollout.stop_requested, self._preempt_next = self._preempt_next, False
            self._take_board()
        t_weights = time.perf_counter() - t0
        gc.disable()  # the loop makes no cycles; a full collection of Ray's heap mid-batch costs
        self.rollout.episode_returns = []
        self.rollout.env_errors = []
        profiling = self._profiler.batch() if self._profiler is not None else contextlib.nullcontext()
        try:
            with profiling:
                batch = self.rollout.collect(random_actions)
        finally:
            gc.enable()
            with self._lock:
                self._collecting = None
                self._run_deferred()
        if self.compact_obs:  # next observations the following step holds are not shipped
            batch = compact_arrays(batch)
        frames = self.rollout.num_envs * self.rollout.last_valid_steps - self.rollout.dropped_frames
        self.batches += 1
        self.frames += frames
        self.episodes += len(self.rollout.episode_returns)
        for err in self.rollout.env_errors:
            log.error("worker %s env %s (seed %s) failed in %s; rebuilt:\n%s", self.worker_index,
                      err["env"], err["seed"], err["phase"], err["traceback"])
        meta = {
            "worker": self.worker_index,
            "frames": frames,
            "dropped_frames": self.rollout.dropped_frames,
            "batch_index": self.batches,
            "episode_returns": list(self.rollout.episode_returns),
            "env_errors": [dict(e, traceback=e["traceback"][-2000:]) for e in self.rollout.env_errors],
            "id_counter": self.rollout.id_counter,
            "policy_version": self.rollout.policy_version,
            "env_time": self.rollout.last_env_time,
            "collect_time": time.perf_counter() - t0,
            "weights_time": t_weights,  # of which applying deferred calls and new weights
            "restarts": self.restarts,
            "node_id": self.node_id,
        }
        return batch, meta

    @ray.method(concurrency_group="control")
    def distant_attr(self, path: str):
        """``get_distant_attr``: ``path`` resolved on :class:`WorkerView` (env, policy, ...)."""
        return resolve(WorkerView(self), path)

    @ray.method(concurrency_group="control")
    def fake_batch(self) -> dict:
        """Zeros laid out as :meth:`collect`'s arrays (``fake_tensordict``); steps nothing."""
        batch = self.rollout.fake_arrays()
        return compact_arrays(batch) if self.compact_obs else batch

    @ray.method(concurrency_group="control")
    def preempt(self, next_batch: bool = False) -> bool:
        """Cut the batch being collected short after its current step (called from another
        thread; a cut batch keeps at least one step). Idle: a no-op, or with ``next_batch`` the
        next batch is cut after its first step (an ``interruptor`` stopped between batches)."""
        with self._lock:
            if self._collecting is not None:
                self.rollout.stop_requested = True
                return True
            self._preempt_next = self._preempt_next or next_batch
            return next_batch

    @ray.method(num_returns=2)
    def collect_pair(self, random_actions: bool = False) -> tuple[dict, dict]:
        """``collect`` as two return objects: the caller (the driver) waits on the small meta
        and hands the batch's ref to the consumer, who fetches it. Ray inlines small batches in
        the reply and stores large ones in the object store; either way it costs less than a
        ``ray.put`` here (about 1.8 ms per batch less, measured)."""
        return self.collect(random_actions)

    @ray.method(concurrency_group="handoff")
    def serve(self) -> str:
        """Hand batches to the trainer that connects to ``open_handoff``'s socket until it says
        stop or goes away (see :mod:`actors.shm.handoff`); returns why it ended."""
        server, self._handoff = self._handoff, None
        if server is None:
            return "no hand-off opened"
        with self._park:  # Ray's main thread idles in long sleeps while this thread serves
            return server.serve(self.collect)

    # -- control: a thread of its own, never queued behind a batch in flight ------------------
    @ray.method(concurrency_group="control")
    def open_handoff(self, folder: str, slots: int = 1) -> str:
        """Listen for the trainer in ``folder``; ``serve()`` then answers it. Returns the address.
        ``slots=2``: the consumer keeps two requests in flight (see ``SlotWriter``)."""
        self._handoff = HandoffServer(folder, f"w{self.worker_index}-r{self.restarts}", slots)
        return self._handoff.address

    @ray.method(concurrency_group="control")
    def attach_board(self, spec: dict) -> None:
        """Take weights from the board in shared memory from the next batch on."""
        from actors.shm.weight_board import BoardReader  # (torch: only for a module policy)

        def attach():
            self._board = BoardReader(spec, self.worker_index, self.rollout.runner.module)

        self._apply(attach)

    def _take_board(self) -> None:
        """New weights on the board, if any, into the policy (between batches only)."""
        if self._board is not None:
            version = self._board.poll()
            if version is not None:
                self.rollout.policy_version = version

    def _between_batches(self, fn, timeout: float = 60.0):
        """``fn()``'s result, run when no batch is being collected (see ``_apply``)."""
        done, box = threading.Event(), {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                box["error"] = exc
            finally:
                done.set()

        self._apply(run)
        if not done.wait(timeout):
            raise TimeoutError(f"worker {self.worker_index}: its batch did not end within "
                               f"{timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()

    def _apply(self, fn) -> None:
        """Run ``fn`` now if no batch is being collected, else right after the current one
        (before the next): control calls return at once and never change a batch midway."""
        with self._lock:
            if self._collecting is None:
                fn()
            else:
                self._deferred.append(fn)

    @ray.method(concurrency_group="control")
    def enable_profile(self, config: dict) -> None:
        """Profile the next batches (see :mod:`actors.stepping.profiling`)."""
        from actors.stepping.profiling import BatchProfiler

        def start():
            self._profiler = BatchProfiler(config, self.worker_index)

        self._apply(start)

    @ray.method(concurrency_group="control")
    def disable_profile(self) -> None:
        def stop():
            if self._profiler is not None:
                self._profiler.stop()
            self._profiler = None

        self._apply(stop)

    @ray.method(concurrency_group="control")
    def set_weights(self, weights, version: int) -> int:
        if isinstance(weights, list):  # a wrapped ObjectRef, resolved here and only here
            weights = ray.get(weights[0])

        def load():
            self.rollout.runner.load_weights(weights)
            self.rollout.policy_version = int(version)

        self._apply(load)
        return int(version)

    def _leave_vector_loop(self) -> None:
        """A native vector env seeds all its envs from one generator and resets all or none:
        ``set_seed(static_seed=True)`` and resetting some envs hand over to the per-env loop
        (same trajectory-id counter, policy and version; fresh episodes)."""
        old = self.rollout
        if not isinstance(old, VectorRollout):
            return
        self.rollout = self._per_env_loop(old.runner.policy, old.id_counter)
        self.rollout.policy_version = old.policy_version
        old.close()

    @ray.method(concurrency_group="control")
    def set_seed(self, seed: int | None, static_seed: bool = False) -> None:
        def apply():
            if static_seed:
                self._leave_vector_loop()
            self.rollout.set_seed(seed, static_seed)

        self._apply(apply)

    @ray.method(concurrency_group="control")
    def seed_torch(self, seed: int) -> None:
        """Seed this actor's torch RNG (the collector's own, drawn in the trainer)."""
        import torch

        self._apply(lambda: torch.manual_seed(int(seed)))

    @ray.method(concurrency_group="control")
    def reset(self, env_indices=None) -> None:
        def apply():
            if env_indices is not None and sorted(map(int, env_indices)) != list(range(self.rollout.num_envs)):
                self._leave_vector_loop()
            self.rollout.reset(env_indices)

        self._apply(apply)

    @ray.method(concurrency_group="control")
    def state_dict(self) -> dict:
        r = self.rollout
        out = {"id_counter": r.id_counter, "policy_version": r.policy_version,
               "frames": self.frames, "batches": self.batches, "seed": r.seed}

        def parts() -> dict:  # one wait between batches for both
            extra = {}
            if hasattr(r.runner.module, "state_dict"):  # the weights sent so far, as TorchRL
                self._take_board()
                extra["policy_state_dict"] = {k: v.detach().cpu().clone()
                                              for k, v in r.runner.module.state_dict().items()}
            if hasattr(getattr(r, "env", None), "state_dict"):  # a TorchRL env: VecNorm's stats
                extra["env_state_dict"] = r.env.state_dict()
            return extra

        if hasattr(r.runner.module, "state_dict") or hasattr(getattr(r, "env", None), "state_dict"):
            out.update(self._between_batches(parts))
        return out

    @ray.method(concurrency_group="control")
    def load_state_dict(self, state: dict) -> None:
        def load():
            r = self.rollout
            r.id_counter = max(r.id_counter, int(state.get("id_counter", 0)))
            r.policy_version = int(state.get("policy_version", r.policy_version))
            if "policy_state_dict" in state:
                r.runner.load_weights(state["policy_state_dict"])
                if self._board is not None:  # the restored weights stand, with their version
                    self._board.mark_seen()
            if "env_state_dict" in state and hasattr(getattr(r, "env", None), "load_state_dict"):
                r.env.load_state_dict(state["env_state_dict"])
            r.reset()  # fresh episodes: their ids continue after the restored counter

        self._apply(load)

    def close(self) -> None:
        with self._batch_lock:  # a batch still being served finishes first
            self.rollout.close()
