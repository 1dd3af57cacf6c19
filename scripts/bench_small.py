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

import functools
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


def _bare_child(conn, shared: dict) -> None:
    """The raw loop's work in a second process, one batch per request; new weights (when the
    request says so) are copied in from ``shared`` (tensors in shared memory) first."""
    torch.set_num_threads(1)
    shared = {k: v if isinstance(v, torch.Tensor) else
              torch.from_file(v[0], shared=True, size=v[1], dtype=v[2]).view(v[3])
              for k, v in shared.items()}
    env, policy = gym.make("CartPole-v1"), mlp()
    obs, _ = env.reset(seed=0)
    params = policy.state_dict()
    while True:
        request = conn.recv_bytes()
        if request == b"s":
            return
        if request == b"w":
            with torch.no_grad():
                for k, t in params.items():
                    t.copy_(shared[k])
        rows = []
        with torch.no_grad():
            for _ in range(FPB):
                action = policy(torch.as_tensor(obs)).item()
                nxt, reward, term, trunc, _ = env.step(action)
                rows.append((obs, action, reward, term, trunc))
                obs = nxt
                if term or trunc:
                    obs, _ = env.reset()
        conn.send(rows)


def bare_process(batches: int, change: bool) -> float:
    """Batches/s of the raw loop in a second process asked over a pipe per batch (weights, when
    changed, through shared tensors): the floor of any design with the env in another process."""
    import multiprocessing as mp

    policy = mlp()
    shared = {k: v.clone().share_memory_() for k, v in policy.state_dict().items()}
    ctx = mp.get_context("spawn")
    ours_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_bare_child, args=(child_end, shared), daemon=True)
    proc.start()
    try:
        return ask_per_batch(ours_end, policy, shared, batches, change)
    finally:
        ours_end.send_bytes(b"s")
        proc.join(10)


def ask_per_batch(conn, policy, shared: dict, batches: int, change: bool) -> float:
    """Batches/s of a bare loop on the other end of ``conn``, asked one batch at a time (the
    weights, when changed, copied into ``shared`` first)."""
    t0 = None
    for b in range(batches + WARMUP):
        if b == WARMUP:
            t0 = time.perf_counter()
        if change:
            step_weights(policy)
            for k, v in policy.state_dict().items():
                shared[k].copy_(v)
        conn.send_bytes(b"w" if change else b"c")
        conn.recv()
    return batches / (time.perf_counter() - t0)


class _BareActor:
    """The raw loop's work in a plain Ray actor, one batch per request over a Unix socket: the
    floor of any design whose env steps in an env actor (a Ray worker process)."""

    def listen(self, path: str) -> None:
        import socket

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)

    def run(self, shared: dict) -> None:
        from multiprocessing.connection import Connection

        sock, _ = self.listener.accept()
        self.listener.close()
        _bare_child(Connection(sock.detach()), shared)


