"""The benchmark scripts' own accounting: what a ceiling counts as a frame, and bad options."""
import importlib
import importlib.util
import os
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vector_ceilings_count_transitions_not_autoreset_steps():
    transitions = load_script("bench_common").transitions
    for env in (gym.make_vec("CartPole-v1", 4, vectorization_mode="vector_entry_point"),
                gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3)):
        obs, _ = env.reset(seed=0)
        store = []
        for _ in range(60):  # always push left: episodes of about 10 steps
            action = np.zeros(env.num_envs, dtype=np.int64)
            nxt, reward, term, trunc, _ = env.step(action)
            store.append((obs, action, reward, term, trunc, nxt))
            obs = nxt
        # CartPole pays 1 per real step; an autoreset step pays 0
        real = int(sum((step[2] == 1.0).sum() for step in store))
        assert real < 60 * env.num_envs  # some steps were resets
        assert transitions(store, env) == real
        env.close()


def test_bench_refuses_zero_rounds():
    out = subprocess.run([sys.executable, "scripts/bench.py", "--part", "steady", "--rounds", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--rounds must be at least 1; got 0" in out.stderr


def test_raw_process_ceiling_times_every_frame_and_leaves_no_process():
    """``--part workers``' ceiling: n bare Pong loops in n processes meeting every chunk."""
    import psutil
    import pytest

    pytest.importorskip("ale_py", reason="install the atari extra")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))  # the spawned processes import it by name
    try:
        workers = importlib.import_module("bench_workers")
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        t0 = time.perf_counter()
        rate = workers.raw_processes(2, 64, chunk=32)
        took = time.perf_counter() - t0
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    # 2 processes x 2 chunks x 32 frames, timed inside the run: at least 128 frames/took
    assert 128 / took < rate < float("inf")
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and "resource_tracker" not in " ".join(p.cmdline())]  # (multiprocessing's, one per process)
    assert not left


def test_bare_ray_actor_floor_serves_batches_and_leaves_nothing_behind():
    """``--part small``'s floor for an env stepped in a Ray actor: it times real round trips,
    then removes its actor and its shared-memory folder."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        small = importlib.import_module("bench_small")
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        before = set(os.listdir(shm)) if shm else set()
        t0 = time.perf_counter()
        rate = small.bare_ray_actor(40, change=True)
        took = time.perf_counter() - t0
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    assert 40 / took < rate < 100_000  # only the 40 timed batches count, and they ran
    if shm:
        assert set(os.listdir(shm)) - before == set()
    from ray.util.state import list_actors

    deadline = time.monotonic() + 20  # ray.kill returns before the state API sees it dead
    while True:
        alive = [a for a in list_actors(filters=[("class_name", "=", "_BareActor")])
                 if a.state == "ALIVE"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert alive == []


def test_scale_bench_counts_what_reaches_the_buffer_through_shared_memory():
    """``bench_scale.py --only buffer``: batches/s counted by the buffer, on the local feed."""
    import argparse

    from torch import nn

    from collectors.policies import ArgmaxLayer

    scale = load_script("bench_scale")
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    for shards in (1, 2):
        args = argparse.Namespace(steps=10, seconds=0.5, shards=shards)
        rate, route = scale.into_buffer(policy, dict(num_workers=2, num_cpus=0.5), args)
        assert route == "shared memory"
        assert 10 < rate < 1_000_000
