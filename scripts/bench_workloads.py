"""Benchmark part ``--part workloads`` of scripts/bench.py: Atari Pong (uint8 [4, 84, 84]
stacks, Nature-DQN conv net) and MuJoCo HalfCheetah (256-256 MLP), side by side: the raw
loop, gymnasium's ``SyncVectorEnv(8)`` with the batched policy, TorchRL's ``Collector`` on the
same gymnasium env (``GymWrapper``), and ours with 1 and 8 envs per actor and with 2 workers."""
from __future__ import annotations

import functools
import time

import torch

from collectors.workloads import CheetahMLP, NatureDQN, half_cheetah, pong

from bench_common import WARMUP, vector_env_loop  # WARMUP: batches before timing, every collector alike


def raw_loop(make, policy, frames: int) -> float:
    env = make()
    obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(frames):
            action = policy(torch.as_tensor(obs)[None])[0].numpy()
            obs, _, term, trunc, _ = env.step(action.item() if action.ndim == 0 else action)
            if term or trunc:
                obs, _ = env.reset()
    return frames / (time.perf_counter() - t0)


def torchrl_loop(make, policy, frames: int, fpb: int, workers: int = 1) -> float:
    """TorchRL's ``Collector`` (``workers=1``) or ``MultiSyncCollector`` of ``workers``
    processes, ``fpb`` frames per worker, on ``GymWrapper(make())``."""
    from tensordict.nn import TensorDictModule
    from torchrl.collectors import Collector, MultiSyncCollector

    module = TensorDictModule(Index(policy), in_keys=["observation"], out_keys=["action"])
    if workers == 1:
        c = Collector(functools.partial(wrapped, make), module, frames_per_batch=fpb,
                      total_frames=-1)
    else:
        c = MultiSyncCollector([functools.partial(wrapped, make)] * workers, module,
                               frames_per_batch=fpb * workers, total_frames=-1)
    try:
        return timed(c, frames)
    finally:
        c.shutdown()


class Index(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, obs):  # TorchRL calls an unbatched env's policy without a batch dim
        return self.net(obs.unsqueeze(0))[0]


def wrapped(make):
    """``make()`` as a TorchRL env (a module-level function: TorchRL's worker processes
    pickle it)."""
    from torchrl.envs import GymWrapper

    return GymWrapper(make(), categorical_action_encoding=True)


def timed(collector, frames: int, warmup: int = WARMUP) -> float:
    """Frames/s after ``warmup`` batches."""
    it = iter(collector)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    while n < frames:
        n += next(it).numel()
    return n / (time.perf_counter() - t0)


def ours(make, policy, frames: int, fpb: int, num_envs: int = 1, workers: int = 1,
         compact_obs: bool = False, asynchronous: bool = False) -> tuple:
    from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, SyncDataCollector

    if workers == 1:
        c = SyncDataCollector(make, policy, frames_per_batch=fpb, num_envs=num_envs,
                              compact_obs=compact_obs)
    elif asynchronous:  # each worker's batch as it comes: no waiting for the slower one
        c = MultiaSyncDataCollector(make, policy, num_workers=workers, frames_per_batch=fpb,
                                    num_envs=num_envs)
    else:
        c = MultiSyncDataCollector(make, policy, num_workers=workers, frames_per_batch=fpb * workers,
                                   num_envs=num_envs)
    try:
        batch = c.next()
        nbytes = sum(v.numel() * v.element_size() for v in batch.values(True, True))
        rate = timed(c, frames)
        return rate, rate * nbytes / batch.numel()
    finally:
        c.shutdown()


