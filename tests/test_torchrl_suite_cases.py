"""Behaviours TorchRL's own collector tests rely on, in our words: actions shaped with size-1
dims dropped, nested truncation flags, TorchRL's state_dict layout (worker entries, the env's
transform state)."""
import functools

import pytest
import torch
from torch import nn

pytest.importorskip("torchrl", reason="install the torchrl extra")

from tensordict.nn import TensorDictModule, TensorDictModuleBase  # noqa: E402
from torchrl.data.utils import CloudpickleWrapper  # noqa: E402
from torchrl.envs import InitTracker, ObservationNorm, TransformedEnv  # noqa: E402
from torchrl.testing.mocking_classes import (ContinuousActionVecMockEnv, CountingEnv,  # noqa: E402
                                             DiscreteActionVecMockEnv, NestedCountingEnv)

from actors.errors import PolicyOutputError  # noqa: E402
from collectors import MultiSyncDataCollector, SyncDataCollector  # noqa: E402


def ones_action(td):
    return td.set("action", torch.ones(td.shape, dtype=torch.int))  # shape (), spec (1,)


def test_an_action_without_the_specs_size_one_dim_is_taken_as_torchrl_does():
    env = CountingEnv(max_steps=8, start_val=4)  # counts 4..8, then resets
    with SyncDataCollector(env, ones_action, frames_per_batch=12, total_frames=12) as c:
        batch = c.next()
    expected = torch.cat([torch.arange(4, 9), torch.arange(4, 9), torch.arange(4, 6)])
    assert torch.equal(batch["observation"].squeeze(-1), expected.to(torch.int32))
    assert batch["action"].shape == (12,)  # kept as the policy wrote it, as TorchRL keeps it


def test_an_index_action_on_a_one_hot_env_is_still_refused():
    def index(td):
        return td.set("action", torch.zeros(td.shape, dtype=torch.long))

    with pytest.raises(PolicyOutputError, match="one-hot"):
        SyncDataCollector(DiscreteActionVecMockEnv, index, frames_per_batch=4)


def nested_env():
    return TransformedEnv(NestedCountingEnv(), InitTracker()).add_truncated_keys()


@pytest.mark.parametrize("cls", [SyncDataCollector, MultiSyncDataCollector])
def test_set_truncated_ends_nested_and_root_flags(cls):
    policy = CloudpickleWrapper(nested_env().rand_action)
    envs = nested_env if cls is SyncDataCollector else [nested_env, nested_env]
    with cls(envs, policy, frames_per_batch=20, total_frames=20, set_truncated=True) as c:
        batch = c.next()
    last = batch[..., -1]
    assert last["next", "data", "truncated"].all() and last["next", "data", "done"].all()
    assert not batch[..., 0]["next", "data", "truncated"].all()  # only the last step is cut


def normed_env():
    return TransformedEnv(ContinuousActionVecMockEnv(),
                          ObservationNorm(loc=0.0, scale=1.0, in_keys=["observation"]))


def test_state_dict_has_torchrl_worker_entries_and_restores_the_envs_transforms():
    policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
    with MultiSyncDataCollector([normed_env, normed_env], policy, frames_per_batch=8) as c:
        c.next()
        state = c.state_dict()
        for w in ("worker0", "worker1"):
            for k, v in policy.state_dict().items():
                assert torch.equal(state[w]["policy_state_dict"][k], v)
            loc_keys = [k for k in state[w]["env_state_dict"] if k.endswith("loc")]
            assert loc_keys, state[w]["env_state_dict"].keys()
        for w in ("worker0", "worker1"):
            for k in loc_keys:
                state[w]["env_state_dict"][k] = torch.full_like(state[w]["env_state_dict"][k], 1e3)
        c.load_state_dict(state)
        assert (c.next()["observation"] > 500).all()  # obs * scale + loc, with loc 1000 now


