"""Benchmark part ``--part torchrl`` of scripts/bench.py: the same TorchRL env (CartPole-v1 +
RewardSum + StepCounter) and the same TensorDictModule MLP under ``env.rollout()``, TorchRL's
``Collector``, and ours with 1 and 2 workers."""
from __future__ import annotations

import time

import torch
from torch import nn

FPB = 1000


def torchrl_cartpole():
    from torchrl.envs import Compose, GymEnv, RewardSum, StepCounter, TransformedEnv

    env = TransformedEnv(GymEnv("CartPole-v1"), Compose(RewardSum(), StepCounter()))
    env.set_seed(0)
    return env


class OneHotMLP(nn.Module):
    """obs(4) -> 64 -> 64 -> 2 logits -> one-hot action (TorchRL's CartPole action spec)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 2))

    def forward(self, obs):
        return nn.functional.one_hot(self.net(obs).argmax(-1), 2)


def td_policy():
    from tensordict.nn import TensorDictModule

    return TensorDictModule(OneHotMLP(), in_keys=["observation"], out_keys=["action"])


def env_rollout(frames: int) -> float:
    env, policy = torchrl_cartpole(), td_policy()
    env.rollout(100, policy, break_when_any_done=False)  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(frames // FPB):
            env.rollout(FPB, policy, break_when_any_done=False)
    return (frames // FPB) * FPB / (time.perf_counter() - t0)


def timed(collector, frames: int) -> float:
    it = iter(collector)
    next(it)  # warm-up batch
    n, t0 = 0, time.perf_counter()
    while n < frames:
        n += next(it).numel()
    return n / (time.perf_counter() - t0)


def torchrl_collector(frames: int) -> float:
    from torchrl.collectors import Collector

    c = Collector(torchrl_cartpole, td_policy(), frames_per_batch=FPB, total_frames=-1)
    try:
        return timed(c, frames)
    finally:
        c.shutdown()


def ours(frames: int, workers: int) -> float:
    from collectors import MultiSyncDataCollector, SyncDataCollector

    if workers == 1:
        c = SyncDataCollector(torchrl_cartpole, td_policy(), frames_per_batch=FPB)
    else:
        c = MultiSyncDataCollector(torchrl_cartpole, td_policy(), num_workers=workers,
                                   frames_per_batch=FPB * workers)
    try:
        return timed(c, frames)
    finally:
        c.shutdown()


def run_torchrl_env(frames: int, row) -> None:
    print("\n## TorchRL env (CartPole-v1 + RewardSum + StepCounter), TensorDictModule MLP, fpb 1000\n")
    print("| row | frames/s | ratio |\n|---|---:|---|")
    rollout = env_rollout(frames)
    row("TorchRL env.rollout(1000) (no collector)", rollout)
    trl = torchrl_collector(frames)
    row("TorchRL Collector", trl, f"{trl / rollout:.2f}x env.rollout")
    one = ours(frames, 1)
    row("ours SyncDataCollector, 1 worker", one,
        f"{one / trl:.2f}x TorchRL, {one / rollout:.2f}x env.rollout")
    two = ours(frames, 2)
    row("ours MultiSyncDataCollector, 2 workers", two, f"{two / one:.2f}x our 1 worker")
