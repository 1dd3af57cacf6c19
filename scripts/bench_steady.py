"""Two targets of issue 14 in steady state, over several rounds: one env at
``frames_per_batch=1000`` with the MLP inside a wrapper module against the raw loop with the same
wrapper, and 16 envs stepped by CartPole's native vector env against gymnasium's ``make_vec(16)``
loop with the same batched MLP (plain and wrapped).

    python scripts/bench.py --part steady [--rounds 5]

Each round runs the raw loop (in this process, per 1,000 frames), a fresh ``SyncDataCollector``
(per batch, after ``WARMUP`` batches, so the new process has warmed up), and the raw loop
again. A round's ratio is ours against the mean of both raw
runs, from mean times; the ratio of medians is printed next to it (less moved by a host hiccup
in one run). On a 2-core machine one round's ratio moves by 10% or more; the median over rounds
is the figure. The vector rounds time whole runs (25 batches of 4,000 frames against 50,000
frames of ``make_vec(16)`` before and after).
"""
from __future__ import annotations

import statistics
import time

import gymnasium as gym
import torch

from bench_common import WARMUP, Wrapped, mlp_policy, ours_sync, cartpole_vector_loop

FPB = 1000


def raw_chunks(batches: int) -> list[float]:
    """Seconds per ``FPB`` frames of the raw loop with the wrapped MLP (one chunk of warm-up)."""
    env, policy = gym.make("CartPole-v1"), Wrapped(mlp_policy())
    obs, _ = env.reset(seed=0)
    times = []
    with torch.no_grad():
        for _ in range(batches + 1):
            t0 = time.perf_counter()
            for _ in range(FPB):
                action = policy(torch.as_tensor(obs)).item()
                obs, _, term, trunc, _ = env.step(action)
                if term or trunc:
                    obs, _ = env.reset()
            times.append(time.perf_counter() - t0)
    return times[1:]


def ours_batches(batches: int) -> tuple[list[float], list[float]]:
    """Seconds per ``next()`` of our collector: ``(warm-up batches, timed batches)``."""
    from collectors import SyncDataCollector

    with SyncDataCollector("CartPole-v1", Wrapped(mlp_policy()), frames_per_batch=FPB) as c:
        it, times = iter(c), []
        for _ in range(WARMUP + batches):
            t0 = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t0)
    return times[:WARMUP], times[WARMUP:]


def vector_rounds(rounds: int, batches: int) -> None:

    for wrap in (False, True):
        print(f"\n## 16 envs, native vector env, fpb 4000, {'wrapped' if wrap else 'plain'} MLP: "
              f"{rounds} round(s) of make_vec(16) / ours / make_vec(16) ({batches} batches, ours "
              f"after {WARMUP} warm-up batches)\n")
        print("| round | make_vec(16) frames/s | ours frames/s | ratio |\n|---:|---:|---:|---:|")
        ratios = []
        for r in range(rounds):
            ceiling = cartpole_vector_loop(batches * 2000, wrap, native=True, n=16)
            ours = ours_sync(batches * 4000, 4000, 16, wrap)  # native: the default at 16 envs
            ceiling = (ceiling + cartpole_vector_loop(batches * 2000, wrap, native=True, n=16)) / 2
            ratios.append(ours / ceiling)
            print(f"| {r + 1} | {ceiling:,.0f} | {ours:,.0f} | {ratios[-1]:.2f}x |", flush=True)
        print(f"\nratio over {rounds} round(s): median {statistics.median(ratios):.2f}x, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x (target 0.9x)")


def run_steady(rounds: int, batches: int = 40) -> None:
    print(f"\n## One env, MLP in a wrapper, fpb {FPB}: {rounds} round(s) of raw / ours / raw "
          f"({batches} batches each, ours after {WARMUP} warm-up batches)\n")
    print("| round | raw frames/s | ours frames/s | ratio (means) | ratio (medians) |\n"
          "|---:|---:|---:|---:|---:|")
    ratios, warmups = [], []
    for r in range(rounds):
        raw = raw_chunks(batches // 2)
        warm, ours = ours_batches(batches)
        raw += raw_chunks(batches // 2)
        ratio = statistics.mean(raw) / statistics.mean(ours)
        ratios.append(ratio)
        warmups.append(warm)
        print(f"| {r + 1} | {FPB / statistics.mean(raw):,.0f} | {FPB / statistics.mean(ours):,.0f} "
              f"| {ratio:.2f}x | {statistics.median(raw) / statistics.median(ours):.2f}x |",
              flush=True)
    print(f"\nratio over {rounds} round(s): median {statistics.median(ratios):.2f}x, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}x (target 0.9x)")
    per_batch = [statistics.median(w[i] for w in warmups) * 1e3 for i in range(WARMUP)]
    print("warm-up batches, median ms each (the graph compiles in the third): "
          + ", ".join(f"{t:.0f}" for t in per_batch))
    vector_rounds(rounds, max(1, batches * 5 // 8))