def test_single_collector_state_dict_has_the_envs_state_at_the_top_as_torchrl():
    policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
    with SyncDataCollector(normed_env, policy, frames_per_batch=8) as c:
        state = c.state_dict()
    assert any(k.endswith("loc") for k in state["env_state_dict"])
    assert state["env_state_dict"].keys() == state["worker0"]["env_state_dict"].keys()


class DeviceCheck(TensorDictModuleBase):
    """Acts with zeros; raises unless its input TensorDict's device is ``expected``."""

    in_keys, out_keys = ["observation"], ["action"]

    def __init__(self, expected):
        super().__init__()
        self.expected = expected

    def forward(self, td):
        if td.device != self.expected:
            raise AssertionError(f"policy input on {td.device}, expected {self.expected}")
        return td.set("action", torch.zeros(*td.shape, 7))


@pytest.mark.parametrize("policy_device, seen", [(None, None), ("cpu", torch.device("cpu"))])
def test_the_policy_sees_the_device_torchrl_gives_it(policy_device, seen):
    # an env on cpu: with no policy_device the policy's input has no device (TorchRL clears
    # it), with policy_device="cpu" it is on cpu
    with SyncDataCollector(ContinuousActionVecMockEnv, DeviceCheck(seen), frames_per_batch=4,
                           env_device="cpu", policy_device=policy_device) as c:
        batch = c.next()
    # and with env_device == policy_device, batches are stored there (TorchRL's fallback)
    assert batch.device == (torch.device("cpu") if policy_device == "cpu" else None)


def counting_pair():
    from torchrl.envs import SerialEnv

    return SerialEnv(2, CountingEnv)


def test_a_two_dim_local_buffer_gets_one_row_per_env():
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    rb = ReplayBuffer(storage=LazyTensorStorage(64, ndim=2))
    with MultiSyncDataCollector([counting_pair, counting_pair], ones_action, frames_per_batch=16,
                                total_frames=16, replay_buffer=rb) as c:
        assert list(c) == [None]
    data = rb[:]
    assert data.shape == (4, 4)  # 2 workers x 2 envs, 4 steps each
    assert (data["next", "observation"] - data["observation"] == 1).all()


def test_preemptive_threshold_takes_torchrls_range():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="preemptive_threshold"):
            MultiSyncDataCollector([CountingEnv] * 2, ones_action, frames_per_batch=8,
                                   preemptive_threshold=bad)
    with MultiSyncDataCollector([CountingEnv] * 2, ones_action, frames_per_batch=4000,
                                preemptive_threshold=0.0) as c:
        assert c.preemptive_threshold == 0.0 and c.interruptor is None
        ids = c.next()["collector", "traj_ids"]
        assert (ids[:, 0] >= 0).all()  # every worker keeps its first step at least...
        assert (ids >= 0).sum() < 4000  # ...and is cut short (TorchRL's threshold 0)


def per_agent_env():
    return NestedCountingEnv(nested_dim=5)  # a "data" group of 5 agents


@pytest.mark.parametrize("cls", [SyncDataCollector, MultiSyncDataCollector])
def test_nested_groups_keep_their_own_batch_dims(cls):
    policy = CloudpickleWrapper(per_agent_env().rand_action)
    envs = per_agent_env if cls is SyncDataCollector else [per_agent_env, per_agent_env]
    with cls(envs, policy, frames_per_batch=20, total_frames=20) as c:
        batch = c.next()
        fake = c.fake_tensordict()
    outer = tuple(batch.batch_size)  # [20] or [2, 10]
    assert batch["data"].batch_size == (*outer, 5)
    assert batch["next", "data"].batch_size == (*outer, 5)
    assert fake["data"].batch_size == (*outer, 5)


def test_a_batch_without_device_takes_its_buffer_storages_device():
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    from collectors.batch import on_storage_device

    td = TensorDict({"a": torch.zeros(2)}, [2])
    assert on_storage_device(td, ReplayBuffer(storage=LazyTensorStorage(8, device="cpu"))).device \
        == torch.device("cpu")
    assert on_storage_device(td, object()) is td  # no storage: as it is


