"""What a collector reports: ``stats()``."""
from __future__ import annotations

import time

import ray


class FiguresMixin:
    """``DataCollectorBase.stats()``: the trainer's counts plus the driver's."""

    def stats(self, workers: str = "aggregate") -> dict:
        """Plain-dict figures; still answers after ``shutdown()``.

        ``workers`` (TorchRL's): ``"aggregate"`` (the collector's figures), ``"per_worker"``
        (``"worker_<i>/<figure>"`` for each env actor, with ``workers`` and ``workers_alive``) or
        ``"both"``.
        """
        if workers not in ("aggregate", "per_worker", "both"):
            raise ValueError(f"workers must be 'aggregate', 'per_worker' or 'both'; got {workers!r}.")
        if self._closed:
            out = dict(self._final_stats or self._local_stats({}))
        else:
            try:
                if self._route is not None:  # (None only while construction fails)
                    self._route.settled()
                driver = ray.get(self._driver.stats.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - stats never raise
                driver = {}
            out = self._local_stats(driver)
        if workers == "aggregate":
            return out
        per = {f"worker_{i}/{key}": value for i, row in enumerate(out["per_worker"])
               for key, value in row.items()}
        if workers == "per_worker":
            return {"workers": out["workers"], "workers_alive": out["workers_alive"], **per}
        return {**out, **per}

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
            # Ray calls that wrote batches through the object store (ready batches share one)
            "buffer_write_calls": driver.get("buffer_write_calls", 0),
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
            # batches handed over through shared memory (the local route), not the driver
            "shared_memory_batches": self._route.batches if self._route else 0,
            # batches the trainer took from the env actors by Ray calls (other nodes, no /dev/shm)
            "direct_batches": self._route.direct.batches if self._route and self._route.direct else 0,
            # start(): batches env actors handed to the replay buffer through shared memory
            "shared_memory_writes": driver.get("shared_memory_writes", 0),
        }
        for i, p in enumerate(per):
            for key in ("frames", "delivered", "policy_version", "restarts", "env_errors", "timeouts"):
                out[f"worker_{i}/{key}"] = p.get(key, 0)
        return out
