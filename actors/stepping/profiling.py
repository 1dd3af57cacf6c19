"""Profiling an env actor's batches with ``torch.profiler`` (TorchRL's ``enable_profile``).

The first ``warmup`` batches run under the profiler and are discarded, the next ones are
recorded; after ``num_rollouts`` batches the trace is exported as a Chrome trace to
``save_path`` (``{worker_idx}`` is replaced by the worker's index), or handed to
``on_trace_ready``.

    >>> profiler = BatchProfiler({"num_rollouts": 2, "warmup_rollouts": 1}, worker_index=0)
    >>> for _ in range(2):  # doctest: +SKIP
    ...     with profiler.batch():
    ...         collect()
"""
from __future__ import annotations

import contextlib
import os

DEFAULT_PATH = "collector_profile_{worker_idx}.json"


class BatchProfiler:
    """One profiling run over ``num_rollouts`` batches of one env actor."""

    def __init__(self, config: dict, worker_index: int):
        self.config = dict(config)
        self.worker_index = worker_index
        self.batches = 0
        self.done = False
        self._profile = None

    def _start(self):
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule

        c = self.config
        kinds = {"cpu": ProfilerActivity.CPU, "cuda": ProfilerActivity.CUDA}
        wanted = c.get("activities") or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
        warmup = int(c.get("warmup_rollouts", 1))
        path = (c.get("save_path") or DEFAULT_PATH).replace("{worker_idx}", str(self.worker_index))
        handler = c.get("on_trace_ready") or (lambda prof: prof.export_chrome_trace(path))
        if c.get("on_trace_ready") is None and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._profile = profile(
            activities=[kinds[a] for a in wanted],
            schedule=schedule(wait=0, warmup=warmup, active=int(c["num_rollouts"]) - warmup,
                              repeat=1),
            on_trace_ready=handler, record_shapes=c.get("record_shapes", True),
            profile_memory=c.get("profile_memory", False), with_stack=c.get("with_stack", True),
            with_flops=c.get("with_flops", False))
        self._profile.__enter__()

    def stop(self) -> None:
        """End the run now (``disable_profile``): a trace not written yet is dropped."""
        profile, self._profile, self.done = self._profile, None, True
        if profile is not None:
            profile.on_trace_ready = None
            profile.__exit__(None, None, None)

    @contextlib.contextmanager
    def batch(self):
        """Around one batch; the run ends (and the trace is written) after the last one."""
        if self.done:
            yield
            return
        if self._profile is None:
            self._start()
        try:
            yield
        finally:
            self._profile.step()
            self.batches += 1
            if self.batches >= int(self.config["num_rollouts"]):
                profile, self._profile, self.done = self._profile, None, True
                profile.__exit__(None, None, None)
