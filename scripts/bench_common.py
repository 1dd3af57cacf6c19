"""What the benchmark parts share: the policy every CartPole row uses, warm-up, timing and the
table rows. Imported by ``bench.py`` and its parts; imports none of them.
"""
from __future__ import annotations

import time

import gymnasium as gym
import torch
from torch import nn

WARMUP = 6  # batches before timing, every collector alike


class Argmax(nn.Module):
    def forward(self, x):
        return x.argmax(-1)


def mlp_policy(seed: int = 0) -> nn.Module:
    """obs(4) -> 64 -> 64 -> 2 logits -> argmax: the policy every row uses."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 2), Argmax())


class Wrapped(nn.Module):
    """The same MLP one module call deeper: ``policy(x)`` as in the raw loop, no fast path."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def make_env(heavy: bool):
    from collectors.testing import heavy_cartpole

    return heavy_cartpole(1.0) if heavy else gym.make("CartPole-v1")


def cartpole_vector_loop(frames: int, wrapped: bool = False, native: bool = False, n: int = 8) -> float:
    """A gymnasium vector env of ``n`` CartPoles with the batched MLP, storing obs / next obs /
    action / reward / flags per step: ``SyncVectorEnv`` over ``gym.make``, or CartPole's native
    vectorized implementation (``make_vec(..., vectorization_mode="vector_entry_point")``)."""
    if native:
        env = gym.make_vec("CartPole-v1", n, vectorization_mode="vector_entry_point")
    else:
        env = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * n)
    policy = Wrapped(mlp_policy()) if wrapped else mlp_policy()
    return vector_env_loop(None, policy, frames, n, env=env)




def timed(collector, frames_per_batch: int, warmup: int = WARMUP) -> float:
    it = iter(collector)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += batch.numel()
    return n / (time.perf_counter() - t0)


def ours_sync(frames: int, fpb: int, num_envs: int = 1, wrapped: bool = False,
              native_vector: bool | None = None) -> float:
    from collectors import SyncDataCollector

    policy = Wrapped(mlp_policy()) if wrapped else mlp_policy()
    with SyncDataCollector("CartPole-v1", policy, frames_per_batch=fpb,
                           total_frames=frames + WARMUP * fpb, num_envs=num_envs,
                           native_vector=native_vector) as c:
        return timed(c, fpb)


def row(name: str, fps: float | None, note: str = "") -> None:
    value = "skipped" if fps is None else f"{fps:10,.0f}"
    print(f"| {name:<46} | {value:>10} | {note} |", flush=True)


def guarded(fn, *args):
    try:
        return fn(*args)
    except ImportError as exc:
        print(f"  (skipped: {exc})")
        return None




def vector_env_loop(make, policy, frames: int, n: int = 8, env=None) -> float:
    """``SyncVectorEnv(n)`` of ``make`` (or the vector ``env`` given) with the batched policy,
    storing obs/next obs/action/reward/flags per step. Frames/s counts transitions: with
    gymnasium's default next-step autoreset, the step after an episode's end only resets that
    env (no transition; a collector delivers no frame for it), so it is not counted."""
    env = env if env is not None else gym.vector.SyncVectorEnv([make] * n)
    obs, _ = env.reset(seed=0)
    store = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(frames // n):
            action = policy(torch.as_tensor(obs)).numpy()
            nxt, reward, term, trunc, _ = env.step(action)
            store.append((obs, action, reward, term, trunc, nxt))
            obs = nxt
    elapsed = time.perf_counter() - t0
    env.close()
    return transitions(store, env) / elapsed


def transitions(store: list, env) -> int:
    """Frames in ``store`` (one ``(obs, action, reward, term, trunc, next_obs)`` per step of the
    vector ``env``), less the next-step autoreset steps: each env's step after an episode ended."""
    frames = sum(len(step[3]) for step in store)
    if env.metadata.get("autoreset_mode") == gym.vector.AutoresetMode.NEXT_STEP:
        frames -= sum(int((term | trunc).sum()) for _, _, _, term, trunc, _ in store[:-1])
    return frames