def test_state_dict_reports_the_weights_the_trainer_has_now():
    policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
    with MultiSyncDataCollector([ContinuousActionVecMockEnv] * 2, policy, frames_per_batch=8) as c:
        with torch.no_grad():
            policy.module.bias.add_(1.0)  # an optimizer step, before any batch
        state = c.state_dict()  # sends them first, as TorchRL's shared weights show them
        for w in ("worker0", "worker1"):
            assert torch.equal(state[w]["policy_state_dict"]["module.bias"], policy.module.bias)


def grid_env():
    return CountingEnv(batch_size=(2, 3), max_steps=3)


def count_up(td):
    return td.set("action", torch.ones((*td.shape, 1), dtype=torch.int))


def test_an_env_with_two_batch_dims_gives_torchrls_batch():
    from torchrl.collectors import Collector as TorchRLCollector

    theirs = TorchRLCollector(grid_env, count_up, frames_per_batch=24, total_frames=24)
    expected = next(iter(theirs))
    theirs.shutdown()
    with SyncDataCollector(grid_env, count_up, frames_per_batch=24, total_frames=24) as c:
        fake = c.fake_tensordict()
        batch = c.next()
    assert batch.batch_size == expected.batch_size == fake.batch_size == (2, 3, 4)
    assert batch.names == [None, None, "time"]
    for key in ("observation", ("next", "observation"), ("next", "done"), "action"):
        assert torch.equal(batch[key], expected[key]), key
    ids = batch["collector", "traj_ids"]
    assert ids[..., 0].unique().numel() == 6  # one trajectory per env, until its done
    done = batch["next", "done"].squeeze(-1)
    assert ((ids[..., 1:] != ids[..., :-1]) == done[..., :-1]).all()  # a new id after each done


@pytest.mark.parametrize("cat_results, shape", [("stack", (2, 2, 3, 2)), (0, (4, 3, 2)),
                                                (-1, (2, 3, 4))])
def test_multi_collectors_keep_two_env_dims_as_torchrl_lays_them(cat_results, shape):
    with MultiSyncDataCollector([grid_env, grid_env], count_up, frames_per_batch=24,
                                total_frames=24, cat_results=cat_results) as c:
        batch = c.next()
    assert batch.batch_size == shape
    workers = batch["collector", "worker_id"]
    if cat_results == "stack":
        assert workers[0].eq(0).all() and workers[1].eq(1).all()
    elif cat_results == 0:  # each worker's [2, 3] envs, one after the other along dim 0
        assert workers[:2].eq(0).all() and workers[2:].eq(1).all()
    else:  # each worker's steps, one after the other along time
        assert workers[..., :2].eq(0).all() and workers[..., 2:].eq(1).all()
    assert batch["collector", "traj_ids"][..., 0].flatten().unique().numel() == batch[..., 0].numel()


def linear_policy():
    torch.manual_seed(0)
    return TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])


def test_state_dict_sees_weights_edited_through_data():
    policy = linear_policy()
    with MultiSyncDataCollector([ContinuousActionVecMockEnv] * 2, policy, frames_per_batch=10,
                                total_frames=-1) as c:
        for p in policy.parameters():
            p.data += 1.0  # no version bump: only the values say it changed
        state = c.state_dict()
        for w in (0, 1):
            sent = state[f"worker{w}"]["policy_state_dict"]
            for name, value in policy.state_dict().items():
                assert torch.equal(sent[name], value), (w, name)
        assert (c.next()["collector", "policy_version"] == 1).all()  # and the actors run them


