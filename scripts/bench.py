"""Benchmark: our collectors next to TorchRL's and the raw gymnasium loop, in one process run.

    python scripts/bench.py [--part sync|multi|...|steady|workers|small|all] [--frames N] [--quick]

Prints frames/s per row and the ratios the issues set as targets. TorchRL is only needed here
(``pip install -e .[bench]``); rows whose TorchRL import fails are skipped with a note.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


import ray
import torch
from torch import nn

from bench_common import (WARMUP, Wrapped, guarded, make_env, mlp_policy, ours_sync, row, timed,
                          cartpole_vector_loop)


def raw_loop(frames: int, heavy: bool = False, wrapped: bool = False) -> float:
    env, policy = make_env(heavy), (Wrapped(mlp_policy()) if wrapped else mlp_policy())
    obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(frames):
            action = policy(torch.as_tensor(obs)).item()
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                obs, _ = env.reset()
    return frames / (time.perf_counter() - t0)


# -- TorchRL ---------------------------------------------------------------------------------
def torchrl_env(heavy: bool):
    from torchrl.envs import GymWrapper

    return GymWrapper(make_env(heavy), categorical_action_encoding=True)


def torchrl_policy():
    from tensordict.nn import TensorDictModule

    return TensorDictModule(mlp_policy(), in_keys=["observation"], out_keys=["action"])


def torchrl_sync(frames: int, fpb: int, heavy: bool = False) -> float:
    from torchrl.collectors import Collector

    c = Collector(lambda: torchrl_env(heavy), torchrl_policy(), frames_per_batch=fpb,
                  total_frames=frames + WARMUP * fpb)
    try:
        return timed(c, fpb)
    finally:
        c.shutdown()


def _heavy_factory():
    return torchrl_env(True)


def _light_factory():
    return torchrl_env(False)


def torchrl_multi(kind: str, workers: int, frames: int, fpb: int, heavy: bool) -> float:
    from torchrl.collectors import MultiAsyncCollector, MultiSyncCollector

    cls = MultiSyncCollector if kind == "sync" else MultiAsyncCollector
    factory = _heavy_factory if heavy else _light_factory
    c = cls([factory] * workers, torchrl_policy(), frames_per_batch=fpb, total_frames=frames + WARMUP * fpb)
    try:
        return timed(c, fpb)
    finally:
        c.shutdown()


# -- ours ------------------------------------------------------------------------------------
def ours_multi(kind: str, workers: int, frames: int, fpb: int, heavy: bool) -> float:
    from collectors import MultiaSyncDataCollector, MultiSyncDataCollector
    from collectors.testing import heavy_cartpole

    cls = MultiSyncDataCollector if kind == "sync" else MultiaSyncDataCollector
    env = heavy_cartpole if heavy else "CartPole-v1"
    with cls(env, mlp_policy(), num_workers=workers, frames_per_batch=fpb,
             total_frames=frames + WARMUP * fpb, num_cpus=1.0 / workers) as c:
        return timed(c, fpb)


def first_batch_latency() -> float:
    from collectors import SyncDataCollector

    t0 = time.perf_counter()
    c = SyncDataCollector("CartPole-v1", mlp_policy(), frames_per_batch=100)
    c.next()
    latency = time.perf_counter() - t0
    c.shutdown()
    return latency


def run_sync(frames: int) -> None:
    print("\n## SyncDataCollector, CartPole-v1, MLP 4-64-64-2\n")
    print("| row | frames/s | ratio |\n|---|---:|---|")
    raw = raw_loop(frames)
    row("raw gymnasium loop + per-step MLP", raw)
    trl = guarded(torchrl_sync, frames, 1000)
    row("TorchRL Collector (fpb 1000)", trl)
    for fpb in (1000, 4000):
        ours1 = ours_sync(frames, fpb, 1)
        ratio = f"{ours1 / raw:.2f}x raw" + (f", {ours1 / trl:.1f}x TorchRL" if trl else "")
        row(f"ours SyncDataCollector, num_envs=1 (fpb {fpb})", ours1, ratio)
    # the same MLP one module call deeper, in both loops: no fast path, only the collector's cost
    raw_w = raw_loop(frames, wrapped=True)
    row("raw loop, MLP in a wrapper module", raw_w)
    wrapped = ours_sync(frames, 1000, 1, True)
    row("ours, num_envs=1 (fpb 1000), MLP in a wrapper", wrapped,
        f"{wrapped / raw_w:.2f}x raw with the same wrapper, {wrapped / raw:.2f}x raw")
    ours8 = ours_sync(frames * 4, 4000, 8)
    row("ours SyncDataCollector, num_envs=8 (fpb 4000)", ours8,
        f"{ours8 / trl:.1f}x TorchRL" if trl else "")
    # the ceilings: gymnasium's vector envs stepping the same envs with the batched MLP. 8 envs
    # (one env object per env, our default below 16) against SyncVectorEnv(8); 16 envs (the
    # native vector env, our default from 16) against make_vec(16). Both ceilings count
    # transitions only: their next-step autoreset steps (about 10% here) are not frames.
    for wrap in (False, True):
        label = ", MLP in a wrapper" if wrap else ""
        sve = cartpole_vector_loop(frames * 4, wrap, native=False, n=8)
        row(f"gymnasium SyncVectorEnv(8){label}", sve)
        mine = ours_sync(frames * 4, 4000, 8, wrap)
        row(f"ours, num_envs=8 (fpb 4000){label}", mine, f"{mine / sve:.2f}x SyncVectorEnv(8)")
        native = cartpole_vector_loop(frames * 4, wrap, native=True, n=16)
        row(f"gymnasium make_vec(16, vector_entry_point){label}", native)
        per_env = ours_sync(frames * 4, 4000, 16, wrap, native_vector=False)
        row(f"ours, num_envs=16, one env object per env{label}", per_env,
            f"{per_env / native:.2f}x make_vec(16)")
        mine = ours_sync(frames * 4, 4000, 16, wrap)
        row(f"ours, num_envs=16, native vector env (default){label}", mine,
            f"{mine / native:.2f}x make_vec(16)")
    lat = first_batch_latency()
    print(f"\nfirst batch from a running Ray (nn.Module policy): {lat:.2f} s")
    check = weight_check_cost()
    print(f"automatic weight sync, check of an unchanged policy per batch: {check * 1e6:.1f} us "
          f"= {100 * check / (1000 / raw):.3f}% of a 1000-frame batch of the raw loop")


def weight_check_cost(repeats: int = 20_000) -> float:
    """Seconds per ``WeightWatcher.changed()`` on the benchmark's MLP (unchanged: the common case)."""
    from collectors.weight_sync import WeightWatcher

    watcher = WeightWatcher(mlp_policy())
    t0 = time.perf_counter()
    for _ in range(repeats):
        watcher.changed()
    return (time.perf_counter() - t0) / repeats


