"""TorchRL's introspection methods on ours: ``fake_tensordict`` (a zero batch laid out as the next
one, without stepping), ``get_distant_attr`` (on the collector, or per env actor) and ``map_fn``."""
import pytest
import torch
from torch import nn

from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, SyncDataCollector
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env


def layout(td):
    return {k: (tuple(v.shape), v.dtype) for k, v in td.items(True, True)}


def two_action_policy():
    return nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())


@pytest.mark.parametrize("cls, kwargs", [
    (SyncDataCollector, {}),
    (SyncDataCollector, {"num_envs": 2, "track_policy_version": True}),
    (MultiSyncDataCollector, {"num_workers": 2}),
    (MultiSyncDataCollector, {"num_workers": 2, "cat_results": -1}),
    (MultiaSyncDataCollector, {"num_workers": 2}),
])
def test_fake_tensordict_is_the_next_batch_zeroed_and_steps_nothing(cls, kwargs):
    with cls(counting_env, two_action_policy(), frames_per_batch=20, total_frames=40, **kwargs) as c:
        fake = c.fake_tensordict()
        assert c.stats()["frames"] == 0  # nothing collected for it
        batch = next(iter(c))
    assert layout(fake) == layout(batch)
    assert fake.names == batch.names
    if kwargs.get("track_policy_version"):
        assert "policy_version" in fake.keys()
    zeros = fake.exclude(("collector", "worker_id"))  # (which worker: known without stepping)
    assert all(not v.any() for v in zeros.values(True, True))
    # the envs were not stepped: each worker's first frame is its episode's first step
    first = batch["observation"].reshape(-1, *batch["observation"].shape[-1:])[0]
    assert first.item() == 0


def test_fake_tensordict_of_a_torchrl_env_has_the_policy_outputs():
    torchrl = pytest.importorskip("torchrl")
    from tensordict.nn import TensorDictModule
    from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv

    policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
    extra = TensorDictModule(lambda x: x.sum(-1, keepdim=True), in_keys=["action"],
                             out_keys=["action_sum"])
    from tensordict.nn import TensorDictSequential

    with SyncDataCollector(ContinuousActionVecMockEnv, TensorDictSequential(policy, extra),
                           frames_per_batch=10, total_frames=10) as c:
        fake = c.fake_tensordict()
        batch = next(iter(c))
    assert torchrl is not None
    assert "action_sum" in fake.keys()
    assert layout(fake) == layout(batch)


def test_get_distant_attr_on_the_collector_and_in_the_env_actors():
    with SyncDataCollector(counting_env, frames_per_batch=10) as c:
        assert c.get_distant_attr("frames_per_batch") == 10  # the collector's own
        assert c.get_distant_attr("env.episode_length") == 5  # in its env actor
        assert c.get_distant_attr("env.observation_space.shape") == (1,)
        with pytest.raises(AttributeError, match="nope"):
            c.get_distant_attr("env.nope")
        with pytest.raises(AttributeError):
            c.get_distant_attr("options.nope")  # the collector has options: no actor lookup
        with pytest.raises(ValueError, match="attribute path"):
            c.get_distant_attr("env.reset()")
    envs = [lambda: counting_env(3), lambda: counting_env(7)]
    with MultiSyncDataCollector(envs, frames_per_batch=20) as c:
        assert c.get_distant_attr("env.episode_length") == [3, 7]
        assert c.get_distant_attr("worker_idx") == [0, 1]
        assert c.get_distant_attr("frames_per_batch") == [10, 10]


def test_map_fn_calls_the_collector_or_each_worker():
    with SyncDataCollector(counting_env, frames_per_batch=10) as c:
        assert c.map_fn("set_seed", list_of_args=[(1,), (2,)]) == [1, 2]
        assert c.map_fn("get_distant_attr", list_of_kwargs=[{"attr": "frames_per_batch"}]) == [10]
        with pytest.raises(ValueError, match="same length"):
            c.map_fn("set_seed", list_of_args=[(1,)], list_of_kwargs=[{}, {}])
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with MultiSyncDataCollector([counting_env] * 2, policy, frames_per_batch=20) as c:
        weights = []
        for w in (1.0, 2.0):
            sd = {k: torch.full_like(v, w) for k, v in policy.state_dict().items()}
            weights.append((sd,))
        assert c.map_fn("update_policy_weights_", list_of_args=weights) == [None, None]
        next(iter(c))  # each worker takes its weights before this batch
        got = c.get_distant_attr("policy[0].weight")
        assert [float(g.detach().flatten()[0]) for g in got] == [1.0, 2.0]
        with pytest.raises(ValueError, match="one entry per worker: Expected 2 argument entries"):
            c.map_fn("update_policy_weights_", list_of_args=weights[:1])
        assert c.map_fn("get_distant_attr", list_of_args=[("worker_idx",)] * 2) == [0, 1]
        assert c.map_fn("get_distant_attr", list_of_kwargs=[{"attr": "worker_idx"}] * 2) == [0, 1]
        with pytest.raises(NotImplementedError, match="update_policy_weights_, reset"):
            c.map_fn("set_seed", list_of_args=[(1,), (2,)])