def bare_ray_actor(batches: int, change: bool) -> float:
    """Batches/s of the raw loop in a plain Ray actor asked over a Unix socket per batch
    (weights, when changed, through a shared-memory file copied in before the batch)."""
    import os
    import socket
    import sys
    import tempfile
    from multiprocessing.connection import Connection

    import ray
    from ray import cloudpickle

    from collectors.runtime import ensure_ray

    ensure_ray()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # scripts/ is not a package
    policy = mlp()
    folder = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    shared = {}
    for i, (k, v) in enumerate(policy.state_dict().items()):
        shared[k] = torch.from_file(os.path.join(folder, f"t{i}"), shared=True,
                                    size=v.numel(), dtype=v.dtype).view(v.shape)
        shared[k].copy_(v)
    actor = ray.remote(num_cpus=0)(_BareActor).remote()
    path = os.path.join(folder, "sock")
    ray.get(actor.listen.remote(path))
    done = actor.run.remote({k: (os.path.join(folder, f"t{i}"), v.numel(), v.dtype, v.shape)
                             for i, (k, v) in enumerate(shared.items())})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    conn = Connection(sock.detach())
    try:
        return ask_per_batch(conn, policy, shared, batches, change)
    finally:
        conn.send_bytes(b"s")
        ray.get(done, timeout=30)
        ray.kill(actor)
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def stages(batches: int, change: bool, torchrl_env: bool) -> dict:
    """Median ms per batch of each stage, measured on both sides of ours."""
    from actors.shm import handoff
    from collectors import SyncDataCollector
    import collectors.base as base
    import collectors.local_route as route

    times: dict = {k: [] for k in ("total", "weights (trainer: check, write)", "request",
                                   "wait", "receive", "assemble (TensorDict)",
                                   "worker: collect, all", "worker: weights in")}
    patched = []

    def wrap(owner, name, key):
        fn = getattr(owner, name)
        patched.append((owner, name, fn))

        def timed_fn(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times[key].append(time.perf_counter() - t0)
            if name == "receive":
                times["worker: collect, all"].append(out[1]["collect_time"])
                times["worker: weights in"].append(out[1]["weights_time"])
            return out

        setattr(owner, name, timed_fn)

    policy = mlp()
    env = "CartPole-v1"
    if torchrl_env:
        from torchrl.envs import GymEnv

        env = functools.partial(GymEnv, "CartPole-v1", categorical_action_encoding=True)
    c = SyncDataCollector(env, policy, frames_per_batch=FPB, total_frames=-1, seed=0)
    try:
        wrap(c, "_sync_if_changed", "weights (trainer: check, write)")
        wrap(handoff.HandoffClient, "request", "request")
        wrap(handoff.HandoffClient, "receive", "receive")
        wrap(route, "wait_ready", "wait")
        wrap(base, "assemble", "assemble (TensorDict)")
        it = iter(c)
        for b in range(batches + WARMUP):
            if b == WARMUP:
                for v in times.values():
                    v.clear()
            t0 = time.perf_counter()
            next(it)
            times["total"].append(time.perf_counter() - t0)
            if change:
                step_weights(policy)
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
        c.shutdown()
    return {k: statistics.median(v) * 1e3 for k, v in times.items() if v}


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
    rows = (("raw", "raw gymnasium loop (the ceiling)", raw),
            ("bare", "raw loop in a 2nd process, a pipe per batch", bare_process),
            ("bare_ray", "raw loop in a plain Ray actor, a socket per batch", bare_ray_actor),
            ("torchrl", "TorchRL Collector", torchrl), ("ours", "ours SyncDataCollector", ours))
    for change in (True, False):
        rates = {key: [] for key, _, _ in rows}
        for _ in range(rounds):
            for key, _, fn in rows:
                rates[key].append(fn(batches, change))
        med = {k: statistics.median(v) for k, v in rates.items()}
        label = "changed every batch" if change else "unchanged"
        for key, text, _ in rows:
            fixed = 1e3 / med[key] - 1e3 / med["raw"]
            print(f"| {label} | {text} | {med[key]:,.0f} | {1e3 / med[key]:.2f} | "
                  f"{fixed:.2f} | {med[key] / med['torchrl']:.2f}x |", flush=True)
    print("\nstages of ours, median ms per batch (weights changed every batch):\n")
    print("| stage | gymnasium env | TorchRL GymEnv |\n|---|---:|---:|")
    gym_stages, trl_stages = stages(batches, True, False), stages(batches, True, True)
    for key, value in gym_stages.items():
        print(f"| {key} | {value:.3f} | {trl_stages.get(key, float('nan')):.3f} |")
    ms, nbytes = weight_push()
    print(f"\nweight push, 10 MB policy ({nbytes / 2**20:.1f} MiB), 8 same-node workers: "
          f"update_policy_weights_() {ms:.2f} ms (median of 20), {nbytes / 2**20:.1f} MiB "
          "copied once on the trainer's side (each worker copies it into its policy)", flush=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--batches", type=int, default=BATCHES)
    a = p.parse_args()
    run_small(a.rounds, a.batches)
