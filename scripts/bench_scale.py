"""Coordination at scale: one driver, many env actors on one machine.

    python scripts/bench_scale.py [--workers 64] [--cpus-per-worker 0.02]

Each worker steps a trivial counting env with a one-layer policy (so weights can be sent).
Prints the time to start all actors, the batches per second the driver sustains (sync rounds
and async single batches), and the weight broadcast time.
"""
from __future__ import annotations

import argparse
import os
import time


import ray
from torch import nn

from collectors import MultiaSyncDataCollector, MultiSyncDataCollector
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env


def batches_per_s(collector, seconds: float) -> float:
    """Batches per second yielded by ``collector`` over ``seconds`` (after one warm-up batch)."""
    it = iter(collector)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--cpus-per-worker", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=10, help="steps per worker per batch")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    w = args.workers
    ray.init(num_cpus=max(2, int(w * args.cpus_per_worker) + 2), dashboard_host="127.0.0.1",
             log_to_driver=False)
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    common = dict(num_workers=w, frames_per_batch=w * args.steps, num_cpus=args.cpus_per_worker,
                  startup_timeout_s=600)
    print(f"{w} env actors, {args.cpus_per_worker} CPU each, {args.steps} steps per batch, "
          f"{os.cpu_count()} cores")
    t0 = time.perf_counter()
    c = MultiSyncDataCollector(counting_env, policy, **common)
    print(f"start all actors (first collector): {time.perf_counter() - t0:.1f} s")
    rate = batches_per_s(c, args.seconds)
    print(f"sync rounds: {rate:.1f} rounds/s = {rate * w:.0f} worker batches/s "
          f"({rate * w * args.steps:,.0f} frames/s)")
    times = []
    for _ in range(5):
        t1 = time.perf_counter()
        c.update_policy_weights_()
        times.append(time.perf_counter() - t1)
    print(f"weight broadcast to {w} actors: {min(times) * 1000:.1f} ms (best of 5), "
          f"{sum(times) / len(times) * 1000:.1f} ms mean")
    big = nn.Sequential(nn.Linear(1, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 2), ArgmaxLayer())
    c.shutdown()
    t0 = time.perf_counter()
    c = MultiSyncDataCollector(counting_env, big, **common)
    print(f"start all actors again (second collector): {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    c.update_policy_weights_()
    mb = sum(p.numel() * 4 for p in big.parameters()) / 1e6
    print(f"weight broadcast of {mb:.1f} MB to {w} actors: {(time.perf_counter() - t1) * 1000:.0f} ms")
    c.shutdown()
    c = MultiaSyncDataCollector(counting_env, policy, **common)
    rate = batches_per_s(c, args.seconds)
    print(f"async: {rate:.0f} batches/s through the driver ({rate * args.steps:,.0f} frames/s)")
    c.shutdown()


if __name__ == "__main__":
    main()
