"""Input checked before anything starts, errors blamed on the right party, and every config key
doing what it says."""
import subprocess
import sys

import pytest
import torch
import yaml
from tensordict import TensorDict
from torch import nn

from actors.storage.replay_buffer import ReplayBufferActor
from collectors import (CollectorError, ConfigError, EnvCreationError, MultiSyncDataCollector,
                        RayReplayBuffer, SyncDataCollector, load_config)
from collectors.testing import counting_env, faulty_counting_env
from conftest import alive_actor_names


class SqueezingPolicy(nn.Module):
    """Right for a batch of 2 envs (the check at construction), wrong for 1: squeeze() drops
    the env dimension too."""

    def forward(self, obs):
        return obs.sum(-1).long().squeeze() % 2


def test_policy_output_is_checked_per_batch_and_blamed_on_the_policy():
    with pytest.raises(CollectorError, match=r"policy SqueezingPolicy returned shape \(\)") as err:
        with SyncDataCollector(counting_env, SqueezingPolicy(), frames_per_batch=10,
                               name="squeeze") as c:
            c.next()
    assert "env" not in str(err.value).split("\n")[0].lower() or "envs" in str(err.value)
    assert alive_actor_names("squeeze/") == []


def test_the_env_error_text_is_logged_and_kept_in_stats():
    with SyncDataCollector(faulty_counting_env, frames_per_batch=20,
                           create_env_kwargs={"mode": "raise_step", "at_step": 3}) as c:
        c.next()
        stats = c.stats()
    (entry,) = stats["env_error_log"]
    assert "injected fault: step raises" in entry["error"] and entry["error"] != "None"
    assert "Traceback" in entry["traceback"] and entry["worker"] == 0


def test_rounding_is_reported():
    with pytest.warns(UserWarning, match="frames_per_batch=10 is rounded up to 12"):
        c = SyncDataCollector(counting_env, frames_per_batch=10, num_envs=4)
    with c:
        stats = c.stats()
    assert stats["requested_frames_per_batch"] == 12 and stats["frames_per_batch_asked"] == 10


def test_a_buffer_smaller_than_a_batch_is_refused_up_front():
    rb = RayReplayBuffer(50)
    try:
        with pytest.raises(ValueError, match="holds 50 frames, less than one worker batch of 100"):
            SyncDataCollector(counting_env, frames_per_batch=100, replay_buffer=rb)
    finally:
        rb.shutdown()


def test_a_write_with_no_frames_stores_nothing():
    rb = ReplayBufferActor(10)
    assert rb.extend(TensorDict({"x": torch.zeros(0, 1)}, [0])) == 0
    assert len(rb) == 0 and rb.storage is None


def cartpole():
    import gymnasium

    return gymnasium.make("CartPole-v1")


def test_every_workers_factory_is_checked():
    with pytest.raises(ValueError, match="different envs"):
        MultiSyncDataCollector([counting_env, cartpole], num_workers=2, frames_per_batch=8)


def test_module_qualified_env_ids_reach_the_workers():
    with SyncDataCollector("collectors.testing:CountingEnv-v0", frames_per_batch=6,
                           create_env_kwargs={"episode_length": 3}) as c:
        assert c.next()["observation"][:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(EnvCreationError, match="importing 'no_such_module'"):
        SyncDataCollector("no_such_module:Env-v0", frames_per_batch=6)


def test_a_public_dashboard_needs_an_explicit_opt_in():
    with pytest.raises(ConfigError, match="allow_public_dashboard"):
        load_config({"ray": {"dashboard_host": "0.0.0.0"}})
    cfg = load_config({"ray": {"dashboard_host": "0.0.0.0", "allow_public_dashboard": True}})
    assert cfg.ray_init_kwargs()["dashboard_host"] == "0.0.0.0"


def test_cli_job_replay_buffer_and_one_line_errors(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"job": {"env": "CartPole-v1", "frames_per_batch": 100,
                                           "total_frames": 300,
                                           "replay_buffer": {"capacity": 1000}}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(job), "--quiet"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "replay buffer: 300 frames held, 300 written" in out.stdout
    for body, needle in [({"env": "NoSuchEnv-v0", "policy": "mlp"}, "NoSuchEnv"),
                         ({"env": "CartPole-v1", "frames_per_batch": -1}, "frames_per_batch"),
                         ({"env": "CartPole-v1", "replay_buffer": 5}, "replay_buffer")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"job": body}))
        out = subprocess.run([sys.executable, "-m", "collectors", "run", str(bad)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
