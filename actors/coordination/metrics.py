"""Metrics through ``ray.util.metrics``, tagged by collector, role and worker.

Exported by Ray's metrics agent (Prometheus format) with a ``ray_`` prefix, e.g.
``ray_collectors_frames_total{collector="...",role="env-worker",worker="0"}``.
"""
from __future__ import annotations

import time

TAGS = ("collector", "role", "worker")
FLUSH_S = 0.5  # how often the batch figures of all workers are handed to Ray's metrics


class Metrics:
    """Created lazily inside an actor; every call is a no-op if Ray's metrics are unavailable."""

    def __init__(self, collector: str, role: str):
        self.base = {"collector": collector, "role": role}
        self.pending: dict = {}  # worker -> figures since the last flush
        self.flushed = 0.0  # when the figures were last handed to Ray
        self.metric = None
        try:
            from ray.util import metrics as ray_metrics

            counter, gauge = ray_metrics.Counter, ray_metrics.Gauge
            self.metric = {
                "frames": counter("collectors_frames", "Frames collected", tag_keys=TAGS),
                "episodes": counter("collectors_episodes", "Episodes finished", tag_keys=TAGS),
                "restarts": counter("collectors_restarts", "Worker restarts", tag_keys=TAGS),
                "frames_per_s": gauge("collectors_frames_per_s", "Frames per second of the last batch", tag_keys=TAGS),
                "episode_return": gauge("collectors_episode_return", "Mean return of the episodes of the last batch", tag_keys=TAGS),
                "env_step_time": gauge("collectors_env_step_time_s", "Mean env.step time per frame (s)", tag_keys=TAGS),
                "latency": gauge("collectors_batch_latency_s", "Time to collect the last batch (s)", tag_keys=TAGS),
                "policy_version": gauge("collectors_policy_version", "Policy version of the last batch", tag_keys=TAGS),
                "policy_lag": gauge("collectors_policy_lag", "Newest version minus the last batch's version", tag_keys=TAGS),
                "buffer_size": gauge("collectors_buffer_size", "Frames held by the replay buffer", tag_keys=TAGS),
                "buffer_inserts": counter("collectors_buffer_inserts", "Frames inserted into the replay buffer", tag_keys=TAGS),
                "buffer_samples": counter("collectors_buffer_samples", "Frames sampled from the replay buffer", tag_keys=TAGS),
            }
        except Exception:  # noqa: BLE001 - metrics are best effort
            self.metric = None

    def _tags(self, worker) -> dict:
        return {**self.base, "worker": str(worker)}

    def batch(self, meta: dict, newest_version: int) -> None:
        """One batch's figures. Counters add up every batch; they and the gauges (the last
        batch's values) reach Ray every ``FLUSH_S`` for all workers at once, and at
        :meth:`flush`: a Ray metric call costs microseconds, thousands of batches a second pass
        here, and Ray exports metrics every few seconds anyway. (Flushed per worker instead,
        the cost grew with the worker count.)"""
        if self.metric is None:
            return
        row = self.pending.setdefault(meta["worker"], {"frames": 0, "episodes": 0, "returns": 0.0,
                                                       "meta": None})
        row["frames"] += meta["frames"]
        row["episodes"] += len(meta["episode_returns"])
        row["returns"] += sum(meta["episode_returns"])
        row["meta"], row["newest"] = meta, newest_version
        if time.monotonic() - self.flushed >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Hand every worker's figures not yet handed over to Ray (before stats, at shutdown)."""
        self.flushed = time.monotonic()
        for worker, row in self.pending.items():
            if row["meta"] is not None:
                self._flush(worker, row)

    def _flush(self, worker, row: dict) -> None:
        meta, frames, episodes = row["meta"], row["frames"], row["episodes"]
        tags = self._tags(worker)
        tags["role"] = "env-worker"
        self.metric["frames"].inc(frames, tags)
        if episodes:
            self.metric["episodes"].inc(episodes, tags)
            self.metric["episode_return"].set(row["returns"] / episodes, tags)
        frames, seconds = meta["frames"], max(meta["collect_time"], 1e-9)
        self.metric["frames_per_s"].set(frames / seconds, tags)
        self.metric["env_step_time"].set(meta["env_time"] / max(frames, 1), tags)
        self.metric["latency"].set(seconds, tags)
        self.metric["policy_version"].set(meta["policy_version"], tags)
        self.metric["policy_lag"].set(row["newest"] - meta["policy_version"], tags)
        row.update(frames=0, episodes=0, returns=0.0, meta=None)

    def restart(self, worker) -> None:
        if self.metric is not None:
            tags = self._tags(worker)
            tags["role"] = "env-worker"
            self.metric["restarts"].inc(1, tags)

    def buffer(self, size: int, inserted: int = 0, sampled: int = 0) -> None:
        if self.metric is None:
            return
        tags = self._tags("-")
        self.metric["buffer_size"].set(size, tags)
        if inserted:
            self.metric["buffer_inserts"].inc(inserted, tags)
        if sampled:
            self.metric["buffer_samples"].inc(sampled, tags)
