"""MultiSyncDataCollector and MultiaSyncDataCollector."""
import functools
import time

import pytest
import ray
import torch
from torch import nn

from collectors import (MultiAsyncCollector, MultiaSyncDataCollector, MultiSyncCollector,
                        MultiSyncDataCollector)
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env, slow_counting_env
from conftest import alive_actor_names


def test_aliases():
    assert MultiSyncCollector is MultiSyncDataCollector
    assert MultiAsyncCollector is MultiaSyncDataCollector


def test_stack_layout_exact_frames_and_unique_ids():
    with MultiSyncDataCollector(counting_env, num_workers=4, frames_per_batch=40, total_frames=120,
                                create_env_kwargs={"episode_length": 3}, name="ms-stack") as c:
        assert sorted(alive_actor_names("ms-stack/")) == [
            "ms-stack/driver"] + [f"ms-stack/env-worker-{i}" for i in range(4)]
        batches = list(c)
        stats = c.stats()
    assert len(batches) == 3
    for b in batches:
        assert b.batch_size == torch.Size([4, 10])
        assert b.names == [None, "time"]
        assert b["collector", "worker_id"].tolist() == [[i] * 10 for i in range(4)]
    assert stats["frames"] == 120 and stats["batches"] == 3 and stats["workers"] == 4
    assert stats["workers_alive"] == 4
    assert [p["frames"] for p in stats["per_worker"]] == [30] * 4
    full = torch.cat(batches, dim=1)
    ids = full["collector", "traj_ids"]
    rows = [set(ids[w].tolist()) for w in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not rows[a] & rows[b]
        assert torch.all(ids[a, 1:] >= ids[a, :-1])
        assert len(rows[a]) == 10  # 30 steps of 3-step episodes per worker


def test_cat_layout_and_num_envs():
    with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=20, total_frames=20,
                                cat_results=-1) as c:
        b = c.next()
    assert b.batch_size == torch.Size([20]) and b.names == ["time"]
    assert b["collector", "worker_id"].tolist() == [0] * 10 + [1] * 10
    with MultiSyncDataCollector(counting_env, num_workers=2, num_envs=3, frames_per_batch=24) as c:
        assert c.requested_frames_per_batch == 24
        b = c.next()
    assert b.batch_size == torch.Size([2, 3, 4]) and b.names == [None, None, "time"]
    with MultiSyncDataCollector(counting_env, num_workers=2, num_envs=3, frames_per_batch=24,
                                cat_results="cat") as c:
        assert c.next().batch_size == torch.Size([3, 8])


def test_list_of_factories_one_per_worker():
    fns = [functools.partial(counting_env, 2), functools.partial(counting_env, 4)]
    with MultiSyncDataCollector(fns, frames_per_batch=8) as c:
        b = c.next()
    assert b["next", "done"][0].squeeze(-1).tolist() == [False, True] * 2
    assert b["next", "done"][1].squeeze(-1).tolist() == [False, False, False, True]


def test_async_yields_in_completion_order():
    fns = [functools.partial(slow_counting_env, 0.05), functools.partial(counting_env, 5)]
    with MultiaSyncDataCollector(fns, frames_per_batch=10, total_frames=60) as c:
        order = [int(b["collector", "worker_id"][0]) for b in c]
        stats = c.stats()
    # the fast worker (1) delivers most batches and comes first; the slow one (0) once or so
    assert order[0] == 1
    assert order.count(1) >= 4
    assert stats["frames"] == 60
    assert c.stats()["frames"] == 60  # still answers after shutdown


def test_async_batch_shape():
    with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=12, num_envs=3) as c:
        b = c.next()
    assert b.batch_size == torch.Size([3, 4]) and b.names == [None, "time"]
    assert ("collector", "worker_id") in b.keys(include_nested=True)


def test_async_workers_run_ahead_but_are_bounded():
    with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=50) as c:
        c.next()
        handles = ray.get(c._driver.worker_handles.remote())

        def produced():
            return sum(s["frames"] for s in ray.get([h.state_dict.remote() for h in handles]))

        deadline = time.monotonic() + 30
        while produced() < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        # one batch consumed, and each worker one batch ahead: progress while the consumer waits
        assert produced() == 150
        time.sleep(0.5)  # a window in which no worker may run further ahead
        assert sum(s["frames"] for s in ray.get([h.state_dict.remote() for h in handles])) == 150


