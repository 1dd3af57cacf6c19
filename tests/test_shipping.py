"""Envs and policies defined in a test file (not importable by the workers) still work."""
import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from collectors import SyncDataCollector
from collectors.shipping import ship_by_value


class LocalEnv(gym.Env):
    def __init__(self):
        self.observation_space = spaces.Box(-1, 1, (2,), np.float32)
        self.action_space = spaces.Discrete(3)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(2, self.t / 10, np.float32), float(action), self.t >= 4, False, {}


class AlwaysTwo(nn.Module):
    def forward(self, obs):
        return torch.full(obs.shape[:1], 2, dtype=torch.int64)


def test_classes_from_a_test_module_reach_the_workers():
    assert __name__ in ship_by_value(LocalEnv, AlwaysTwo())
    with SyncDataCollector(LocalEnv, AlwaysTwo(), frames_per_batch=8) as c:
        b = c.next()
    assert (b["action"] == 2).all() and (b["next", "reward"] == 2).all()
    assert b["next", "done"].squeeze(-1).tolist() == [False, False, False, True] * 2
