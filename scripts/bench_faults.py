"""Recovery figures: time from a worker's death to its replacement producing data, and time to
a clear error for a permanently broken env.

    python scripts/bench_faults.py
"""
from __future__ import annotations

import functools
import os
import signal
import time


import ray
from torch import nn

from collectors import CollectorError, MultiaSyncDataCollector, MultiSyncDataCollector
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env, faulty_counting_env


def death_to_data(policy) -> float:
    """SIGKILL worker 1, then time until a batch from its replacement arrives."""
    with MultiaSyncDataCollector(counting_env, policy, num_workers=2, frames_per_batch=100) as c:
        it = iter(c)
        for _ in range(4):
            next(it)
        os.kill(c.worker_info[1]["pid"], signal.SIGKILL)
        t0 = time.perf_counter()
        while True:
            batch = next(it)
            # a batch of worker 1 that the driver hands out after replacing it is the new one's
            if int(batch["collector", "worker_id"][0]) == 1 and c.stats()["restarts"] >= 1:
                return time.perf_counter() - t0


def broken_env_error(max_restarts: int, backoff: float) -> float:
    env = functools.partial(faulty_counting_env, "raise_step", None, 1, float("inf"))
    c = MultiSyncDataCollector(env, num_workers=2, frames_per_batch=20, max_restarts=max_restarts,
                               restart_backoff_s=backoff)
    t0 = time.perf_counter()
    try:
        c.next()
    except CollectorError:
        return time.perf_counter() - t0
    finally:
        c.shutdown()
    raise AssertionError("no error")


def main() -> None:
    ray.init(num_cpus=4, dashboard_host="127.0.0.1", log_to_driver=False)
    torch_policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    for name, policy in (("random policy", None), ("nn.Module policy", torch_policy)):
        times = [death_to_data(policy) for _ in range(3)]
        print(f"worker SIGKILL -> replacement's first batch ({name}): "
              f"{min(times):.2f} s best, {sum(times) / 3:.2f} s mean of 3")
    for restarts, backoff in ((3, 0.0), (3, 0.1)):
        print(f"permanently broken env -> CollectorError (max_restarts={restarts}, "
              f"backoff {backoff}s doubling): {broken_env_error(restarts, backoff):.2f} s")


if __name__ == "__main__":
    main()
