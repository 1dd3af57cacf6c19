"""Fuzzing bad input with hypothesis: configs, constructor options and env outputs. Every
generated input gets a clear error (one of ours, or ValueError/TypeError naming the problem)
or a correct batch; nothing hangs and no frame is lost."""
import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import RayCollectorsError
from actors.options import CollectorOptions
from actors.stepping.rollout import Rollout
from collectors import ConfigError, SyncDataCollector, load_config
from collectors.validate import build_spec

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                      st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.dictionaries(st.sampled_from(["ray", "resources", "placement", "job", "train", "bogus"]),
                       st.one_of(ANY_VALUE, st.dictionaries(
                           st.sampled_from(["address", "num_cpus", "dashboard_host", "strategy",
                                            "timeout_s", "env_worker", "driver", "env", "x"]),
                           ANY_VALUE, max_size=3)), max_size=4))
def test_configs_validate_or_name_the_key(data):
    try:
        cfg = load_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid config") or "config" in str(exc)
        return
    assert cfg.placement.timeout_s > 0  # a config that loads is a usable one


OPTION_NAMES = [n for n in CollectorOptions.model_fields
                if n not in ("config", "replay_buffer", "frames_per_batch")]


@FAST
@given(st.dictionaries(st.sampled_from(OPTION_NAMES + ["not_an_option"]), ANY_VALUE, max_size=5),
       st.one_of(st.integers(-5, 10**6), ANY_VALUE))
def test_constructor_options_validate_or_explain(values, frames_per_batch):
    try:
        opts = CollectorOptions.build("Fuzz", frames_per_batch=frames_per_batch, **values)
    except TypeError as exc:
        assert "unexpected keyword" in str(exc) or "not_an_option" in str(exc)
        return
    except ValueError as exc:
        assert str(exc).startswith("Fuzz:") and len(str(exc)) < 2000
        return
    assert opts.frames_per_batch >= 1 and opts.num_envs >= 1
    assert opts.total_frames == -1 or opts.total_frames > 0
    assert opts.startup_timeout_s > 0 and opts.restart_window_s > 0


class FuzzEnv(gym.Env):
    """Declares Box(4,) float32; returns whatever it was given at step ``at``."""

    def __init__(self, bad, at):
        self.observation_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.bad, self.at, self.t = bad, at, 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros(4, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = self.bad if self.t == self.at else np.full(4, self.t, np.float32)
        return obs, 1.0, False, self.t >= 7, {}


BAD_OBS = st.one_of(
    st.builds(lambda n: np.zeros(n, np.float32), st.integers(0, 8)),          # wrong shape
    st.builds(lambda: np.array([np.nan, 0, 0, 0], np.float32)),               # NaN
    st.builds(lambda: np.array([np.inf, 0, 0, 0], np.float32)),               # inf
    st.builds(lambda: np.zeros(4, np.float64)),                                # other dtype
    st.builds(lambda: np.zeros((2, 2), np.float32)),                           # other rank
    st.sampled_from([None, "obs", 3, [0, 0, 0, 0], {"a": 1}]),                 # not an array
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BAD_OBS, st.integers(1, 12), st.sampled_from(["raise", "drop_episode", "off"]))
def test_bad_env_outputs_give_a_clear_error_or_a_correct_batch(bad, at, check_finite):
    spec, kind = build_spec(lambda: FuzzEnv(np.zeros(4, np.float32), 0), None, None, 1)
    options = CollectorOptions(frames_per_batch=10, check_finite=check_finite)
    rollout = Rollout([lambda: FuzzEnv(bad, at)], None, kind, spec, 10, options)
    try:
        batch = rollout.collect()
    except RayCollectorsError as exc:
        assert str(exc)  # named, with a message
        return
    frames = rollout.num_envs * rollout.last_valid_steps
    assert frames == 10  # a full batch: nothing lost
    valid = batch[("collector", "traj_ids")] >= 0
    assert valid.sum() == 10 - rollout.dropped_frames
    for key, value in batch.items():  # delivered frames are well-formed
        if value.dtype.kind == "f" and check_finite != "off":
            assert np.isfinite(value[valid]).all(), key
    assert batch["observation"].shape == (1, 10, 4) and batch["observation"].dtype == np.float32


@pytest.mark.parametrize("bad", [np.zeros(3, np.float32), np.array([np.nan] * 4, np.float32), "x"])
def test_bad_env_outputs_through_a_collector_end_in_a_clear_error(bad):
    import functools

    env = functools.partial(FuzzEnv, bad, 3)
    with pytest.raises((RayCollectorsError, ValueError)) as err:
        with SyncDataCollector(env, frames_per_batch=10, check_finite=True) as c:
            c.next()
    assert not math.isnan(len(str(err.value))) and str(err.value)
