"""A fault-injection kit for testing pipelines built on the collectors.

- :class:`CountingEnv`: observation = step index within the episode, fixed episode length,
  so frame counts, episode boundaries and trajectory ids can be checked exactly.
- :class:`FaultyEnv`: wraps an env and raises, crashes the worker process, hangs, or emits bad
  data on a schedule, for chosen workers only.
- :func:`kill_worker`: kill one env worker of a running collector, as a crash would.
- :func:`stacked_counting_env`: tiny uint8 frames stacked by gymnasium's
  ``FrameStackObservation``, for checking frame-level storage exactly.
"""
from __future__ import annotations

import os
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

_FAULT_COUNTS: dict = {}


class CountingEnv(gym.Env):
    """Observation ``[t]`` (float32), reward 1, episode ends at ``t == episode_length``.

    ``truncate=True`` ends it as truncated instead of terminated. ``obs_dict=True`` returns a
    Dict observation ``{"count": [t], "double": [2t]}``.
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, episode_length: int = 5, truncate: bool = False, obs_dict: bool = False):
        self.episode_length = episode_length
        self.truncate = truncate
        self.obs_dict = obs_dict
        box = spaces.Box(0, np.inf, (1,), np.float32)
        self.observation_space = spaces.Dict({"count": box, "double": box}) if obs_dict else box
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def _obs(self):
        obs = np.array([self.t], np.float32)
        return {"count": obs, "double": 2 * obs} if self.obs_dict else obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.episode_length
        return self._obs(), 1.0, end and not self.truncate, end and self.truncate, {}


def worker_id() -> int | None:
    """The index of the env worker this code runs in (``None`` outside a worker)."""
    value = os.environ.get("RAY_COLLECTORS_WORKER_ID")
    return None if value is None else int(value)


def worker_restarts() -> int:
    return int(os.environ.get("RAY_COLLECTORS_WORKER_RESTARTS", "0"))


class FaultyEnv(gym.Wrapper):
    """Injects one fault ``mode`` at step ``at_step`` of each env, ``times`` times per process.

    Modes: ``raise_step``, ``raise_reset``, ``raise_init``, ``raise_close`` (in ``close()``),
    ``exit`` (``os._exit(1)`` in step),
    ``hang_step``, ``hang_init``, ``nan`` (NaN observation), ``bad_shape`` (wrong observation
    shape). Only workers in ``worker_ids`` (all when ``None``) are affected; process-level faults
    (``exit``, ``hang_*``, ``raise_init``) fire only in a worker's first ``times`` incarnations.
    """

    MODES = ("raise_step", "raise_reset", "raise_init", "exit", "hang_step", "hang_init", "nan",
             "bad_shape", "raise_close")

    def __init__(self, env, mode: str, worker_ids=None, at_step: int = 5, times: float = 1):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}; got {mode!r}.")
        super().__init__(env)
        self.mode = mode
        self.at_step = at_step
        self.times = times
        wid = worker_id()
        self.active = worker_ids is None or (wid is not None and wid in worker_ids)
        self.steps = 0
        if self.active and mode in ("raise_init", "hang_init") and worker_restarts() < times:
            if mode == "hang_init":
                time.sleep(10_000)
            raise RuntimeError(f"injected fault: env creation fails in worker {wid}")

    def _fire(self) -> bool:
        if not self.active or self.steps != self.at_step:
            return False
        key = (self.mode, os.getpid())
        if self.mode in ("exit", "hang_step"):
            return worker_restarts() < self.times
        if _FAULT_COUNTS.get(key, 0) >= self.times:
            return False
        _FAULT_COUNTS[key] = _FAULT_COUNTS.get(key, 0) + 1
        return True

    def close(self):
        if self.mode == "raise_close" and self.active:
            raise RuntimeError(f"injected fault: close raises in worker {worker_id()}")
        return self.env.close()

    def reset(self, **kwargs):
        if self.mode == "raise_reset" and self.active and self.steps >= self.at_step and self._fire_reset():
            raise RuntimeError(f"injected fault: reset raises in worker {worker_id()}")
        return self.env.reset(**kwargs)

    def _fire_reset(self) -> bool:
        key = ("raise_reset", os.getpid())
        if _FAULT_COUNTS.get(key, 0) >= self.times:
            return False
        _FAULT_COUNTS[key] = _FAULT_COUNTS.get(key, 0) + 1
        return True

    def step(self, action):
        self.steps += 1
        if self.mode != "raise_reset" and self._fire():
            if self.mode == "raise_step":
                raise RuntimeError(f"injected fault: step raises in worker {worker_id()}")
            if self.mode == "exit":
                os._exit(1)
            if self.mode == "hang_step":
                time.sleep(10_000)
            obs, r, term, trunc, info = self.env.step(action)
            if self.mode == "nan":
                return np.full_like(obs, np.nan), r, term, trunc, info
            if self.mode == "bad_shape":
                return np.zeros(np.asarray(obs).size + 1, np.float32), r, term, trunc, info
        return self.env.step(action)


class CountingVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` counting envs stepped as one native vector env (gymnasium's ``NEXT_STEP``
    autoreset, as ``CartPoleVectorEnv``: a finished env returns its reset observation, reward 0,
    at its next step). Env ``i`` has episodes of ``episode_length + i`` steps, so the envs
    finish at different steps."""

    metadata: dict = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 2, episode_length: int = 5):
        self.num_envs = num_envs
        self.lengths = episode_length + np.arange(num_envs)
        self.single_observation_space = spaces.Box(0, np.inf, (1,), np.float32)
        self.single_action_space = spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.t = np.zeros(num_envs, np.int64)
        self.prev_done = np.zeros(num_envs, bool)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t[:] = 0
        self.prev_done[:] = False
        return self.t[:, None].astype(np.float32), {}

    def step(self, actions):
        self.t += 1
        reward = np.ones(self.num_envs, np.float32)
        self.t[self.prev_done] = 0
        reward[self.prev_done] = 0.0
        terminated = (self.t >= self.lengths) & ~self.prev_done
        self.prev_done = terminated
        return self.t[:, None].astype(np.float32), reward, terminated, np.zeros(self.num_envs, bool), {}