def run_multi(frames: int) -> None:
    for heavy in (False, True):
        env = "heavy (CartPole + 1 ms CPU/step)" if heavy else "CartPole-v1"
        n = frames // 5 if heavy else frames
        print(f"\n## Multi collectors, {env}, MLP\n")
        print("| row | frames/s | ratio |\n|---|---:|---|")
        base = {}
        for kind in ("sync", "async"):
            trl2 = guarded(torchrl_multi, kind, 2, n, 1000 if not heavy else 200, heavy)
            row(f"TorchRL Multi{'Sync' if kind == 'sync' else 'Async'}Collector, 2 workers", trl2)
            for w in (1, 2, 4):
                fpb = (1000 if not heavy else 200) * (w if kind == "sync" else 1)
                fps = ours_multi(kind, w, n, fpb, heavy)
                base.setdefault((kind, 1), fps)
                note = f"{fps / base[(kind, 1)]:.2f}x 1 worker"
                if w == 2 and trl2:
                    note += f", {fps / trl2:.2f}x TorchRL"
                row(f"ours Multi{'Sync' if kind == 'sync' else 'a Sync'}DataCollector, {w} workers".replace("a Sync", "aSync"), fps, note)


# -- replay buffers -----------------------------------------------------------------------------
def cartpole_batch(n: int = 1000):
    from collectors import SyncDataCollector

    with SyncDataCollector("CartPole-v1", frames_per_batch=n, seed=0) as c:
        return c.next()


