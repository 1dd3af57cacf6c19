"""Small batches whose weights change every batch (the off-policy loop), side by side.

    python scripts/bench.py --part small [--rounds N]

CartPole-v1 with a 4-256-256-2 MLP (about 67k parameters), ``frames_per_batch=10``. After every
batch each weight is changed in place (what an optimizer step does), or left alone. Rows: the raw
gymnasium loop doing the same work (the ceiling), TorchRL's ``Collector`` on ``GymEnv``, ours
(``SyncDataCollector("CartPole-v1", ...)``). The fixed cost per batch is a row's time per batch
minus the raw loop's. Then the weight push of a 10 MB policy to 8 same-node workers: the time of
``update_policy_weights_()`` and the bytes it copies.
"""
from __future__ import annotations

import statistics
import time

import gymnasium as gym
import torch
from torch import nn

FPB = 10
BATCHES = 1_500
WARMUP = 50


def mlp(seed: int = 0) -> nn.Module:
    from collectors.policies import ArgmaxLayer

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 2), ArgmaxLayer())


def step_weights(policy: nn.Module) -> None:
    """Change every weight in place, as an optimizer step does."""
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(0.999999)


def raw(batches: int, change: bool) -> float:
    """Batches/s of the raw loop: the policy on each step, the weights changed per batch."""
    env, policy = gym.make("CartPole-v1"), mlp()
    obs, _ = env.reset(seed=0)
    t0 = None
    for b in range(batches + WARMUP):
        if b == WARMUP:
            t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(FPB):
                action = policy(torch.as_tensor(obs)).item()
                obs, _, term, trunc, _ = env.step(action)
                if term or trunc:
                    obs, _ = env.reset()
        if change:
            step_weights(policy)
    return batches / (time.perf_counter() - t0)


def timed_batches(collector, policy, batches: int, change: bool) -> float:
    it, t0 = iter(collector), None
    for b in range(batches + WARMUP):
        if b == WARMUP:
            t0 = time.perf_counter()
        next(it)
        if change:
            step_weights(policy)
    return batches / (time.perf_counter() - t0)


def torchrl(batches: int, change: bool) -> float:
    from tensordict.nn import TensorDictModule
    from torchrl.collectors import Collector
    from torchrl.envs import GymEnv

    net = mlp()
    policy = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
    c = Collector(lambda: GymEnv("CartPole-v1", categorical_action_encoding=True), policy,
                  frames_per_batch=FPB, total_frames=-1)
    try:
        return timed_batches(c, net, batches, change)
    finally:
        c.shutdown()


def ours(batches: int, change: bool) -> float:
    from collectors import SyncDataCollector

    policy = mlp()
    c = SyncDataCollector("CartPole-v1", policy, frames_per_batch=FPB, total_frames=-1, seed=0)
    try:
        return timed_batches(c, policy, batches, change)
    finally:
        c.shutdown()


def weight_push(workers: int = 8, mbytes: int = 10, pushes: int = 20) -> tuple[float, int]:
    """Median ms of ``update_policy_weights_()`` for a ``mbytes`` MB policy pushed to
    ``workers`` same-node workers (each push followed by a batch, so every worker applies it),
    and the bytes written per push on the trainer's side."""
    from collectors import MultiSyncDataCollector
    from collectors.policies import ArgmaxLayer

    width = int((mbytes * 2**20 / 4) ** 0.5)
    policy = nn.Sequential(nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 2),
                           ArgmaxLayer())
    nbytes = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    c = MultiSyncDataCollector(["CartPole-v1"] * workers, policy, frames_per_batch=workers * 2,
                               total_frames=-1, auto_sync_weights=False, num_cpus=0.01)
    times = []
    try:
        it = iter(c)
        next(it)
        for _ in range(pushes):
            step_weights(policy)
            t0 = time.perf_counter()
            c.update_policy_weights_()
            times.append(time.perf_counter() - t0)
            batch = next(it)
        versions = set(batch["collector", "policy_version"].unique().tolist())
        assert versions == {pushes}, versions
    finally:
        c.shutdown()
    return statistics.median(times) * 1e3, nbytes


def run_small(rounds: int = 1, batches: int = BATCHES) -> None:
    print(f"\n## Small batches: CartPole-v1, MLP 4-256-256-2, frames_per_batch={FPB}\n")
    print("| weights | row | batches/s | ms per batch | fixed cost (ms) | vs TorchRL |\n"
          "|---|---|---:|---:|---:|---:|")
    for change in (True, False):
        rates = {"raw": [], "torchrl": [], "ours": []}
        for _ in range(rounds):
            rates["raw"].append(raw(batches, change))
            rates["torchrl"].append(torchrl(batches, change))
            rates["ours"].append(ours(batches, change))
        med = {k: statistics.median(v) for k, v in rates.items()}
        label = "changed every batch" if change else "unchanged"
        for name, text in (("raw", "raw gymnasium loop"), ("torchrl", "TorchRL Collector"),
                           ("ours", "ours SyncDataCollector")):
            fixed = 1e3 / med[name] - 1e3 / med["raw"]
            print(f"| {label} | {text} | {med[name]:,.0f} | {1e3 / med[name]:.2f} | "
                  f"{fixed:.2f} | {med[name] / med['torchrl']:.2f}x |", flush=True)
    ms, nbytes = weight_push()
    print(f"\nweight push, 10 MB policy ({nbytes / 2**20:.1f} MiB), 8 same-node workers: "
          f"update_policy_weights_() {ms:.2f} ms (median of 20)", flush=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--batches", type=int, default=BATCHES)
    a = p.parse_args()
    run_small(a.rounds, a.batches)
