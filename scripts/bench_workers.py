"""Issue 14's "2 workers >= 1.8x 1 worker" on Pong, in rounds, next to its ceiling on this
machine: the raw loop run in 1 and in 2 processes at once.

    python scripts/bench.py --part workers [--rounds 4]

A sync collector is a barrier (TorchRL's ``MultiSyncCollector`` too): both workers collect
their half of batch k, then wait for batch k+1 to be asked for. So the ceiling of its ratio is
two raw loops that meet after every ``CHUNK`` frames (the half batch), against one; it is
printed with the two raw loops running free (meeting only at the end). Every raw loop runs in
its own process with one torch thread, as our env actors do, the Nature-DQN policy picking
each action. Each round: raw 1 process, raw 2 processes met every ``CHUNK`` frames, raw 2
processes free, raw 1 process again; then ours with 1 worker, ``MultiSyncDataCollector(2)``,
``MultiaSyncDataCollector(2)``, 1 worker again. Ratios are against the mean of a round's two
1-process (1-worker) runs; the medians over rounds are the figures.
"""
from __future__ import annotations

import multiprocessing
import statistics
import threading
import time

import torch

from bench_workloads import WARMUP, ours
from collectors.workloads import NatureDQN, pong

CHUNK = 256  # frames per worker per batch: the half of a 2-worker batch of 512
TIMEOUT_S = 300.0


def raw_process(barrier, chunks: int, chunk: int) -> None:
    """One raw Pong loop: warm up, meet the others, then meet them after every ``chunk`` frames.
    A failure breaks the barrier, so nobody waits for this process any more."""
    try:
        torch.set_num_threads(1)
        env, policy = pong(), NatureDQN()
        obs, _ = env.reset(seed=0)
        with torch.no_grad():
            for step in range(-64, chunks * chunk):
                if step == 0 or (step > 0 and step % chunk == 0):
                    barrier.wait(TIMEOUT_S)
                action = policy(torch.as_tensor(obs)[None])[0].item()
                obs, _, term, trunc, _ = env.step(action)
                if term or trunc:
                    obs, _ = env.reset()
        barrier.wait(TIMEOUT_S)
        env.close()
    except BaseException:
        barrier.abort()
        raise


def raw_processes(n: int, frames: int, chunk: int = CHUNK) -> float:
    """Frames/s of ``n`` raw loops in ``n`` processes, ``frames`` each, meeting every ``chunk``
    frames (``chunk=frames``: only at the start and the end)."""
    ctx = multiprocessing.get_context("spawn")
    chunks = max(1, frames // chunk)
    barrier = ctx.Barrier(n + 1)
    procs = [ctx.Process(target=raw_process, args=(barrier, chunks, chunk), daemon=True)
             for _ in range(n)]
    for proc in procs:
        proc.start()
    done = False
    try:
        barrier.wait(TIMEOUT_S)  # all warmed up
        t0 = time.perf_counter()
        for _ in range(chunks):
            barrier.wait(TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        done = True
    except threading.BrokenBarrierError:
        raise RuntimeError("a raw Pong process failed or took over "
                           f"{TIMEOUT_S:g} s (its traceback is above)") from None
    finally:
        for proc in procs:  # they end after the last meeting; after a failure, 5 s at most
            proc.join(TIMEOUT_S if done else 5)
            if proc.is_alive():
                proc.kill()
    return n * chunks * chunk / elapsed


def ours_rate(workers: int, frames: int, asynchronous: bool = False) -> float:
    """Frames/s of ours on Pong: 1 worker, or ``workers`` with ``CHUNK`` frames each a batch."""
    return ours(pong, NatureDQN(), frames, CHUNK, workers=workers, asynchronous=asynchronous)[0]


def run_workers(rounds: int, frames: int) -> None:
    print(f"\n## Pong, 2 workers against 1: {rounds} round(s), {frames:,} frames a run, "
          f"{CHUNK} frames per worker batch, ours after {WARMUP} warm-up batches\n")
    print("| round | raw 1 process | raw 2, met every 256 | raw 2, free | ours 1 worker | ours sync 2 "
          "| ours async 2 |\n|---:|---:|---:|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {"met": [], "free": [], "sync": [], "async": []}
    for r in range(rounds):
        raw1 = raw_processes(1, frames)
        met = raw_processes(2, frames // 2)
        free = raw_processes(2, frames // 2, chunk=frames // 2)
        raw1 = (raw1 + raw_processes(1, frames)) / 2
        one = ours_rate(1, frames)
        sync = ours_rate(2, frames)
        asyn = ours_rate(2, frames, asynchronous=True)
        one = (one + ours_rate(1, frames)) / 2
        for key, value, base in (("met", met, raw1), ("free", free, raw1), ("sync", sync, one),
                                 ("async", asyn, one)):
            ratios[key].append(value / base)
        print(f"| {r + 1} | {raw1:,.0f} | {met:,.0f} ({met / raw1:.2f}x) | {free:,.0f} "
              f"({free / raw1:.2f}x) | {one:,.0f} | {sync:,.0f} ({sync / one:.2f}x) | "
              f"{asyn:,.0f} ({asyn / one:.2f}x) |", flush=True)
    med = {key: statistics.median(values) for key, values in ratios.items()}
    print(f"\nmedians over {rounds} round(s): raw 2 processes met every {CHUNK} frames "
          f"{med['met']:.2f}x, free {med['free']:.2f}x; ours MultiSyncDataCollector(2) "
          f"{med['sync']:.2f}x ({med['sync'] / med['met']:.2f} of the met raw ceiling), "
          f"MultiaSyncDataCollector(2) {med['async']:.2f}x ({med['async'] / med['free']:.2f} of "
          f"the free one); target 1.8x")
