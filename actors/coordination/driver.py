"""The driver actor body: one collector's coordinator, made of three parts.

- :class:`~actors.coordination.worker_pool.WorkerPool`: spawns, places and replaces the env actors;
- :class:`~actors.coordination.collection.Collection`: asks them for batches (sync rounds or async stream),
  with the :class:`~actors.coordination.collection.Ledger` accounting for every frame;
- :class:`~actors.coordination.background_writer.BackgroundWriter`: streams batches into a replay buffer.

It handles ObjectRefs and small metadata only; batches go from the env workers' object store
entries straight to their consumer (the trainer, or the replay-buffer actor). Internal: made
remote by the collectors with ``ray.remote(Driver)``.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.coordination.background_writer import BackgroundWriter
from actors.coordination.collection import Collection, Ledger
from actors.coordination.local_feed import LocalFeed, feed_problem
from actors.stepping.env_worker import EnvWorker, worker_steps
from actors.errors import EnvCreationError, StartupTimeout, unwrap
from actors.coordination.metrics import Metrics
from actors.coordination.restarts import RestartBudget
from actors.coordination.worker_pool import WorkerPool

log = logging.getLogger("ray_collectors.driver")


class Driver:
    """Coordinates the env workers of collector ``name``.

    ``plan_ref`` is ``[ObjectRef, authkey]`` of the :class:`WorkerPlan` (kept wrapped so the
    driver never deserializes the policy; each env actor unwraps it); ``actor_options`` are the
    Ray options of each env actor (``num_cpus``...); ``placement`` is ``{"strategy": ...,
    "timeout_s": ...}``.
    """

    def __init__(self, name: str, plan_ref: list, options, actor_options: dict, *,
                 steps_per_worker: int | tuple, envs_per_worker: int | None = None,
                 placement: dict | None = None):
        self.name = name
        self.plan_ref = plan_ref
        self.options = options
        self.num_workers = options.num_workers
        self.actor_options = dict(actor_options)
        self.placement = placement or {}
        self.closed = False
        self.board: dict | None = None  # the weight board's spec: replacements read it too
        self.info: list[dict] = []
        self.metrics = Metrics(name, "driver")
        self.pg = self._placement_group()
        envs = envs_per_worker or options.num_envs  # (a batched TorchRL env's batch size)
        steps = worker_steps(steps_per_worker, self.num_workers)
        self.pool = WorkerPool(
            name, self.num_workers, spawn=self._spawn, kill=_kill, wait_ready=_wait_ready,
            budget=lambda: RestartBudget(options.max_restarts, options.restart_window_s,
                                         options.restart_backoff_s),
            on_error=options.on_worker_error, startup_timeout_s=options.startup_timeout_s,
            id_margin=(max(steps) + 1) * envs + 1)
        self.ledger = Ledger(self.num_workers, self.metrics)
        self.torch_seed: int | None = None  # seed_torch()'s base: replacements are seeded too
        self.pool.on_restart = self._restarted
        self.collection = Collection(
            self.pool, self.ledger, frames_per_worker_batch=tuple(s * envs for s in steps),
            sample_timeout_s=options.sample_timeout_s, prefetch=options.prefetch,
            on_error=options.on_worker_error)
        self.writer = BackgroundWriter(name, self.collection, self.ledger, options.write_timeout_s)
        self.writer.feed_factory = self._local_feed
        self.pool.start()

    # -- workers -----------------------------------------------------------------------------
    def _placement_group(self):
        if not self.placement.get("strategy"):
            return None
        from ray.util.placement_group import placement_group

        bundle = {"CPU": self.actor_options.get("num_cpus", 0.25)}
        if self.actor_options.get("num_gpus"):
            bundle["GPU"] = self.actor_options["num_gpus"]
        bundle.update(self.actor_options.get("resources", {}))
        return placement_group([bundle] * self.num_workers, strategy=self.placement["strategy"],
                               name=f"{self.name}/placement")

    def _spawn(self, i: int, *, id_counter: int, restarts: int, weights, policy_version: int, seed):
        name = f"{self.name}/env-worker-{i}" if restarts == 0 else f"{self.name}/env-worker-{i}-r{restarts}"
        options = dict(self.actor_options)
        if self.pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options.pop("resources", None)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=i)
        cls = ray.remote(concurrency_groups=EnvWorker.CONCURRENCY)(EnvWorker).options(
            name=name, max_restarts=0, **options)
        return cls.remote(self.plan_ref, worker_index=i, id_counter=id_counter,
                          restarts=restarts, weights=weights, policy_version=policy_version,
                          seed=seed, board=self.board)

    def ready(self) -> list[dict]:
        """Wait until every worker has built its envs; raise within ``startup_timeout_s``."""
        if self.pg is not None:
            timeout = self.placement.get("timeout_s", 30.0)
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
            if not ready:
                self.shutdown()
                raise StartupTimeout(
                    f"placement group for {self.num_workers} env workers of {self.name!r} "
                    f"(strategy {self.placement['strategy']}, each {self.actor_options}) could not "
                    f"be placed within {timeout:g}s: no set of nodes has those resources. Lower "
                    "resources.env_worker or num_workers, or add nodes.")
        workers = self.pool.alive()
        refs = [h.ready.remote() for _, h in workers]
        deadline = time.monotonic() + self.options.startup_timeout_s
        infos = []
        for (i, _), ref in zip(workers, refs):
            try:
                infos.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except GetTimeoutError:
                pending = [j for (j, _), r in zip(workers, refs) if not ray.wait([r], timeout=0)[0]]
                self.shutdown()
                raise StartupTimeout(
                    f"env workers {pending} of {self.name!r} did not start within "
                    f"{self.options.startup_timeout_s:g}s; their resource request "
                    f"{self.actor_options} may not fit any node (check ray.available_resources()), "
                    "or env creation hangs.") from None
            except (RayTaskError, RayActorError) as exc:
                self.shutdown()
                raise EnvCreationError(
                    f"env worker {i} of {self.name!r} failed to start (building its envs or "
                    f"unpickling the policy):\n{exc}") from None
        self.info = infos
        return infos

    def worker_handles(self, alive_only: bool = False) -> list:
        """Every worker's env actor; ``alive_only``: ``None`` for one that is gone (it could
        not be replaced)."""
        handles = self.pool.handles()
        return [h if not alive_only or self.pool.is_alive(i) else None for i, h in enumerate(handles)]

    def kill_worker(self, i: int) -> None:
        """Testing hook: kill worker ``i`` as a crash would (it is replaced on next use)."""
        _kill(self.pool.handle(i))

    # -- collection --------------------------------------------------------------------------
    def collect_sync(self, random_actions: bool = False, preempt=None) -> list:
        return self.collection.collect_sync(random_actions, preempt)

    def next_ready(self, random_actions: bool = False):
        return self.collection.next_ready(random_actions)

    def collect_into(self, buffer, random_actions: bool = False, one: bool = False) -> list:
        """Collect (all workers, or the first ready with ``one``) and write into ``buffer``;
        the buffer actor fetches the batches from the object store itself. Returns the metas."""
        results = [self.next_ready(random_actions)] if one else self.collect_sync(random_actions)
        self.writer.write(buffer, results)
        return [meta for _, meta in results]

    # -- the local route: batches the trainer took from the workers itself (shared memory) ---
    def batch_timeout(self, i: int) -> float:
        """How long worker ``i`` may take for its next batch before it counts as hung."""
        return self.collection.timeout(i)

    def settle_many(self, items: list, newest_version: int) -> list[float]:
        """Account batches the trainer took from the workers itself, in bulk: ``[(i, meta)]``.
        Returns every worker's timeout for its next batch."""
        self.collection.newest_version = max(self.collection.newest_version, int(newest_version))
        for i, meta in items:
            self.collection.settle(i, meta)
        return [self.collection.timeout(i) for i in range(self.num_workers)]

    def cancelled(self, workers: list) -> None:
        """The trainer stopped with these workers' requests in flight: their frames are dropped."""
        for i in workers:
            self.ledger.drop(i, "cancelled", self.collection.worker_frames[i])

    def use_board(self, spec: dict) -> None:
        """The workers (and every replacement) take their weights from this board from now on."""
        self.board = spec
        self._call_all(self.pool.alive(), "attach_board", spec)

    def direct_failed(self, i: int, handle, kind: str, cause: str, message: str,
                      error: BaseException | None = None) -> None:
        """Such a batch failed (see ``Collection.failed``); nothing to do if ``handle`` (equal
        by actor id) is no longer worker ``i``."""
        current = self.pool.handle(i)
        if current is not None and current == handle:
            self.collection.failed(i, current, kind, cause, message, error=error)

    def lost(self, metas: list) -> None:
        """The consumer could not fetch these batches (their worker died): undeliver them."""
        for meta in metas:
            self.ledger.undeliver(meta, "lost_before_fetch")

    # -- background --------------------------------------------------------------------------
    def start(self, buffer, total_frames: int = -1, random_frames: int = 0) -> bool:
        return self.writer.start(buffer, total_frames, random_frames)

    def _local_feed(self, routes, epoch: str):
        """A :class:`LocalFeed` into the buffer (its shards: ``routes``) when it and every env
        actor share this node."""
        infos = ray.get([routes.targets[i].info.remote() for i in routes.alive()],
                        timeout=self.options.write_timeout_s)
        problem = feed_problem(self.options, self.info, infos, ray.get_runtime_context().get_node_id())
        if problem is not None:
            log.info("%s: batches go to the replay buffer through the object store: %s",
                     self.name, problem)
            return None
        return LocalFeed(self.writer, self.collection, routes, epoch, self.options.write_timeout_s)

    def stop(self, timeout: float = 10.0) -> bool:
        return self.writer.stop(timeout)

    def pause(self, paused: bool) -> None:
        self.writer.pause(paused)

    def is_running(self) -> bool:
        return self.writer.is_running()

    def background_error(self):
        return None if self.writer.error is None else repr(self.writer.error)

    # -- control -----------------------------------------------------------------------------
    def set_weights(self, weights: list, version: int, worker_ids=None) -> int:
        """Send ``[ref]`` to the workers; each applies it before its next batch. Replacements
        start with the newest weights sent to all workers."""
        if worker_ids is None:
            targets = self.pool.set_weights(weights, version)
        else:
            bad = [i for i in worker_ids if not 0 <= i < self.num_workers]
            if bad:
                raise ValueError(f"worker_ids {bad} out of range: {self.name!r} has workers "
                                 f"0..{self.num_workers - 1}.")
            targets = [(i, h) for i, h in self.pool.alive() if i in set(worker_ids)]
        self._call_all(targets, "set_weights", weights, version)
        return version

    def set_seed(self, seed, static_seed: bool = False) -> list:
        return self._call_all(self.pool.set_seed(seed, static_seed), "set_seed", seed, static_seed)

    def seed_torch(self, base: int) -> list:
        """Seed worker ``i``'s torch RNG with ``base + i`` (a replacement's: plus
        ``num_workers`` times its restarts, so no two share a stream)."""
        self.torch_seed = int(base)
        return self._results([(i, h, h.seed_torch.remote(self._torch_seed_of(i)))
                              for i, h in self.pool.alive()])

    def _torch_seed_of(self, i: int) -> int:
        return self.torch_seed + i + self.num_workers * self.pool.restarts[i]

    def _restarted(self, i: int) -> None:
        self.ledger.restarted(i)
        if self.torch_seed is not None:  # (queued before its ready call: runs before any batch)
            self.pool.handle(i).seed_torch.remote(self._torch_seed_of(i))

    def broadcast(self, method: str, *args) -> list:
        return self._call_all(self.pool.alive(), method, *args)

    def call_workers(self, calls: dict) -> list:
        """``{worker index: (method, args)}``: one call each, e.g. per-worker env resets."""
        targets = [(i, h) for i, h in self.pool.alive() if i in calls]
        refs = [(i, h, getattr(h, calls[i][0]).remote(*calls[i][1])) for i, h in targets]
        return self._results(refs)

    def _call_all(self, targets: list, method: str, *args) -> list:
        return self._results([(i, h, getattr(h, method).remote(*args)) for i, h in targets])

    def _results(self, refs: list) -> list:
        """Results of calls made on a snapshot of workers. A worker that died (or was replaced)
        meanwhile is skipped: its replacement starts from the pool's current state."""
        out = []
        for _, _, ref in refs:
            try:
                out.append(ray.get(ref))
            except RayActorError:
                continue  # replaced, or dead and replaced at its next collection
        return out

    def stats(self) -> dict:
        self.metrics.flush()
        return {
            "workers": self.num_workers,
            "workers_alive": self.pool.num_alive(),
            "per_worker": [dict(s, dropped=dict(s["dropped"])) for s in self.ledger.per_worker],
            "episode_returns": list(self.ledger.episode_returns[-100:]),
            "env_error_log": list(self.ledger.env_error_log),
            "background_frames": self.writer.frames,
            "written_batches": self.writer.written_batches,
            "shared_memory_writes": self.writer.feed_batches,
            "written_batch_ids": list(self.writer.written_ids),
            "buffer_resends": self.writer.resends,
            "buffer_write_calls": self.writer.write_calls,
            "buffer_restart_resends": self.writer.restart_resends,
            "running": self.writer.is_running(),
            "policy_version": self.pool.version,
            "worker_info": self.info,
        }

    def shutdown(self, timeout: float = 5.0) -> list[str]:
        """Ask workers to close their envs (``timeout=0``: don't), then kill them all.

        Returns the errors raised on the way (an env's ``close()``...); a worker that does not
        close in time is killed and logged, which is not an error.
        """
        if self.closed:
            return []
        self.closed = True
        problems = []
        if not self.writer.stop(min(timeout, 2.0)):
            log.warning("background writer of %s did not stop within %.1fs", self.name, timeout)
        self.metrics.flush()
        handles = [h for _, h in self.pool.alive()] if timeout > 0 else []
        refs = [h.close.remote() for h in handles]
        if refs:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            if len(done) < len(refs):
                log.warning("%d env workers of %s did not close their envs within %.1fs; killed",
                            len(refs) - len(done), self.name, timeout)
            for ref in done:
                try:
                    ray.get(ref)
                except RayActorError:
                    pass  # a worker that died meanwhile has no env left to close
                except RayTaskError as exc:  # an env's close() raised: reported to the caller
                    problems.append(f"closing envs raised {unwrap(exc)!r}")
        for h in self.pool.close():
            _kill(h)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"removing the placement group raised {exc!r}")
        return problems


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead
        pass


def _wait_ready(handle, timeout: float) -> bool:
    ready, _ = ray.wait([handle.ready.remote()], timeout=timeout)
    return bool(ready)

