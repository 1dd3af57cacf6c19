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


def test_libraries_on_pythonpath_or_installed_go_by_reference(tmp_path, monkeypatch):
    """A library the actors can import by name (in a PYTHONPATH folder, as ``pip install
    --target`` leaves it, or an installed distribution) is not copied into them by value: that
    copied tensordict's classes (and failed on a lock) when tensordict lived in such a folder."""
    import sys

    from collectors.shipping import _is_user_module

    (tmp_path / "onpath_lib").mkdir()
    (tmp_path / "onpath_lib" / "__init__.py").write_text("def make():\n    return 1\n")
    (tmp_path / "helper_mod.py").write_text("def make():\n    return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import helper_mod
    import onpath_lib

    try:
        assert _is_user_module("helper_mod") and _is_user_module("onpath_lib")
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the actors would find both by name
        assert not _is_user_module("helper_mod") and not _is_user_module("onpath_lib")
        assert not _is_user_module("tensordict.nn.common")  # an installed distribution
        assert _is_user_module(__name__)  # this test file stays shipped by value
        assert ship_by_value(onpath_lib.make) == [] and helper_mod.make() == 2
    finally:
        sys.modules.pop("helper_mod", None)
        sys.modules.pop("onpath_lib", None)