def rb_throughput(rb, batch, seconds: float = 3.0) -> tuple[float, float]:
    """(extend frames/s, sample-256 samples/s) of a buffer with ``extend`` and ``sample``."""
    for _ in range(3):
        rb.extend(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rb.extend(batch)
        n += batch.numel()
    ext = n / (time.perf_counter() - t0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rb.sample(256)
        n += 256
    return ext, n / (time.perf_counter() - t0)


def write_rate(collector, rb, seconds: float) -> float:
    """Frames/s that ``collector.start()`` writes into ``rb`` (after a 1 s warm-up)."""
    collector.start()
    time.sleep(1.0)
    w0, t0 = rb.write_count, time.perf_counter()
    time.sleep(seconds)
    rate = (rb.write_count - w0) / (time.perf_counter() - t0)
    collector.async_shutdown()
    return rate


def ours_start_rate(seconds: float, workers: int = 2) -> float:
    from collectors import MultiaSyncDataCollector, RayReplayBuffer

    rb = RayReplayBuffer(1_000_000, batch_size=256)
    c = MultiaSyncDataCollector("CartPole-v1", mlp_policy(), num_workers=workers,
                                frames_per_batch=1000, replay_buffer=rb)
    rate = write_rate(c, rb, seconds)
    rb.shutdown()
    return rate


def torchrl_start_rate(seconds: float, workers: int = 2) -> float:
    from torchrl.collectors import MultiAsyncCollector
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    rb = ReplayBuffer(storage=LazyTensorStorage(1_000_000), batch_size=256)
    c = MultiAsyncCollector([_light_factory] * workers, torchrl_policy(), frames_per_batch=1000,
                            total_frames=-1, replay_buffer=rb)
    return write_rate(c, rb, seconds)


def trainer_slowdown(seconds: float = 1.5, workers: int = 2, local: bool = True,
                     threads: int | None = None) -> tuple[float, float, float]:
    """Training steps/s (sample 256 + one SGD step of a 4-64-64-2 MLP) with collection paused
    and running (``workers`` env actors writing into the same buffer), alternated four times;
    medians, plus the frames/s written while the trainer ran."""
    import statistics

    from collectors import MultiaSyncDataCollector, RayReplayBuffer

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rb = RayReplayBuffer(200_000, batch_size=256, local_sampling=None if local else False,
                         prefetch=0 if local else 4)
    rb.extend(cartpole_batch(5000))
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), 1e-3)

    def steps() -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            td = rb.sample()
            loss = net(td["observation"]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += 1
        return n / (time.perf_counter() - t0)

    c = MultiaSyncDataCollector("CartPole-v1", mlp_policy(), num_workers=workers,
                                frames_per_batch=1000, replay_buffer=rb)
    c.start()
    alone, during, rate = [], [], []
    for _ in range(4):
        with c.pause():  # workers idle once their one batch ahead is done
            time.sleep(0.3)
            alone.append(steps())
        time.sleep(0.3)
        w0, t0 = rb.write_count, time.perf_counter()
        during.append(steps())
        rate.append((rb.write_count - w0) / (time.perf_counter() - t0))
    c.async_shutdown()
    c.shutdown()
    rb.shutdown()
    torch.set_num_threads(threads_before)
    return statistics.median(alone), statistics.median(during), statistics.median(rate)


def run_buffer(seconds: float) -> None:
    from collectors import RayReplayBuffer

    print("\n## Replay buffers, CartPole batches of 1000 frames\n")
    print("| buffer | extend frames/s | sample(256) samples/s |\n|---|---:|---:|")
    batch = cartpole_batch()
    for local in (True, False):
        ours = RayReplayBuffer(1_000_000, local_sampling=None if local else False)
        e, smp = rb_throughput(ours, batch, seconds)
        ours.shutdown()
        how = "samples drawn locally from shared memory" if local else "sample() as actor calls"
        print(f"| ours RayReplayBuffer (actor; {how}) | {e:,.0f} | {smp:,.0f} |", flush=True)
    try:
        from torchrl.data import LazyTensorStorage, ReplayBuffer
        from torchrl.data import RayReplayBuffer as TorchRLRayReplayBuffer

        local = ReplayBuffer(storage=LazyTensorStorage(1_000_000))
        e, smp = rb_throughput(local, batch.reshape(-1), seconds)
        print(f"| TorchRL ReplayBuffer(LazyTensorStorage), in process | {e:,.0f} | {smp:,.0f} |", flush=True)
        remote = TorchRLRayReplayBuffer(storage=LazyTensorStorage(1_000_000))
        e, smp = rb_throughput(remote, batch.reshape(-1), seconds)
        print(f"| TorchRL RayReplayBuffer | {e:,.0f} | {smp:,.0f} |", flush=True)
    except ImportError as exc:
        print(f"  (TorchRL rows skipped: {exc})")
    print("\n| end to end, 2 workers, MLP, fpb 1000 | frames/s into the buffer |\n|---|---:|")
    ours_rate = ours_start_rate(seconds * 2)
    print(f"| ours MultiaSyncDataCollector.start() -> RayReplayBuffer | {ours_rate:,.0f} |", flush=True)
    trl = guarded(torchrl_start_rate, seconds * 2)
    if trl:
        print(f"| TorchRL MultiAsyncCollector.start() -> ReplayBuffer | {trl:,.0f} |")
        print(f"\nratio: {ours_rate / trl:.2f}x TorchRL")
    print("\n| trainer: sample(256) + SGD step | torch threads | workers | steps/s alone | "
          "steps/s while collecting | slower by | frames/s collected meanwhile |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for local, threads, workers in ((True, 1, 1), (True, 1, 2), (True, None, 2), (False, 1, 2)):
        alone, during, rate = trainer_slowdown(seconds / 2, workers, local, threads)
        how = "local (shared memory)" if local else "actor calls, prefetch=4"
        print(f"| {how} | {threads or torch.get_num_threads()} | {workers} | {alone:,.0f} | "
              f"{during:,.0f} | {(1 - during / alone) * 100:.0f}% | {rate:,.0f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["sync", "multi", "buffer", "torchrl", "workloads", "memory", "steady", "workers",
                                 "small", "all"],
                        default="all")
    parser.add_argument("--frames", type=int, default=30_000)
    parser.add_argument("--quick", action="store_true", help="few frames: a smoke run")
    parser.add_argument("--rounds", type=int, default=5,
                        help="--part steady, workers and small: how many rounds")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}.")
    frames = 3_000 if args.quick else args.frames
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")
    if not ray.is_initialized():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), dashboard_host="127.0.0.1", log_to_driver=False)
    if args.part in ("sync", "all"):
        run_sync(frames)
    if args.part in ("multi", "all"):
        run_multi(frames)
    if args.part in ("buffer", "all"):
        run_buffer(1.0 if args.quick else 3.0)
    if args.part in ("torchrl", "all"):
        from bench_torchrl_env import run_torchrl_env

        guarded(run_torchrl_env, min(frames, 10_000), row)
    if args.part in ("workloads", "all"):
        from bench_workloads import run_workloads

        guarded(run_workloads, min(frames, 4_000), row)
    if args.part in ("memory", "all"):
        from bench_workloads import pong_memory

        guarded(pong_memory, 2_000 if args.quick else 20_000)
    if args.part in ("steady", "all"):
        from bench_steady import run_steady

        run_steady(1 if args.quick else args.rounds, 10 if args.quick else 40)
    if args.part in ("small", "all"):
        from bench_small import run_small

        guarded(run_small, 1 if args.quick else args.rounds, 200 if args.quick else 1_500)
    if args.part in ("workers", "all"):
        from bench_workers import run_workers

        guarded(run_workers, 1 if args.quick else args.rounds, 1_024 if args.quick else 4_096)
    sys.stdout.flush()
    # TorchRL's RayReplayBuffer and multiprocess collectors can leave non-daemon threads that
    # keep the interpreter from exiting; everything of ours is shut down at this point.
    os._exit(0)


if __name__ == "__main__":
    main()