# registered on import, so "collectors.testing:CountingEnv-v0" works as a gymnasium id anywhere;
# "CountingVecEnv-v0" is the same env with a native vector implementation (env i: length 5 + i)
if "CountingEnv-v0" not in gym.registry:
    gym.register("CountingEnv-v0", entry_point="collectors.testing:CountingEnv")
if "CountingVecEnv-v0" not in gym.registry:
    gym.register("CountingVecEnv-v0", entry_point="collectors.testing:CountingEnv",
                 vector_entry_point="collectors.testing:CountingVectorEnv")


def counting_env(episode_length: int = 5, **kwargs) -> CountingEnv:
    return CountingEnv(episode_length, **kwargs)


class FrameCountingEnv(gym.Env):
    """uint8 frames ``[2, 2]``: pixel 0 is the step within the episode, pixel 1 the episode
    number (mod 256), pixel 2 a per-instance tag, pixel 3 is 7. Episodes end (terminated) at
    ``t == episode_length``."""

    metadata: dict = {"render_modes": []}
    observation_space = spaces.Box(0, 255, (2, 2), np.uint8)
    action_space = spaces.Discrete(2)

    def __init__(self, episode_length: int = 7):
        self.episode_length = episode_length
        self.t, self.episode = 0, -1
        self.tag = int.from_bytes(os.urandom(1), "little")

    def _obs(self):
        return np.array([[self.t % 256, self.episode % 256], [self.tag, 7]], np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t >= self.episode_length, False, {}


def stacked_counting_env(stack: int = 4, episode_length: int = 7) -> gym.Env:
    """:class:`FrameCountingEnv` under ``FrameStackObservation(stack)``: uint8 ``[stack, 2, 2]``
    observations, the first of each episode padded with its reset frame (gymnasium's default)."""
    return gym.wrappers.FrameStackObservation(FrameCountingEnv(episode_length), stack)


def faulty_counting_env(mode: str, worker_ids=None, at_step: int = 5, times: float = 1,
                        episode_length: int = 1000, delay_s: float = 0.0) -> FaultyEnv:
    """A module-level factory (picklable) for a :class:`FaultyEnv` around a counting env
    (sleeping ``delay_s`` per step when given)."""
    env = CountingEnv(episode_length)
    return FaultyEnv(SlowEnv(env, delay_s) if delay_s else env, mode, worker_ids, at_step, times)


def kill_worker(collector, index: int) -> None:
    """Kill env worker ``index`` of ``collector`` like a crash; the collector replaces it."""
    import ray

    ray.get(collector._driver.kill_worker.remote(index))


class BusyEnv(gym.Wrapper):
    """Adds ``busy_ms`` of CPU work to every step: a stand-in for a real simulator."""

    def __init__(self, env, busy_ms: float = 1.0):
        super().__init__(env)
        self.busy_s = busy_ms / 1000.0

    def step(self, action):
        end = time.perf_counter() + self.busy_s
        while time.perf_counter() < end:
            pass
        return self.env.step(action)


def heavy_cartpole(busy_ms: float = 1.0) -> BusyEnv:
    """CartPole-v1 plus ``busy_ms`` of CPU work per step (the benchmark's "heavy" env)."""
    return BusyEnv(gym.make("CartPole-v1"), busy_ms)


class SlowEnv(gym.Wrapper):
    """Sleeps ``delay_s`` in every step (a slow worker, without using CPU)."""

    def __init__(self, env, delay_s: float):
        super().__init__(env)
        self.delay_s = delay_s

    def step(self, action):
        time.sleep(self.delay_s)
        return self.env.step(action)


def slow_counting_env(delay_s: float = 0.01, episode_length: int = 5) -> SlowEnv:
    return SlowEnv(CountingEnv(episode_length), delay_s)
