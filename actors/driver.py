"""The driver actor body: owns the env workers, asks them for batches, replaces failed ones.

It handles ObjectRefs and small metadata only; batches go from the env workers' object store
entries straight to their consumer (the trainer, or the replay-buffer actor).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from actors.env_worker import EnvWorker
from actors.metrics import Metrics

log = logging.getLogger("ray_collectors.driver")

FATAL_ERRORS = ("PolicyError", "EnvRestartsExhausted", "PolicyOutputError", "EnvSpecError")


class WorkerFailure(RuntimeError):
    """A worker failed in a way the driver must not retry (or its restart budget is spent)."""

    def __init__(self, worker: int, message: str, kind: str):
        self.worker = worker
        self.kind = kind
        super().__init__(message)

    def __reduce__(self):
        return (WorkerFailure, (self.worker, self.args[0], self.kind))


class Driver:
    """Coordinates ``num_workers`` env workers.

    ``config_ref`` is ``[ObjectRef]`` of the worker config (kept wrapped so the driver never
    deserializes the policy). ``options`` holds the per-worker actor options (``num_cpus``...).
    """

    def __init__(self, name: str, config_ref: list, num_workers: int, options: dict, *,
                 steps_per_worker: int, envs_per_worker: int, sample_timeout_s: float | None = None,
                 startup_timeout_s: float = 60.0, max_restarts: int = 3,
                 restart_window_s: float = 60.0, restart_backoff_s: float = 0.0,
                 on_worker_error: str = "restart", prefetch: int = 1, placement: dict | None = None,
                 write_timeout_s: float = 30.0):
        self.name = name
        self.config_ref = config_ref
        self.num_workers = num_workers
        self.options = dict(options)
        self.frames_per_worker_batch = steps_per_worker * envs_per_worker
        self.margin = (steps_per_worker + 1) * envs_per_worker + 1
        self.sample_timeout_s = sample_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.restart_backoff_s = restart_backoff_s
        self.on_worker_error = on_worker_error
        self.prefetch = max(1, int(prefetch))
        self.lock = threading.RLock()
        self.weights = None  # [ObjectRef] of the newest weights
        self.version = 0
        self.workers: list = [None] * num_workers
        self.alive = [False] * num_workers
        self.info: list[dict] = [{} for _ in range(num_workers)]
        self.per_worker = [
            {"frames": 0, "delivered": 0, "batches": 0, "dropped": {}, "env_errors": 0,
             "restarts": 0, "timeouts": 0, "policy_version": 0, "id_counter": 0, "episodes": 0}
            for _ in range(num_workers)
        ]
        self.restart_times: list[list[float]] = [[] for _ in range(num_workers)]
        self.episode_returns: list[float] = []
        self.env_error_log: list[dict] = []
        self.inflight: dict = {}  # collect ref -> worker index (async mode)
        self.bg_thread = None
        self.bg_stop = threading.Event()
        self.bg_error = None
        self.bg_frames = 0
        self.bg_total = -1
        self.bg_paused = threading.Event()
        self.bg_written = deque(maxlen=50_000)  # ids of the last batches the buffer acknowledged
        self.written_batches = 0
        self.write_lock = threading.Lock()
        self.write_timeout_s = write_timeout_s
        self.buffer_resends = 0
        self.closed = False
        self.metrics = Metrics(name, "driver")
        self.pg = None
        self.placement = placement or {}
        if self.placement.get("strategy"):
            from ray.util.placement_group import placement_group

            bundle = {"CPU": self.options.get("num_cpus", 0.25)}
            if self.options.get("num_gpus"):
                bundle["GPU"] = self.options["num_gpus"]
            bundle.update(self.options.get("resources", {}))
            self.pg = placement_group([bundle] * num_workers, strategy=self.placement["strategy"],
                                      name=f"{name}/placement")
        for i in range(num_workers):
            self._spawn(i)

    # -- workers ---------------------------------------------------------------------------
    def _spawn(self, i: int, id_counter: int = 0, restarts: int = 0) -> None:
        name = f"{self.name}/env-worker-{i}" if restarts == 0 else f"{self.name}/env-worker-{i}-r{restarts}"
        options = dict(self.options)
        if self.pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options.pop("resources", None)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=i)
        cls = ray.remote(concurrency_groups={"control": 1})(EnvWorker).options(
            name=name, max_restarts=0, **options)
        self.workers[i] = cls.remote(self.config_ref[0], worker_index=i, id_counter=id_counter,
                                     restarts=restarts, weights=self.weights,
                                     policy_version=self.version)
        self.alive[i] = True

    def ready(self) -> list[dict]:
        """Wait until every worker has built its envs; raise within ``startup_timeout_s``."""
        if self.pg is not None:
            timeout = self.placement.get("timeout_s", 30.0)
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
            if not ready:
                self.shutdown()
                raise TimeoutError(
                    f"placement group for {self.num_workers} env workers of {self.name!r} "
                    f"(strategy {self.placement['strategy']}, each {self.options}) could not be "
                    f"placed within {timeout:g}s: no set of nodes has those resources. Lower "
                    "resources.env_worker or num_workers, or add nodes.")
        refs = [w.ready.remote() for w in self.workers]
        deadline = time.monotonic() + self.startup_timeout_s
        infos = []
        for i, ref in enumerate(refs):
            try:
                infos.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except GetTimeoutError:
                pending = [j for j, r in enumerate(refs[i:], i) if not ray.wait([r], timeout=0)[0]]
                self.shutdown()
                raise TimeoutError(
                    f"env workers {pending} of {self.name!r} did not start within "
                    f"{self.startup_timeout_s:g}s; their resource request {self.options} may not "
                    "fit any node (check ray.available_resources()), or env creation hangs."
                ) from None
            except (RayTaskError, RayActorError) as exc:
                self.shutdown()
                raise WorkerFailure(i, f"env worker {i} of {self.name!r} failed to start (building "
                                       f"its envs or unpickling the policy):\n{exc}", "init") from None
        self.info = infos
        return infos

    def _replace(self, i: int, reason: str, error: str = "") -> None:
        """Kill and respawn worker ``i``; raise ``WorkerFailure`` past the restart budget."""
        now = time.monotonic()
        times = [t for t in self.restart_times[i] if now - t < self.restart_window_s]
        if self.on_worker_error == "raise" or len(times) >= self.max_restarts:
            self.alive[i] = False
            raise WorkerFailure(
                i, f"worker {i} of {self.name!r} failed ({reason}); restarts within "
                f"{self.restart_window_s:g}s: {len(times)} (max_restarts={self.max_restarts}). "
                f"Last error:\n{error}", reason)
        if self.restart_backoff_s:
            time.sleep(min(self.restart_backoff_s * 2 ** len(times), 30.0))
        times.append(now)
        self.restart_times[i] = times
        stats = self.per_worker[i]
        stats["restarts"] += 1
        self.metrics.restart(i)
        log.warning("replacing worker %d of %s (%s)", i, self.name, reason)
        try:
            ray.kill(self.workers[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self._spawn(i, id_counter=stats["id_counter"] + self.margin, restarts=stats["restarts"])
        # wait until it has built its envs (with the current weights): if it cannot be placed
        # (a lost node, no room left) the run goes on without it, and says so
        ready, _ = ray.wait([self.workers[i].ready.remote()], timeout=self.startup_timeout_s)
        if not ready:
            ray.kill(self.workers[i], no_restart=True)
            self.alive[i] = False
            log.warning("worker %d of %s could not be restarted within %.0fs (no room on the "
                        "remaining nodes?); continuing with %d of %d workers", i, self.name,
                        self.startup_timeout_s, sum(self.alive), self.num_workers)
            if not any(self.alive):
                raise WorkerFailure(i, f"no worker of {self.name!r} is left: the last one could "
                                       "not be restarted (no room on the remaining nodes?)", "lost")

    def lost(self, metas: list) -> None:
        """The consumer could not fetch these batches (their worker died): undeliver them."""
        for meta in metas:
            self._undeliver(meta, "lost_before_fetch")

    def _undeliver(self, meta: dict, reason: str) -> None:
        """A batch counted as delivered did not reach its consumer: count it dropped."""
        s = self.per_worker[meta["worker"]]
        s["delivered"] -= meta["frames"]
        s["frames"] -= meta["frames"]
        self._drop(meta["worker"], reason, meta["frames"])
        meta["frames"] = 0

    def _drop(self, i: int, reason: str, frames: int) -> None:
        """Count frames produced (or in flight) but never delivered."""
        self.per_worker[i]["frames"] += frames
        d = self.per_worker[i]["dropped"]
        d[reason] = d.get(reason, 0) + frames

    def _account(self, meta: dict, delivered: bool = True) -> None:
        if meta.get("dropped_frames"):
            self._drop(meta["worker"], "bad_output", meta["dropped_frames"])
        s = self.per_worker[meta["worker"]]
        s["frames"] += meta["frames"]
        if delivered:
            s["delivered"] += meta["frames"]
        s["batches"] += 1
        s["policy_version"] = meta["policy_version"]
        s["id_counter"] = max(s["id_counter"], meta["id_counter"])
        s["episodes"] += len(meta["episode_returns"])
        s["env_errors"] += len(meta["env_errors"])
        self.env_error_log.extend(dict(e, worker=meta["worker"]) for e in meta["env_errors"])
        self.episode_returns.extend(meta["episode_returns"])
        del self.episode_returns[:-1000]
        self.metrics.batch(meta, self.version)

    def _resolve(self, ref, i: int):
        """``ray.get`` one collect result; ``None`` after replacing a dead worker."""
        try:
            return ray.get(ref)
        except RayActorError as exc:
            self._drop(i, "worker_died", self.frames_per_worker_batch)
            self._replace(i, "died", str(exc))
            return None
        except RayTaskError as exc:
            cause = type(exc.cause).__name__ if exc.cause is not None else ""
            if cause in FATAL_ERRORS or self.on_worker_error == "raise":
                self.alive[i] = False
                raise WorkerFailure(i, f"worker {i} of {self.name!r} failed with {cause or 'an error'} "
                                   f"(not retried):\n{exc}", cause) from None
            self._drop(i, "error", self.frames_per_worker_batch)
            self._replace(i, "error", str(exc))
            return None

    # -- synchronous -----------------------------------------------------------------------
    def collect_sync(self, random_actions: bool = False, worker_ids=None, preempt=None) -> list:
        """One batch from every worker (or ``worker_ids``), in worker order: ``[([ref], meta)]``.

        ``preempt=p``: once a fraction ``p`` of the workers delivered, the others are told to
        stop early; their partial batches (unfilled frames have traj id -1) are delivered too.
        """
        ids = list(range(self.num_workers)) if worker_ids is None else list(worker_ids)
        pending = {self.workers[i].collect_ref.remote(random_actions): i for i in ids if self.alive[i]}
        quorum = None if preempt is None else max(1, int(-(-preempt * len(pending) // 1)))
        preempted = False
        results = {}
        deadline = None if self.sample_timeout_s is None else time.monotonic() + self.sample_timeout_s
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:  # hung workers: kill, replace, ask again
                for ref, i in list(pending.items()):
                    self.per_worker[i]["timeouts"] += 1
                    self._drop(i, "timeout", self.frames_per_worker_batch)
                    self._replace(i, "timeout", f"no batch within sample_timeout_s={self.sample_timeout_s}")
                    del pending[ref]
                    if self.alive[i]:
                        pending[self.workers[i].collect_ref.remote(random_actions)] = i
                deadline = time.monotonic() + self.sample_timeout_s
                continue
            ref = ready[0]
            i = pending.pop(ref)
            out = self._resolve(ref, i)
            if out is None:
                if self.alive[i]:
                    pending[self.workers[i].collect_ref.remote(random_actions)] = i
                continue
            self._account(out[1])
            results[i] = out
            if quorum is not None and not preempted and len(results) >= quorum and pending:
                preempted = True
                for j in pending.values():
                    self.workers[j].preempt.remote()
        return [results[i] for i in sorted(results)]

    def collect_into(self, buffer, random_actions: bool = False, one: bool = False) -> list:
        """Collect (all workers, or the first ready with ``one``) and write into ``buffer``.

        The buffer actor fetches the batches from the object store itself; returns the metas.
        """
        results = [self.next_ready(random_actions)] if one else self.collect_sync(random_actions)
        for refs, meta in results:
            self.write(buffer, refs, meta)
        return [meta for _, meta in results]

    def _batch_id(self, meta: dict) -> tuple:
        """Unique across collectors sharing a buffer: (collector, worker, restarts, index)."""
        return (self.name, meta["worker"], meta["restarts"], meta["batch_index"])

    # -- asynchronous ----------------------------------------------------------------------
    def _submit(self, i: int, random_actions: bool = False) -> None:
        self.inflight[self.workers[i].collect_ref.remote(random_actions)] = i

    def next_ready(self, random_actions: bool = False):
        """The first batch any worker finishes: ``([ref], meta)``; keeps ``prefetch`` per worker."""
        if not self.inflight:
            for i in range(self.num_workers):
                if self.alive[i]:
                    for _ in range(self.prefetch):
                        self._submit(i, random_actions)
        while True:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self.sample_timeout_s)
            if not ready:
                self._timeout_inflight(random_actions)
                continue
            ref = ready[0]
            i = self.inflight.pop(ref)
            out = self._resolve(ref, i)
            if out is None:
                self._resubmit_after_replace(i, random_actions)
                continue
            self._account(out[1])
            self._submit(i, random_actions)
            return out

    def _resubmit_after_replace(self, i: int, random_actions: bool) -> None:
        for r in [r for r, j in self.inflight.items() if j == i]:
            del self.inflight[r]
            self._drop(i, "worker_died", self.frames_per_worker_batch)
        if self.alive[i]:
            for _ in range(self.prefetch):
                self._submit(i, random_actions)

    def _timeout_inflight(self, random_actions: bool) -> None:
        """No worker answered within the timeout: replace those whose oldest call is stuck."""
        stuck = sorted(set(self.inflight.values()))
        for i in stuck:
            self.per_worker[i]["timeouts"] += 1
            self._replace(i, "timeout", f"no batch within sample_timeout_s={self.sample_timeout_s}")
            self._resubmit_after_replace(i, random_actions)

    def cancel_inflight(self) -> None:
        """Forget outstanding async requests (their frames are counted as dropped)."""
        for ref, i in list(self.inflight.items()):
            self._drop(i, "cancelled", self.frames_per_worker_batch)
        self.inflight.clear()

    # -- background collection into a replay buffer -----------------------------------------
    def start(self, buffer, total_frames: int = -1) -> bool:
        """Collect on a thread of this actor and ``extend`` ``buffer`` until told to stop."""
        if self.bg_thread is not None and self.bg_thread.is_alive():
            return False
        self.bg_stop.clear()
        self.bg_total = total_frames
        self.bg_thread = threading.Thread(target=self._background, args=(buffer,), daemon=True)
        self.bg_thread.start()
        return True

    def _background(self, buffer) -> None:
        try:
            while not self.bg_stop.is_set():
                if self.bg_total > 0 and self.bg_frames >= self.bg_total:
                    break
                refs, meta = self.next_ready()
                while not self.bg_stop.is_set():
                    with self.write_lock:
                        if not self.bg_paused.is_set():
                            self.write(buffer, refs, meta)
                            self.bg_frames += meta["frames"]
                            break
                    time.sleep(0.005)
                else:
                    self._undeliver(meta, "stopped")
        except BaseException as exc:  # noqa: BLE001 - reported through is_running()/stats()
            self.bg_error = exc
            log.exception("background collection of %s stopped", self.name)
        finally:
            self.cancel_inflight()

    def write(self, buffer, refs: list, meta: dict) -> int:
        """Write one batch into the buffer actor, resending until acknowledged.

        The buffer ignores a batch id it already holds, so a resend after its restart stores
        the batch once. Raises ``WorkerFailure`` (kind ``buffer``) after ``write_timeout_s``.
        """
        batch_id = self._batch_id(meta)
        deadline = time.monotonic() + self.write_timeout_s
        while True:
            try:
                n = ray.get(buffer.extend_ref.remote(refs, batch_id),
                            timeout=max(0.1, deadline - time.monotonic()))
                self.bg_written.append(batch_id)
                self.written_batches += 1
                return n
            except RayTaskError as exc:
                if not isinstance(exc.cause, ObjectLostError) and "ObjectLost" not in repr(exc) \
                        and "OwnerDied" not in repr(exc):
                    raise
                # the worker that owned this batch died before the buffer fetched it
                self._undeliver(meta, "lost_before_write")
                return 0
            except (RayActorError, GetTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise WorkerFailure(
                        meta["worker"], f"replay buffer unavailable: no acknowledgement of batch "
                        f"{batch_id} within write_timeout_s={self.write_timeout_s:g} ({exc!r}).",
                        "buffer") from None
                self.buffer_resends += 1
                time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> bool:
        self.bg_stop.set()
        if self.bg_thread is not None:
            self.bg_thread.join(timeout)
            return not self.bg_thread.is_alive()
        return True

    def pause(self, paused: bool) -> None:
        """Stop (or resume) writes; returns once no write is in progress."""
        if paused:
            self.bg_paused.set()
            with self.write_lock:
                pass
        else:
            self.bg_paused.clear()

    def is_running(self) -> bool:
        return self.bg_thread is not None and self.bg_thread.is_alive()

    def background_error(self):
        return None if self.bg_error is None else repr(self.bg_error)

    # -- control ---------------------------------------------------------------------------
    def set_weights(self, weights: list, version: int, worker_ids=None) -> int:
        """Send ``[ref]`` to the workers; each applies it before its next batch."""
        ids = range(self.num_workers) if worker_ids is None else worker_ids
        if worker_ids is None:
            self.weights, self.version = weights, version
        ray.get([self.workers[i].set_weights.remote(weights, version) for i in ids if self.alive[i]])
        return version

    def broadcast(self, method: str, *args) -> list:
        return ray.get([getattr(w, method).remote(*args) for i, w in enumerate(self.workers) if self.alive[i]])

    def worker_handles(self) -> list:
        return list(self.workers)

    def kill_worker(self, i: int) -> None:
        """Testing hook: kill worker ``i`` as a crash would (it is replaced on next use)."""
        ray.kill(self.workers[i], no_restart=True)

    def stats(self) -> dict:
        return {
            "workers": self.num_workers,
            "workers_alive": sum(self.alive),
            "per_worker": [dict(s, dropped=dict(s["dropped"])) for s in self.per_worker],
            "episode_returns": list(self.episode_returns[-100:]),
            "env_error_log": list(self.env_error_log[-50:]),
            "background_frames": self.bg_frames,
            "written_batches": self.written_batches,
            "written_batch_ids": list(self.bg_written),
            "buffer_resends": self.buffer_resends,
            "running": self.is_running(),
            "policy_version": self.version,
            "worker_info": self.info,
        }

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask workers to close their envs, then kill them all."""
        if self.closed:
            return
        self.closed = True
        self.bg_stop.set()
        refs = [w.close.remote() for w, a in zip(self.workers, self.alive) if w is not None and a]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for w in self.workers:
            if w is not None:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        self.alive = [False] * self.num_workers
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