def run_workloads(frames: int, row) -> None:
    for name, make, policy, fpb in (("Pong (ALE/Pong-v5, uint8 [4, 84, 84], Nature-DQN)", pong, NatureDQN, 256),
                                    ("HalfCheetah-v5 (256-256 MLP)", half_cheetah, CheetahMLP, 1000)):
        net = policy()
        print(f"\n## {name}, fpb {fpb}\n")
        print("| row | frames/s | ratio |\n|---|---:|---|")
        raw = raw_loop(make, net, frames)
        row("raw loop", raw)
        vec = vector_env_loop(make, net, frames)
        row("gymnasium SyncVectorEnv(8), batched policy", vec)
        try:
            trl = torchrl_loop(make, net, frames, fpb)
            row("TorchRL Collector (GymWrapper)", trl)
        except ImportError as exc:
            trl = None
            print(f"  (TorchRL skipped: {exc})")
        one, bps = ours(make, net, frames, fpb)
        row("ours, num_envs=1", one, f"{one / raw:.2f}x raw" + (f", {one / trl:.2f}x TorchRL" if trl else "")
            + f", {bps / 1e6:.1f} MB/s from the env actor (through its shared-memory slot)")
        if make is pong:  # env actors ship each observation once
            small, small_bps = ours(make, net, frames, fpb, compact_obs=True)
            row("ours, num_envs=1, compact_obs=True", small,
                f"{small / raw:.2f}x raw, {small_bps / 1e6:.1f} MB/s from the env actor")
        eight, _ = ours(make, net, frames, fpb, num_envs=8)
        row("ours, num_envs=8", eight, f"{eight / vec:.2f}x SyncVectorEnv(8)")
        two, two_bps = ours(make, net, frames, fpb, workers=2)
        row("ours, 2 workers (num_envs=1)", two, f"{two / one:.2f}x our 1 worker, "
            f"{two_bps / 1e6:.1f} MB/s through the object store")
        two_async, _ = ours(make, net, frames, fpb, workers=2, asynchronous=True)
        row("ours, 2 workers, MultiaSyncDataCollector", two_async, f"{two_async / one:.2f}x our 1 worker")
        if trl:
            trl_two = torchrl_loop(make, net, frames, fpb, workers=2)
            row("TorchRL MultiSyncCollector, 2 workers", trl_two,
                f"{trl_two / trl:.2f}x its Collector; ours {two / trl_two:.2f}x it")


def pong_memory(frames: int, row_fn=None) -> None:
    """Pong frames into a plain, a compact and a frame-level RayReplayBuffer (random policy,
    2 workers): bytes per stored frame and the latency of sample(32)."""
    from collectors import MultiSyncDataCollector, RayReplayBuffer

    print(f"\n## Pong replay memory ({frames:,} frames, uint8 [4, 84, 84])\n")
    print("| storage | bytes per frame | x observation alone | sample(32) ms (median of 200) |\n"
          "|---|---:|---:|---:|")
    obs_bytes = 4 * 84 * 84
    for label, kwargs in (("plain (TorchRL layout), local sampling", {}),
                          ("plain, sampled by calls to the actor", {"local_sampling": False}),
                          ("compact_obs=True, local sampling", {"compact_obs": True}),
                          ("compact_obs='frames', local sampling", {"compact_obs": "frames"}),
                          ("compact_obs='frames', sample link", {"compact_obs": "frames",
                                                                 "link": True}),
                          ("compact_obs='frames', calls", {"compact_obs": "frames",
                                                           "local_sampling": False})):
        link = kwargs.pop("link", False)
        with RayReplayBuffer(frames, batch_size=32, seed=0, **kwargs) as rb:
            if link:  # (what a sampler the trainer cannot run itself gets: the actor's draw)
                rb._local = None
            with MultiSyncDataCollector(pong, None, num_workers=2, frames_per_batch=500,
                                        total_frames=frames, replay_buffer=rb,
                                        compact_obs=bool(kwargs.get("compact_obs", False))) as c:
                for _ in c:
                    pass
            info = rb.info()
            per_frame = info["storage_bytes"] / info["size"]
            deadline = time.perf_counter() + 10
            while rb._local is not None and rb._local.reader is None \
                    and time.perf_counter() < deadline:  # until the trainer has mapped it
                rb.sample()
            rb.sample()
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                rb.sample()
                times.append(time.perf_counter() - t0)
            times.sort()
            print(f"| {label} | {per_frame:,.0f} | {per_frame / obs_bytes:.2f} | "
                  f"{1e3 * times[len(times) // 2]:.2f} |", flush=True)