def test_preemption_masks_stragglers():
    fns = [functools.partial(counting_env, 5), functools.partial(slow_counting_env, 0.02)]
    with MultiSyncDataCollector(fns, frames_per_batch=400, preemptive_threshold=0.5) as c:
        b = c.next()
        stats = c.stats()
    mask = b["collector", "mask"]
    ids = b["collector", "traj_ids"]
    assert mask[0].all()
    assert not mask[1].all()  # the slow worker was cut short
    assert torch.equal(mask, ids >= 0)
    assert stats["frames"] == int(mask.sum())
    valid = int(mask[1].sum())
    assert (b["observation"][1, valid:] == 0).all()


def test_preemption_with_workers_end_to_end_gives_only_real_frames():
    fns = [functools.partial(counting_env, 5), functools.partial(slow_counting_env, 0.02)]
    with MultiSyncDataCollector(fns, frames_per_batch=400, preemptive_threshold=0.5,
                                cat_results=-1) as c:
        b = c.next()
        stats = c.stats()
    ids = b["collector", "traj_ids"]
    assert b.batch_dims == 1 and (ids >= 0).all() and "mask" not in b["collector"].keys()
    assert 200 < b.numel() < 400 and stats["frames"] == b.numel()  # (as TorchRL)


def test_weight_updates_and_version_stamps():
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with MultiSyncDataCollector(counting_env, policy, num_workers=3, frames_per_batch=30,
                                auto_sync_weights=False) as c:  # explicit updates only
        assert (c.next()["collector", "policy_version"] == 0).all()
        with torch.no_grad():
            policy[0].weight.zero_()
            policy[0].bias.copy_(torch.tensor([0.0, 5.0]))
        c.update_policy_weights_()
        b = c.next()
        assert (b["collector", "policy_version"] == 1).all() and (b["action"] == 1).all()
        with torch.no_grad():
            policy[0].bias.copy_(torch.tensor([5.0, 0.0]))
        c.update_policy_weights_(worker_ids=[1])
        b = c.next()
        assert b["collector", "policy_version"][:, 0].tolist() == [1, 2, 1]
        assert (b["action"][1] == 0).all() and (b["action"][0] == 1).all()
        stats = c.stats()
        assert [p["policy_version"] for p in stats["per_worker"]] == [1, 2, 1]


def test_update_at_each_batch():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with MultiSyncDataCollector(counting_env, policy, num_workers=2, frames_per_batch=10,
                                total_frames=30, update_at_each_batch=True) as c:
        versions = [int(b["collector", "policy_version"].max()) for b in c]
    assert versions == [1, 2, 3]


def test_multisync_seeding_reproducible():
    def run(seed):
        with MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=40,
                                    total_frames=80, seed=seed) as c:
            return torch.cat(list(c), dim=1)

    a, b = run(11), run(11)
    assert (a == b).all()
    # each worker has its own seed stream
    assert not torch.equal(a["observation"][0], a["observation"][1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="cat_results"):
        MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, cat_results=1)
    with pytest.raises(ValueError, match="num_workers"):
        MultiSyncDataCollector([counting_env] * 2, num_workers=3, frames_per_batch=10)
    with pytest.raises(ValueError, match="preemptive_threshold"):
        MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, preemptive_threshold=1.5)


def test_shutdown_leaves_nothing():
    c = MultiaSyncDataCollector(counting_env, num_workers=3, frames_per_batch=10, name="ma-down")
    c.next()
    c.shutdown()
    c.shutdown()
    assert alive_actor_names("ma-down/") == []
    assert c.stats()["workers"] == 3


def test_create_env_kwargs_per_worker():
    with MultiSyncDataCollector([counting_env] * 2, frames_per_batch=16,
                                create_env_kwargs=[{"episode_length": 3}, {"episode_length": 7}]) as c:
        b = c.next()
    assert b["observation"][0, :, 0].tolist() == [0, 1, 2] * 2 + [0, 1]
    assert b["observation"][1, :, 0].tolist() == list(range(7)) + [0]
    with pytest.raises(ValueError, match="one per worker"):
        MultiSyncDataCollector([counting_env] * 2, frames_per_batch=16,
                               create_env_kwargs=[{"episode_length": 3}])


def test_preempted_padding_never_reaches_a_local_replay_buffer():
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    rb = ReplayBuffer(storage=LazyTensorStorage(1000))
    fns = [functools.partial(counting_env, 5), functools.partial(slow_counting_env, 0.02)]
    with MultiSyncDataCollector(fns, frames_per_batch=400, preemptive_threshold=0.5,
                                replay_buffer=rb, total_frames=1) as c:
        for _ in c:
            pass
        frames = c.stats()["frames"]
    assert 200 < len(rb) == frames < 400  # the slow worker's real frames only
    assert (rb[:]["collector", "traj_ids"] >= 0).all()
