"""SyncDataCollector: layout, boundaries, ids, seeding, options, errors, lifecycle."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from collectors import Collector, DataCollectorBase, BaseCollector, SyncDataCollector
from collectors.errors import EnvCreationError
from collectors.policies import ArgmaxLayer, mlp
from collectors.testing import CountingEnv, counting_env
from collectors import PolicyOutputError
from conftest import alive_actor_names

ROOT_KEYS = {"observation", "action", "done", "terminated", "truncated"}
NEXT_KEYS = {"observation", "reward", "done", "terminated", "truncated"}


def keys_of(batch):
    return set(batch.keys(include_nested=True, leaves_only=True))


def test_aliases():
    assert Collector is SyncDataCollector
    assert BaseCollector is DataCollectorBase
    assert issubclass(SyncDataCollector, DataCollectorBase)


def test_counting_env_layout_and_boundaries():
    with SyncDataCollector(counting_env, frames_per_batch=12, total_frames=36,
                           create_env_kwargs={"episode_length": 5}) as c:
        batches = list(c)
    assert len(batches) == 3
    expected = ROOT_KEYS | {("next", k) for k in NEXT_KEYS} | {
        ("collector", "traj_ids"), ("collector", "policy_version")}
    for b in batches:
        assert keys_of(b) == expected
        assert b.batch_size == torch.Size([12])
        assert b.names == ["time"]
        assert b["next", "reward"].shape == (12, 1) and b["next", "reward"].dtype == torch.float32
        for k in ("done", "terminated", "truncated"):
            assert b[k].dtype == torch.bool and b[k].shape == (12, 1)
            assert b["next", k].dtype == torch.bool and b["next", k].shape == (12, 1)
        assert b["collector", "traj_ids"].dtype == torch.int64
        assert b["action"].dtype == torch.int64 and b["action"].shape == (12,)
        assert not b["done"].any()  # root done is the pre-step flag, False after a reset
    full = torch.cat(batches)
    obs = full["observation"].squeeze(-1)
    nxt = full["next", "observation"].squeeze(-1)
    done = full["next", "done"].squeeze(-1)
    # observation counts steps: 0..4, then the real final observation 5 at the terminal step
    assert obs.tolist() == [float(i % 5) for i in range(36)]
    assert nxt.tolist() == [float(i % 5 + 1) for i in range(36)]
    assert done.tolist() == [(i % 5) == 4 for i in range(36)]
    assert full["next", "terminated"].squeeze(-1).tolist() == done.tolist()
    assert not full["next", "truncated"].any()
    # inside an episode obs[t+1] == next_obs[t]
    inside = ~done[:-1]
    assert torch.equal(obs[1:][inside], nxt[:-1][inside])
    # trajectory ids: one per episode, increasing, continuing across batches
    assert full["collector", "traj_ids"].tolist() == [i // 5 for i in range(36)]


def test_num_envs_layout_and_unique_ids():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=24, num_envs=3,
                           create_env_kwargs={"episode_length": 3}) as c:
        assert c.requested_frames_per_batch == 12
        assert len(c) == 2
        batches = list(c)
    assert len(batches) == 2
    b = batches[0]
    assert b.batch_size == torch.Size([3, 4])
    assert b.names == [None, "time"]
    assert b["next", "observation"].shape == (3, 4, 1)
    full = torch.cat(batches, dim=1)
    ids = full["collector", "traj_ids"]
    # each env: episodes of 3 steps; ids within a row increase; no id shared by two envs
    for row in range(3):
        assert torch.all(ids[row, 1:] >= ids[row, :-1])
    per_env = [set(ids[r].tolist()) for r in range(3)]
    assert not (per_env[0] & per_env[1]) and not (per_env[1] & per_env[2]) and not (per_env[0] & per_env[2])
    assert sorted(set(ids.flatten().tolist())) == list(range(3 * 3))  # 8 steps -> 3 episodes each
    assert (full["observation"].squeeze(-1) == torch.arange(8).remainder(3).float()).all()


def test_total_frames_rounding():
    with SyncDataCollector("CartPole-v1", frames_per_batch=64, total_frames=200) as c:
        assert len(c) == 4
        n = [b.numel() for b in c]
    assert n == [64] * 4
    with pytest.raises(RuntimeError):
        with SyncDataCollector("CartPole-v1", frames_per_batch=8) as endless:
            len(endless)


def test_seed_reproducible_first_batch():
    def run(seed):
        with SyncDataCollector("CartPole-v1", frames_per_batch=50, total_frames=100, seed=seed) as c:
            return torch.cat(list(c))

    a, b, other = run(3), run(3), run(4)
    assert (a == b).all()
    assert not torch.equal(a["observation"], other["observation"])


def test_set_seed_returns_int_and_reproduces():
    with SyncDataCollector("CartPole-v1", frames_per_batch=40, num_envs=2) as c:
        out = c.set_seed(7)
        assert type(out) is int and out == 8  # the last seed used: 7 + 2 envs - 1
        first = c.next()
        c.set_seed(7)
        again = c.next()
    assert torch.equal(first["observation"], again["observation"])
    assert torch.equal(first["action"], again["action"])


def cartpole_module():
    torch.manual_seed(0)
    return nn.Sequential(mlp(4, 2), ArgmaxLayer())


def test_cartpole_module_policy_and_weight_updates():
    policy = cartpole_module()
    with SyncDataCollector("CartPole-v1", policy, frames_per_batch=100, total_frames=-1, seed=0) as c:
        b0 = c.next()
        assert (b0["collector", "policy_version"] == 0).all()
        # the actions are the policy's
        assert torch.equal(policy(b0["observation"]), b0["action"])
        with torch.no_grad():
            policy[0][-1].bias.copy_(torch.tensor([10.0, -10.0]))
        c.update_policy_weights_()
        b1 = c.next()
        assert (b1["action"] == 0).all()
        assert (b1["collector", "policy_version"] == 1).all()
        # a module or a state dict work as well
        other = cartpole_module()
        with torch.no_grad():
            other[0][-1].bias.copy_(torch.tensor([-10.0, 10.0]))
        c.update_policy_weights_(other.state_dict())
        b2 = c.next()
        assert (b2["action"] == 1).all()
        assert (b2["collector", "policy_version"] == 2).all()
        c.update_policy_weights_(TensorDict.from_module(policy))
        assert (c.next()["action"] == 0).all()
        with pytest.raises(ValueError, match="expected shape"):
            bad = policy.state_dict()
            bad["0.0.weight"] = torch.zeros(3, 3)
            c.update_policy_weights_(bad)


def test_pendulum_continuous_and_td_module_extras():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    class Head(nn.Module):
        def forward(self, out):
            return torch.tanh(out[..., :1]) * 2, out[..., 1:]

    policy = TensorDictModule(nn.Sequential(net, Head()), in_keys=["observation"],
                              out_keys=["action", "loc_extra"])
    with SyncDataCollector("Pendulum-v1", policy, frames_per_batch=50, total_frames=100,
                           num_envs=2) as c:
        b = c.next()
    assert b.batch_size == torch.Size([2, 25])
    assert b["action"].shape == (2, 25, 1) and b["action"].dtype == torch.float32
    assert b["loc_extra"].shape == (2, 25, 1)
    assert (b["action"].abs() <= 2).all()
    assert b["next", "reward"].dtype == torch.float32


def test_callable_td_policy_and_dict_observations():
    def policy(td):
        td["action"] = (td["count"][..., 0] > 1).long()
        td["score"] = td["double"] + 1
        return td

    with SyncDataCollector(CountingEnv, policy, frames_per_batch=6,
                           create_env_kwargs={"obs_dict": True, "episode_length": 4}) as c:
        b = c.next()
    assert {"count", "double", ("next", "count"), ("next", "double"), "score"} <= keys_of(b)
    assert "observation" not in b.keys()
    assert b["action"].tolist() == [0, 0, 1, 1, 0, 0]
    assert torch.equal(b["score"], b["double"] + 1)


def test_max_frames_per_traj_adds_step_count_and_truncates():
    with SyncDataCollector(counting_env, frames_per_batch=10, max_frames_per_traj=3,
                           create_env_kwargs={"episode_length": 100}) as c:
        b = c.next()
    assert b["step_count"].squeeze(-1).tolist() == [0, 1, 2] * 3 + [0]
    assert b["next", "step_count"].squeeze(-1).tolist() == [1, 2, 3] * 3 + [1]
    assert b["next", "truncated"].squeeze(-1).tolist() == [False, False, True] * 3 + [False]
    assert b["next", "done"].squeeze(-1).tolist() == b["next", "truncated"].squeeze(-1).tolist()
    assert not b["next", "terminated"].any()
    assert b["step_count"].dtype == torch.int64


def test_init_random_frames_zero_fills_policy_outputs():
    policy = TensorDictModule(nn.Sequential(nn.Linear(4, 2), ArgmaxLayer()),
                              in_keys=["observation"], out_keys=["action"])

    def with_extra(td):
        td = policy(td)
        td["logits"] = torch.ones(td.batch_size[0], 2)
        return td

    with SyncDataCollector("CartPole-v1", with_extra, frames_per_batch=20, total_frames=60,
                           init_random_frames=25) as c:
        batches = list(c)
    assert (batches[0]["logits"] == 0).all() and (batches[1]["logits"] == 0).all()
    assert (batches[2]["logits"] == 1).all()


def test_reset_at_each_iter_starts_fresh_trajectories():
    with SyncDataCollector(counting_env, frames_per_batch=4, total_frames=12, reset_at_each_iter=True,
                           create_env_kwargs={"episode_length": 100}) as c:
        batches = list(c)
    for b in batches:
        assert b["observation"].squeeze(-1).tolist() == [0, 1, 2, 3]
    ids = [b["collector", "traj_ids"].unique().tolist() for b in batches]
    assert ids[0] != ids[1] != ids[2] and len({i[0] for i in ids}) == 3


def test_split_trajs_and_postproc():
    seen = []

    def postproc(td):
        seen.append(td.batch_size)
        return td

    with SyncDataCollector(counting_env, frames_per_batch=12, split_trajs=True, postproc=postproc,
                           create_env_kwargs={"episode_length": 5}) as c:
        b = c.next()
    assert b.batch_size == torch.Size([3, 5])
    assert b.names == [None, "time"]
    mask = b["collector", "mask"]
    assert mask.sum(-1).tolist() == [5, 5, 2]
    assert b["observation"][2, :2].squeeze(-1).tolist() == [0, 1]
    assert (b["observation"][2, 2:] == 0).all()
    assert seen == [torch.Size([3, 5])]


def test_bad_input_fails_before_actors():
    with pytest.raises(EnvCreationError, match="NotAnEnv-v9"):
        SyncDataCollector("NotAnEnv-v9", frames_per_batch=10)
    with pytest.raises(ValueError, match="frames_per_batch"):
        SyncDataCollector("CartPole-v1", frames_per_batch=0)
    with pytest.raises(ValueError, match="frames_per_batch"):
        SyncDataCollector("CartPole-v1", frames_per_batch=-5)
    with pytest.raises(PolicyOutputError, match=r"expected shape \(\)"):
        SyncDataCollector("CartPole-v1", nn.Linear(4, 2), frames_per_batch=10)
    with pytest.raises(PolicyOutputError, match="float32"):
        SyncDataCollector("Pendulum-v1", nn.Linear(3, 2), frames_per_batch=10)
    with pytest.raises(ValueError, match="reset_when_done=False is deprecated"):
        SyncDataCollector("CartPole-v1", frames_per_batch=10, reset_when_done=False)
    with pytest.raises(TypeError, match="not_an_option"):
        SyncDataCollector("CartPole-v1", frames_per_batch=10, not_an_option=1)
    assert alive_actor_names("SyncDataCollector") == []


def test_state_dict_round_trip():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, policy, frames_per_batch=10, total_frames=100) as c:
        it = iter(c)
        first = torch.cat([next(it), next(it)])
        state = c.state_dict()
    assert first["collector", "traj_ids"].tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert state["frames"] == 20 and state["iter"] == 2
    assert state["worker0"]["id_counter"] == 5  # id 4 went to the episode just begun
    fresh = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, fresh, frames_per_batch=10, total_frames=100) as d:
        d.load_state_dict(state)
        assert d.state_dict()["frames"] == 20
        for name, value in fresh.state_dict().items():  # the policy's weights came back
            assert torch.equal(value, policy.state_dict()[name])
        batches = list(d)
        assert len(batches) == 8
        # restored workers start fresh episodes whose ids continue after the saved ones
        assert batches[0]["collector", "traj_ids"].tolist() == [5] * 5 + [6] * 5
        assert batches[0]["observation"][:, 0].tolist() == [0, 1, 2, 3, 4] * 2


def test_shutdown_is_idempotent_and_leaves_no_actor():
    c = SyncDataCollector("CartPole-v1", frames_per_batch=10, name="shutdown-check")
    assert sorted(alive_actor_names("shutdown-check/")) == [
        "shutdown-check/driver", "shutdown-check/env-worker-0"]
    c.next()
    c.shutdown()
    c.shutdown()
    assert alive_actor_names("shutdown-check/") == []
    assert c.stats()["frames"] == 10
    with pytest.raises(RuntimeError, match="shut down"):
        c.next()


def test_iteration_error_shuts_down():
    def postproc(td):
        raise ValueError("boom")

    c = SyncDataCollector("CartPole-v1", frames_per_batch=10, total_frames=30, postproc=postproc,
                          name="raising-iter")
    with pytest.raises(ValueError, match="boom"):
        for _ in c:
            pass
    assert alive_actor_names("raising-iter/") == []


def test_stats_episodes_mean_return_and_rate():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=20,
                           create_env_kwargs={"episode_length": 4}) as c:
        list(c)
        stats = c.stats()
    assert stats["episodes"] == 5 and stats["mean_return"] == 4.0  # 20 frames, 4-step episodes
    assert stats["recent_returns"] == [4.0] * 5 and stats["frames_per_s"] > 0


def test_set_truncated_rollout_and_worker_nice():
    import os

    import ray

    with SyncDataCollector(counting_env, frames_per_batch=6, num_envs=2, set_truncated=True,
                           create_env_kwargs={"episode_length": 100}, worker_nice=5) as c:
        b = c.rollout()  # a batch, counted like an iteration step
        assert c.stats()["frames"] == 6
        handle = ray.get(c._driver.worker_handles.remote())[0]
        nice = ray.get(handle.__ray_call__.remote(lambda self: os.nice(0)))
    assert b["next", "truncated"][:, -1].all() and b["next", "done"][:, -1].all()
    assert not b["next", "truncated"][:, :-1].any()  # only the last step of each row
    assert nice >= 5  # the env actor runs at a lower OS priority


def test_async_prefetch_runs_further_ahead():
    import time

    import ray

    from collectors import MultiaSyncDataCollector

    with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=50, prefetch=3) as c:
        c.next()
        handles = ray.get(c._driver.worker_handles.remote())

        def produced():
            return sum(s["frames"] for s in ray.get([h.state_dict.remote() for h in handles]))

        deadline = time.monotonic() + 30
        while produced() < 350 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert produced() == 350  # one worker: 1 consumed + 3 ahead; the other: 3 ahead
        time.sleep(0.5)  # and no further
        assert produced() == 350
