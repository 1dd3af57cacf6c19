"""Coordination at scale: one driver, many env actors on one machine.

    python scripts/bench_scale.py [--workers 64] [--cpus-per-worker 0.02] [--only buffer]

Each worker steps a trivial counting env with a one-layer policy (so weights can be sent).
Prints the time to start all actors, the batches per second (sync rounds and async single
batches), each beside bare Ray doing the same (plain actors returning numpy batches, one call in
flight per actor) as a ratio from the same run, and the weight broadcast time.
"""
from __future__ import annotations

import argparse
import os
import time


import ray
from torch import nn

from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, RayReplayBuffer
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


class _BareWorker:
    """The bare-Ray ceiling's actor: a counting env stepped with the same one-layer policy,
    returning a batch of numpy arrays per call (one Ray call per batch, no framework)."""

    def __init__(self, steps: int):
        import numpy as np
        import torch

        torch.set_num_threads(1)
        self.np, self.torch, self.steps = np, torch, steps
        self.env = counting_env()
        self.obs, _ = self.env.reset(seed=0)
        self.policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())

    def batch(self) -> dict:
        """A 10-row batch of numpy arrays and nothing else: the cost of the Ray call alone."""
        np = self.np
        return {"observation": np.zeros((self.steps, 1), np.float32),
                "action": np.zeros(self.steps, np.int64),
                "reward": np.zeros(self.steps, np.float32), "done": np.zeros(self.steps, bool)}

    def collect(self) -> dict:
        np, torch = self.np, self.torch
        obs = np.zeros((self.steps, 1), np.float32)
        act = np.zeros(self.steps, np.int64)
        rew = np.zeros(self.steps, np.float32)
        done = np.zeros(self.steps, bool)
        with torch.no_grad():
            for t in range(self.steps):
                obs[t] = self.obs
                act[t] = int(self.policy(torch.as_tensor(self.obs[None]))[0])
                self.obs, rew[t], term, trunc, _ = self.env.step(act[t])
                done[t] = term or trunc
                if done[t]:
                    self.obs, _ = self.env.reset()
        return {"observation": obs, "action": act, "reward": rew, "done": done}


def bare_ray(workers: int, cpus: float, steps: int, seconds: float, rounds: bool,
             work: bool = True) -> float:
    """Batches/s of plain actors, one call in flight per actor (``rounds``: all of them, then
    the next round, as a sync collector; else ``ray.wait`` for any, as an async one). ``work``:
    each call steps the env with the policy as ours do; else it only returns a batch."""
    actors = [ray.remote(num_cpus=cpus)(_BareWorker).remote(steps) for _ in range(workers)]
    call = (lambda a: a.collect.remote()) if work else (lambda a: a.batch.remote())
    try:
        ray.get([call(a) for a in actors])  # started and warm
        n, t0 = 0, time.perf_counter()
        if rounds:
            while time.perf_counter() - t0 < seconds:
                ray.get([call(a) for a in actors])
                n += workers
        else:
            inflight = {call(a): a for a in actors}
            while time.perf_counter() - t0 < seconds:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                a = inflight.pop(ready[0])
                ray.get(ready[0])
                inflight[call(a)] = a
                n += 1
            ray.get(list(inflight))
        return n / (time.perf_counter() - t0)
    finally:
        for a in actors:
            ray.kill(a)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--cpus-per-worker", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=10, help="steps per worker per batch")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--only", choices=["buffer"], help="only start() into a RayReplayBuffer")
    p.add_argument("--shards", type=int, default=1, help="replay shards (num_shards) of that buffer")
    p.add_argument("--object-store", action="store_true",
                   help="batches by Ray calls and the object store (shared_memory=False), as from other nodes")
    args = p.parse_args(argv)
    w = args.workers
    ray.init(num_cpus=max(2, int(w * args.cpus_per_worker) + 2), dashboard_host="127.0.0.1",
             log_to_driver=False)
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    common = dict(num_workers=w, frames_per_batch=w * args.steps, num_cpus=args.cpus_per_worker,
                  startup_timeout_s=600, shared_memory=False if args.object_store else None)
    print(f"{w} env actors, {args.cpus_per_worker} CPU each, {args.steps} steps per batch, "
          f"{os.cpu_count()} cores")
    if args.only == "buffer":
        rate, route = into_buffer(policy, common, args)
        print(f"start() into a RayReplayBuffer of {args.shards} shard(s): {rate:.0f} batches/s "
              f"({route}); "
              + ceilings(rate, args, rounds=False))
        return
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
    # (an async collector's batch is one worker's: frames_per_batch frames from one actor)
    c = MultiaSyncDataCollector(counting_env, policy, **dict(common, frames_per_batch=args.steps))
    rate = batches_per_s(c, args.seconds)
    stats = c.stats()
    route = "shared memory" if stats["shared_memory_batches"] else \
        "Ray calls to the env actors" if stats["direct_batches"] else "the driver"
    c.shutdown()
    print(f"async: {rate:.0f} batches/s through {route} ({rate * args.steps:,.0f} frames/s); "
          + ceilings(rate, args, rounds=False))
    c = MultiSyncDataCollector(counting_env, policy, **common)
    rate = batches_per_s(c, args.seconds) * w
    c.shutdown()
    print(f"sync rounds: {rate:.0f} worker batches/s; " + ceilings(rate, args, rounds=True))
    rate, route = into_buffer(policy, common, args)
    print(f"start() into a RayReplayBuffer: {rate:.0f} batches/s of {args.steps} frames reach "
          f"the buffer ({route}); " + ceilings(rate, args, rounds=False))


def into_buffer(policy, common: dict, args) -> tuple[float, str]:
    """Batches per second written into a ``RayReplayBuffer`` by ``start()`` (async workers,
    ``--steps`` frames each), counted by the buffer, after a one-second warm-up."""
    rb = RayReplayBuffer(1_000_000, num_shards=args.shards)
    c = MultiaSyncDataCollector(counting_env, policy, replay_buffer=rb,
                                **dict(common, frames_per_batch=args.steps))
    try:
        c.start()
        time.sleep(1.0)
        n0, t0 = rb.write_count, time.perf_counter()
        time.sleep(args.seconds)
        rate = (rb.write_count - n0) / args.steps / (time.perf_counter() - t0)
        route = "shared memory" if c.stats()["shared_memory_writes"] else "the object store"
    finally:
        c.async_shutdown()
        c.shutdown()
        rb.shutdown()
    return rate, route


def ceilings(rate: float, args, rounds: bool) -> str:
    """Bare Ray doing the same work and returning ready batches, with ours as ratios."""
    same, free = (bare_ray(args.workers, args.cpus_per_worker, args.steps, args.seconds,
                           rounds=rounds, work=work) for work in (True, False))
    return (f"bare Ray, one call in flight per actor: {same:.0f} batches/s doing the same work "
            f"(ratio {rate / same:.2f}), {free:.0f} returning a ready batch "
            f"(ratio {rate / free:.2f})")


if __name__ == "__main__":
    main()
