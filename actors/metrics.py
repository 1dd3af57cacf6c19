"""Metrics through ``ray.util.metrics``, tagged by collector, role and worker.

Exported by Ray's metrics agent (Prometheus format) with a ``ray_`` prefix, e.g.
``ray_collectors_frames_total{collector="...",role="env-worker",worker="0"}``.
"""
from __future__ import annotations

TAGS = ("collector", "role", "worker")


class Metrics:
    """Created lazily inside an actor; every call is a no-op if Ray's metrics are unavailable."""

    def __init__(self, collector: str, role: str):
        self.base = {"collector": collector, "role": role}
        self.m = None
        try:
            from ray.util import metrics as rm

            c, g = rm.Counter, rm.Gauge
            self.m = {
                "frames": c("collectors_frames", "Frames collected", tag_keys=TAGS),
                "episodes": c("collectors_episodes", "Episodes finished", tag_keys=TAGS),
                "restarts": c("collectors_restarts", "Worker restarts", tag_keys=TAGS),
                "fps": g("collectors_frames_per_s", "Frames per second of the last batch", tag_keys=TAGS),
                "ret": g("collectors_episode_return", "Mean return of the episodes of the last batch", tag_keys=TAGS),
                "step": g("collectors_env_step_time_s", "Mean env.step time per frame (s)", tag_keys=TAGS),
                "latency": g("collectors_batch_latency_s", "Time to collect the last batch (s)", tag_keys=TAGS),
                "version": g("collectors_policy_version", "Policy version of the last batch", tag_keys=TAGS),
                "lag": g("collectors_policy_lag", "Newest version minus the last batch's version", tag_keys=TAGS),
                "size": g("collectors_buffer_size", "Frames held by the replay buffer", tag_keys=TAGS),
                "inserts": c("collectors_buffer_inserts", "Frames inserted into the replay buffer", tag_keys=TAGS),
                "samples": c("collectors_buffer_samples", "Frames sampled from the replay buffer", tag_keys=TAGS),
            }
        except Exception:  # noqa: BLE001 - metrics are best effort
            self.m = None

    def _tags(self, worker) -> dict:
        return {**self.base, "worker": str(worker)}

    def batch(self, meta: dict, newest_version: int) -> None:
        if self.m is None:
            return
        tags = self._tags(meta["worker"])
        tags["role"] = "env-worker"
        frames, t = meta["frames"], max(meta["collect_time"], 1e-9)
        self.m["frames"].inc(frames, tags)
        if meta["episode_returns"]:
            self.m["episodes"].inc(len(meta["episode_returns"]), tags)
            self.m["ret"].set(sum(meta["episode_returns"]) / len(meta["episode_returns"]), tags)
        self.m["fps"].set(frames / t, tags)
        self.m["step"].set(meta["env_time"] / max(frames, 1), tags)
        self.m["latency"].set(t, tags)
        self.m["version"].set(meta["policy_version"], tags)
        self.m["lag"].set(newest_version - meta["policy_version"], tags)

    def restart(self, worker) -> None:
        if self.m is not None:
            tags = self._tags(worker)
            tags["role"] = "env-worker"
            self.m["restarts"].inc(1, tags)

    def buffer(self, size: int, inserted: int = 0, sampled: int = 0) -> None:
        if self.m is None:
            return
        tags = self._tags("-")
        self.m["size"].set(size, tags)
        if inserted:
            self.m["inserts"].inc(inserted, tags)
        if sampled:
            self.m["samples"].inc(sampled, tags)
