"""Real workloads for tests and benchmarks: Atari Pong (uint8 pixel stacks) and MuJoCo
HalfCheetah, with the policies RL codebases use for them.

Needs the extras: ``pip install 'ray-collectors[atari]'`` (ale-py ships its ROMs) and
``'ray-collectors[mujoco]'``. Factories are module-level, so env actors import them by name.

Example:
    >>> env = pong()                       # doctest: +SKIP
    >>> env.observation_space              # doctest: +SKIP
    Box(0, 255, (4, 84, 84), uint8)
"""
from __future__ import annotations

import torch
from torch import nn


def pong(env_id: str = "ALE/Pong-v5", **kwargs):
    """``AtariPreprocessing`` (84x84 grayscale, frame skip 4) and ``FrameStackObservation(4)``:
    uint8 observations ``[4, 84, 84]``."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    gym.register_envs(ale_py)
    env = gym.make(env_id, frameskip=1, **kwargs)  # AtariPreprocessing does the frame skip
    env = AtariPreprocessing(env, frame_skip=4, screen_size=84, grayscale_obs=True)
    return FrameStackObservation(env, 4)


def half_cheetah(**kwargs):
    """MuJoCo ``HalfCheetah-v5``: 17 float64 observations, 6 actions in [-1, 1]."""
    import gymnasium as gym

    return gym.make("HalfCheetah-v5", **kwargs)


class NatureDQN(nn.Module):
    """Mnih et al. (2015): three convolutions and a 512-unit layer over uint8 frame stacks;
    the greedy action index."""

    def __init__(self, n_actions: int = 6, frames: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(frames, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n_actions))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames.float() / 255.0).argmax(-1)


class CheetahMLP(nn.Module):
    """A 256-256 MLP with a tanh head: 17 observations to 6 actions in [-1, 1]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(17, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 6), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float())
