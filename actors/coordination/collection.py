"""Collection: asking the pool's workers for batches (all at once, or as they come), and the
ledger that accounts for every frame: produced = delivered + dropped (by reason).

Each batch is a return object of its own, fetched by its consumer; only ``([ref], meta)``
pairs pass through here (the meta is fetched, the batch never is).
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.errors import CollectorError, FatalWorkerError, unwrap
from actors.coordination.metrics import Metrics
from actors.coordination.worker_pool import WorkerPool

ENV_ERRORS_KEPT = 50
# hang detection when sample_timeout_s is None (the default): a worker is hung once it spends
# HANG_FACTOR times its slowest batch so far, never less than HANG_FLOOR_S; before its first
# batch (envs warming up, a policy compiling) FIRST_BATCH_S
HANG_FACTOR = 10.0
HANG_FLOOR_S = 60.0
FIRST_BATCH_S = 600.0


class Ledger:
    """Per-worker counts and recent episode returns; every frame is delivered or dropped."""

    def __init__(self, count: int, metrics: Metrics):
        self.metrics = metrics
        self.per_worker = [
            {"frames": 0, "delivered": 0, "batches": 0, "dropped": {}, "env_errors": 0,
             "restarts": 0, "timeouts": 0, "policy_version": 0, "episodes": 0}
            for _ in range(count)
        ]
        self.episode_returns: list[float] = []
        self.env_error_log: list[dict] = []  # the last env errors, shown in stats()

    def drop(self, i: int, reason: str, frames: int) -> None:
        """Count frames produced (or in flight) but never delivered."""
        self.per_worker[i]["frames"] += frames
        d = self.per_worker[i]["dropped"]
        d[reason] = d.get(reason, 0) + frames

    def undeliver(self, meta: dict, reason: str) -> None:
        """A batch counted as delivered did not reach its consumer: count it dropped."""
        s = self.per_worker[meta["worker"]]
        s["delivered"] -= meta["frames"]
        s["frames"] -= meta["frames"]
        self.drop(meta["worker"], reason, meta["frames"])
        meta["frames"] = 0

    def restarted(self, i: int) -> None:
        self.per_worker[i]["restarts"] += 1
        self.metrics.restart(i)

    def account(self, meta: dict, newest_version: int) -> None:
        if meta.get("dropped_frames"):
            self.drop(meta["worker"], "bad_output", meta["dropped_frames"])
        s = self.per_worker[meta["worker"]]
        s["frames"] += meta["frames"]
        s["delivered"] += meta["frames"]
        s["batches"] += 1
        s["policy_version"] = meta["policy_version"]
        s["episodes"] += len(meta["episode_returns"])
        s["env_errors"] += len(meta["env_errors"])
        self.env_error_log.extend(dict(e, worker=meta["worker"]) for e in meta["env_errors"])
        del self.env_error_log[:-ENV_ERRORS_KEPT]
        self.episode_returns.extend(meta["episode_returns"])
        del self.episode_returns[:-1000]
        self.metrics.batch(meta, newest_version)


class Collection:
    """Sync rounds (``collect_sync``) and async streaming (``next_ready``) over a pool."""

    def __init__(self, pool: WorkerPool, ledger: Ledger, *, frames_per_worker_batch: tuple,
                 sample_timeout_s: float | None, prefetch: int, on_error: str):
        self.pool = pool
        self.ledger = ledger
        self.worker_frames = frames_per_worker_batch  # frames of a batch, per worker
        self.sample_timeout_s = sample_timeout_s
        self.prefetch = prefetch
        self.on_error = on_error
        self.inflight: dict = {}  # async: collect ref -> (worker index, handle)
        self.slowest = [None] * pool.count  # slowest batch (s) of each worker so far
        self.active_since: dict = {}  # async: worker -> when its oldest call in flight began
        self.batch_refs: dict = {}  # meta ref -> batch ref, for every call not yet resolved
        self.newest_version = 0  # the trainer's newest policy version (weights on the board)

    def timeout(self, i: int) -> float:
        """How long worker ``i`` may take for one batch before it counts as hung."""
        if self.sample_timeout_s is not None:
            return self.sample_timeout_s
        slowest = self.slowest[i]
        return FIRST_BATCH_S if slowest is None else max(HANG_FLOOR_S, HANG_FACTOR * slowest)

    def _call(self, i: int, handle, random_actions: bool):
        """Ask worker ``i`` for a batch: ``(meta ref, batch ref)``; only the meta is fetched
        here, the batch goes from the worker to its consumer."""
        batch_ref, meta_ref = handle.collect_pair.remote(random_actions)
        self.batch_refs[meta_ref] = batch_ref
        return meta_ref

    def _resolve(self, ref, i: int, handle):
        """``ray.get`` one collect result (by its meta ref): ``([batch ref], meta)``; ``None``
        after replacing a failed worker."""
        batch_ref = self.batch_refs.pop(ref)
        try:
            meta = ray.get(ref)
        except RayActorError as exc:
            self.failed(i, handle, "died", "", str(exc))
            return None
        except RayTaskError as exc:
            cause = unwrap(exc)
            kind = "fatal" if isinstance(cause, FatalWorkerError) else "error"
            self.failed(i, handle, kind, type(cause).__name__, str(exc), error=cause)
            return None
        self.settle(i, meta)
        return [batch_ref], meta

    def settle(self, i: int, meta: dict) -> None:
        """Account a batch worker ``i`` delivered."""
        self.pool.note_id_counter(i, meta["id_counter"])
        # (weights in shared memory reach the workers without the driver: the newest version
        # it knows is the trainer's last word or the newest any batch ran)
        self.newest_version = max(self.newest_version, meta["policy_version"])
        self.ledger.account(meta, max(self.pool.version, self.newest_version))
        took = meta.get("collect_time", 0.0)
        self.slowest[i] = took if self.slowest[i] is None else max(self.slowest[i], took)

    def failed(self, i: int, handle, kind: str, cause: str, message: str,
               error: BaseException | None = None) -> None:
        """Worker ``i``'s batch failed: ``kind`` is ``"died"``, ``"timeout"``, ``"error"`` (an
        exception named ``cause``) or ``"fatal"`` (a ``FatalWorkerError``). Its frames are
        counted dropped and the worker replaced, or ``CollectorError`` is raised for a fatal
        error (or any error with ``on_worker_error="raise"``)."""
        if kind == "timeout":
            self._timed_out(i, handle)
        elif kind == "died":
            self.ledger.drop(i, "worker_died", self.worker_frames[i])
            self.pool.replace(i, "died", message, handle=handle)
        elif kind == "fatal" or self.on_error == "raise":
            self.pool.mark_dead(i)
            raise CollectorError(
                f"worker {i} of {self.pool.name!r} failed with {cause} (not retried):\n"
                f"{message}", worker=i, original=getattr(error, "original", None)) from None
        else:
            self.ledger.drop(i, "error", self.worker_frames[i])
            self.pool.replace(i, "error", message, handle=handle)

    def _timed_out(self, i: int, handle, drop: bool = True) -> None:
        self.ledger.per_worker[i]["timeouts"] += 1
        if drop:  # (async: the in-flight requests are dropped when resubmitted)
            self.ledger.drop(i, "timeout", self.worker_frames[i])
        self.pool.replace(i, "timeout", f"no batch within {self.timeout(i):g}s (sample_timeout_s="
                          f"{self.sample_timeout_s}; None: adaptive)", handle=handle)

    # -- synchronous -------------------------------------------------------------------------
    def collect_sync(self, random_actions: bool = False, preempt: float | None = None) -> list:
        """One batch from every alive worker, in worker order: ``[([ref], meta)]``.

        ``preempt=p``: once a fraction ``p`` of the workers delivered, the others are told to
        stop early; their partial batches (unfilled frames have traj id -1) are delivered too.
        """
        pending = {}  # ref -> (worker, handle, deadline)
        for i, h in self.pool.alive():
            pending[self._call(i, h, random_actions)] = (i, h, time.monotonic() + self.timeout(i))
        quorum = None if preempt is None else int(-(-preempt * len(pending) // 1))
        preempted = quorum == 0  # 0 (TorchRL's): every batch is cut after its first step
        for _, h, _ in (pending.values() if preempted else ()):
            h.preempt.remote(next_batch=True)
        results = {}
        while pending:
            wait = max(0.0, min(d for _, _, d in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:  # past its deadline: kill, replace, ask the replacement
                now = time.monotonic()
                for ref, (i, h, deadline) in list(pending.items()):
                    if deadline <= now:
                        del pending[ref]
                        self.batch_refs.pop(ref, None)
                        self._timed_out(i, h)
                        self._ask_again(pending, i, random_actions)
                continue
            i, h, _ = pending.pop(ready[0])
            out = self._resolve(ready[0], i, h)
            if out is None:
                self._ask_again(pending, i, random_actions)
                continue
            results[i] = out
            if quorum is not None and not preempted and len(results) >= quorum and pending:
                preempted = True
                for _, hj, _ in pending.values():
                    hj.preempt.remote()
        return [results[i] for i in sorted(results)]

    def _ask_again(self, pending: dict, i: int, random_actions: bool) -> None:
        if self.pool.is_alive(i):
            h = self.pool.handle(i)
            pending[self._call(i, h, random_actions)] = (i, h, time.monotonic() + self.timeout(i))

    # -- asynchronous ------------------------------------------------------------------------
    def _submit(self, i: int, handle, random_actions: bool = False) -> None:
        if not any(j == i for j, _ in self.inflight.values()):
            self.active_since[i] = time.monotonic()
        self.inflight[self._call(i, handle, random_actions)] = (i, handle)

    def next_ready(self, random_actions: bool = False):
        """The first batch any worker finishes: ``([ref], meta)``; keeps ``prefetch`` per worker."""
        if not self.inflight:
            for i, h in self.pool.alive():
                for _ in range(self.prefetch):
                    self._submit(i, h, random_actions)
        while True:
            if not self.inflight:
                raise CollectorError(f"no worker of {self.pool.name!r} is left to collect from.")
            workers = {i for i, _ in self.inflight.values()}
            deadline = min(self.active_since[i] + self.timeout(i) for i in workers)
            refs = list(self.inflight)  # oldest request first
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._timeout_inflight(random_actions)
                continue
            # of all that are ready, serve the oldest: the one ray.wait reports is in no fair
            # order, and with workers that are always ready it can pass one over for good (a
            # dead worker then went unnoticed for minutes)
            ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] or ready
            if deadline <= time.monotonic() and self._timeout_inflight(random_actions, set(ready)):
                continue  # (one hung while the others delivered)
            i, h = self.inflight.pop(ready[0])
            self.active_since[i] = time.monotonic()  # its next call in flight starts now
            out = self._resolve(ready[0], i, h)
            if out is None:
                self._resubmit_after_replace(i, random_actions)
                continue
            self._submit(i, h, random_actions)
            return out

    def ready_now(self, random_actions: bool = False, limit: int = 64) -> list:
        """Batches workers already finished, oldest request first, up to ``limit``: never
        waits (``[]`` when none is there). Each worker is asked again as in :meth:`next_ready`."""
        refs = list(self.inflight)
        ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        out = []
        for ref in ready[:limit]:
            if ref not in self.inflight:  # (its worker was replaced meanwhile)
                continue
            i, h = self.inflight.pop(ref)
            self.active_since[i] = time.monotonic()
            got = self._resolve(ref, i, h)
            if got is None:
                self._resubmit_after_replace(i, random_actions)
                continue
            self._submit(i, h, random_actions)
            out.append(got)
        return out

    def _resubmit_after_replace(self, i: int, random_actions: bool) -> None:
        for r in [r for r, (j, _) in self.inflight.items() if j == i]:
            del self.inflight[r]
            self.batch_refs.pop(r, None)
            self.ledger.drop(i, "worker_died", self.worker_frames[i])
        if self.pool.is_alive(i):
            h = self.pool.handle(i)
            for _ in range(self.prefetch):
                self._submit(i, h, random_actions)

    def _timeout_inflight(self, random_actions: bool, spare=frozenset()) -> bool:
        """Replace exactly the workers whose call in flight is past its deadline (not those
        with a ready call in ``spare``); the others keep delivering. False: none was."""
        now, stuck = time.monotonic(), {}
        done = {self.inflight[r][0] for r in spare if r in self.inflight}
        for i, h in self.inflight.values():
            if self.active_since[i] + self.timeout(i) <= now and i not in done:
                stuck.setdefault(i, h)
        for i, h in sorted(stuck.items(), key=lambda kv: kv[0]):
            self._timed_out(i, h, drop=False)
            self._resubmit_after_replace(i, random_actions)
        return bool(stuck)

    def cancel_inflight(self) -> None:
        """Forget outstanding async requests (their frames are counted as dropped)."""
        for i, _ in self.inflight.values():
            self.ledger.drop(i, "cancelled", self.worker_frames[i])
        for r in self.inflight:
            self.batch_refs.pop(r, None)
        self.inflight.clear()