def test_state_dict_keeps_weights_sent_to_one_worker():
    policy = linear_policy()
    other = {k: v + 5.0 for k, v in policy.state_dict().items()}
    with MultiSyncDataCollector([ContinuousActionVecMockEnv] * 2, policy, frames_per_batch=10,
                                total_frames=-1) as c:
        c.update_policy_weights_(other, worker_ids=[1])
        state = c.state_dict()
    assert torch.equal(state["worker1"]["policy_state_dict"]["module.weight"], other["module.weight"])
    assert torch.equal(state["worker0"]["policy_state_dict"]["module.weight"],
                       policy.state_dict()["module.weight"])


def test_a_started_parallel_env_instance_is_rebuilt_in_the_actor_and_left_open():
    from torchrl.envs import ParallelEnv

    env = ParallelEnv(2, functools.partial(CountingEnv, max_steps=3))
    env.set_seed(0)  # started: its worker processes run, it cannot be pickled
    try:
        with SyncDataCollector(env, count_up, frames_per_batch=12, total_frames=12) as c:
            batch = c.next()
        assert batch.batch_size == (2, 6)
        counts = batch["observation"].squeeze(-1)
        assert counts[0].tolist() == counts[1].tolist() == [0, 1, 2, 3, 0, 1]  # done at 3, reset
        assert not env.is_closed  # the instance stays the user's, as it was
    finally:
        env.close()


class RecordingFactory:
    """A policy factory that records, through ``multiprocessing.Manager`` proxies, where it ran."""

    def __init__(self, pids, lock):
        self.pids, self.lock = pids, lock

    def __call__(self):
        import os

        with self.lock:
            self.pids.append(os.getpid())
        return TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])


def test_manager_proxies_work_inside_the_env_actors():
    import multiprocessing
    import os

    manager = multiprocessing.Manager()
    try:
        pids = manager.list()
        factory = RecordingFactory(pids, manager.Lock())
        with MultiSyncDataCollector([ContinuousActionVecMockEnv] * 2, policy_factory=factory,
                                    frames_per_batch=10, total_frames=10) as c:
            c.next()
        # built in each env actor (and once here, as the reference for checks and weights)
        assert len(set(pids) - {os.getpid()}) == 2
    finally:
        manager.shutdown()


def random_actions_after(seed: int):
    from torchrl.envs.utils import RandomPolicy

    policy = RandomPolicy(ContinuousActionVecMockEnv().full_action_spec)
    with MultiSyncDataCollector([ContinuousActionVecMockEnv] * 2, policy, frames_per_batch=10,
                                total_frames=10) as c:
        torch.manual_seed(seed)  # after construction, as TorchRL's tests do
        return c.next()["action"]


def test_torch_manual_seed_in_the_trainer_makes_the_actors_random_actions_reproducible():
    first, again, other = random_actions_after(0), random_actions_after(0), random_actions_after(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # each worker has a stream of its own


def replacement_actions(seed: int):
    """Worker 0's actions in its first batch and in its replacement's first batch (after a
    kill), with ``torch.manual_seed(seed)`` in the trainer."""
    from torchrl.envs.utils import RandomPolicy

    from collectors.testing import kill_worker

    policy = RandomPolicy(ContinuousActionVecMockEnv().full_action_spec)
    with MultiSyncDataCollector([ContinuousActionVecMockEnv] * 2, policy, frames_per_batch=10,
                                total_frames=-1) as c:
        torch.manual_seed(seed)
        first = c.next()["action"][0]
        kill_worker(c, 0)  # (it may still answer a round before it is gone)
        for _ in range(100):
            again = c.next()["action"][0]
            if c.stats()["per_worker"][0]["restarts"]:  # the round that asked the replacement
                return first, again
        raise AssertionError("worker 0 was not replaced")


def test_a_replaced_actor_is_seeded_from_the_trainers_torch_rng_too():
    first, again = replacement_actions(0)
    first_2, again_2 = replacement_actions(0)
    assert torch.equal(first, first_2) and torch.equal(again, again_2)
    assert not torch.equal(first, again)  # a stream of its own, not its predecessor's
