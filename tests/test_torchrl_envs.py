"""TorchRL envs (with transforms) as create_env_fn: batches equal TorchRL's Collector's, key by
key and value by value; the policy sees TorchRL's keys (is_init, step_count, recurrent state)."""
import pytest
import torch
from torch import nn

torchrl = pytest.importorskip("torchrl", reason="install the torchrl extra")

from tensordict.nn import TensorDictModule, TensorDictSequential  # noqa: E402
from torchrl.collectors import Collector as TorchRLCollector  # noqa: E402
from torchrl.envs import (Compose, EnvCreator, GymEnv, InitTracker, RewardSum, SerialEnv,  # noqa: E402
                          StepCounter, TransformedEnv)
from torchrl.modules import LSTMModule  # noqa: E402

from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, SyncDataCollector  # noqa: E402

OURS_ONLY = {("collector", "policy_version"), ("collector", "worker_id")}


def cartpole():
    env = TransformedEnv(GymEnv("CartPole-v1"), Compose(RewardSum(), StepCounter(), InitTracker()))
    env.set_seed(0)
    return env


def pendulum():
    env = TransformedEnv(GymEnv("Pendulum-v1"), Compose(RewardSum(), StepCounter()))
    env.set_seed(0)
    return env


def serial_cartpole():
    return SerialEnv(2, cartpole)


class OneHotArgmax(nn.Module):
    def __init__(self, n_in=4, n_out=2):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(n_in, n_out)

    def forward(self, x):
        return nn.functional.one_hot(self.net(x).argmax(-1), self.net.out_features)


class Tanh2(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)

    def forward(self, x):
        return 2 * torch.tanh(self.net(x))


def cartpole_policy():
    return TensorDictModule(OneHotArgmax(), in_keys=["observation"], out_keys=["action"])


def torchrl_batches(env_fn, policy, frames_per_batch, n=2):
    c = TorchRLCollector(env_fn, policy, frames_per_batch=frames_per_batch,
                         total_frames=n * frames_per_batch)
    try:
        return list(c)
    finally:
        c.shutdown()


def assert_same(ours, ref, skip=()):
    keys = set(ours.keys(True, True)) - OURS_ONLY
    assert keys == set(ref.keys(True, True))
    for key in keys - set(skip):
        a, b = ours.get(key), ref.get(key)
        assert a.shape == b.shape and a.dtype == b.dtype, key
        assert torch.equal(a, b) if a.dtype != torch.float32 else torch.allclose(a, b), key
    assert ours.names == ref.names


@pytest.mark.parametrize("env_fn, policy_fn, fpb", [
    (cartpole, cartpole_policy, 60),
    (pendulum, lambda: TensorDictModule(Tanh2(), in_keys=["observation"], out_keys=["action"]), 40)])
def test_one_worker_equals_torchrl_collector(env_fn, policy_fn, fpb):
    ref = torchrl_batches(env_fn, policy_fn(), fpb)
    with SyncDataCollector(env_fn, policy_fn(), frames_per_batch=fpb, total_frames=2 * fpb) as c:
        ours = list(c)
    for a, b in zip(ours, ref):
        assert_same(a, b)
    assert "episode_reward" in ours[0].keys() and ("next", "step_count") in ours[0].keys(True)


def test_num_envs_equals_torchrl_over_a_serial_env():
    ref = torchrl_batches(serial_cartpole, cartpole_policy(), 60)
    with SyncDataCollector(cartpole, cartpole_policy(), num_envs=2, frames_per_batch=60,
                           total_frames=120) as c:
        ours = list(c)
    assert ours[0].batch_size == (2, 30) and ours[0].names == [None, "time"]
    for a, b in zip(ours, ref):
        assert_same(a, b)


@pytest.mark.parametrize("cls", [MultiSyncDataCollector, MultiaSyncDataCollector])
def test_multi_collectors_take_torchrl_envs(cls):
    ref = torchrl_batches(cartpole, cartpole_policy(), 30, n=1)[0]
    with cls(EnvCreator(cartpole), cartpole_policy(), num_workers=2, frames_per_batch=60,
             total_frames=120) as c:
        b = c.next()
        stats = c.stats()
    rows = [b[i] for i in range(2)] if cls is MultiSyncDataCollector else [b[:30]]
    for row in rows:  # each worker is seeded alike: its frames equal TorchRL's, ids aside
        assert_same(row, ref, skip=[("collector", "traj_ids")])
    assert stats["frames"] >= 60 and stats["episodes"] >= 0


def test_env_instance_and_random_policy():
    env = cartpole()
    with SyncDataCollector(env, frames_per_batch=20, total_frames=40) as c:
        b = c.next()
    assert b["action"].shape == (20, 2) and b["action"].sum(-1).eq(1).all()  # one-hot, as the spec


class RecurrentPolicy(TensorDictSequential):
    def __init__(self):
        torch.manual_seed(0)
        lstm = LSTMModule(input_size=4, hidden_size=8, in_keys=["observation", "rs_h", "rs_c"],
                          out_keys=["features", ("next", "rs_h"), ("next", "rs_c")])
        head = TensorDictModule(OneHotArgmax(8, 2), in_keys=["features"], out_keys=["action"])
        super().__init__(lstm, head)
        self.lstm = lstm


def recurrent_env():
    env = TransformedEnv(GymEnv("CartPole-v1"), Compose(InitTracker(), StepCounter()))
    env.append_transform(RecurrentPolicy().lstm.make_tensordict_primer())
    env.set_seed(0)
    return env


def test_lstm_policy_collects_as_under_torchrl():
    ref = torchrl_batches(recurrent_env, RecurrentPolicy(), 50)
    with SyncDataCollector(recurrent_env, RecurrentPolicy(), frames_per_batch=50,
                           total_frames=100) as c:
        ours = list(c)
    for a, b in zip(ours, ref):
        assert_same(a, b)
    assert ("next", "rs_h") in ours[0].keys(True) and ours[0]["is_init"].any()


def bare_cartpole():
    env = GymEnv("CartPole-v1")
    env.set_seed(0)
    return env


def test_auto_register_policy_transforms_adds_what_the_policy_needs():
    c = TorchRLCollector(bare_cartpole, RecurrentPolicy(), frames_per_batch=50, total_frames=100,
                         auto_register_policy_transforms=True)
    ref = list(c)
    c.shutdown()
    with SyncDataCollector(bare_cartpole, RecurrentPolicy(), frames_per_batch=50,
                           total_frames=100, auto_register_policy_transforms=True) as c:
        ours = list(c)
    for a, b in zip(ours, ref):
        assert_same(a, b)
    assert ours[0]["is_init"][0] and ("next", "rs_h") in ours[0].keys(True)
    with pytest.raises(KeyError):  # without them the policy finds no is_init, as on TorchRL
        SyncDataCollector(bare_cartpole, RecurrentPolicy(), frames_per_batch=50)
    with pytest.raises(ValueError, match="gymnasium env"):
        SyncDataCollector("CartPole-v1", frames_per_batch=50, auto_register_policy_transforms=True)


def faulty_torchrl_env():
    from torchrl.envs import GymWrapper

    from collectors.testing import faulty_counting_env

    return GymWrapper(faulty_counting_env("raise_step", at_step=5, episode_length=1000))


def test_a_failing_torchrl_env_is_rebuilt_and_counted():
    with SyncDataCollector(faulty_torchrl_env, frames_per_batch=20, total_frames=60) as c:
        batches = list(c)
        stats = c.stats()
    assert sum(b.numel() for b in batches) == 60
    assert stats["env_errors"] >= 1 and "injected fault" in stats["env_error_log"][0]["error"]
    first = batches[0]
    cut = first["next", "truncated"].squeeze(-1).nonzero().flatten().tolist()
    assert cut == [3]  # the episode is cut at the last good step (the 5th step raised)
    assert first["observation"][:5, 0].tolist() == [0, 1, 2, 3, 0]  # then a fresh episode
    assert first["collector", "traj_ids"][4] > first["collector", "traj_ids"][3]


def test_importing_collectors_does_not_import_torchrl():
    import subprocess
    import sys

    code = ("import sys, collectors, collectors.base, collectors.replay_buffer\n"
            "from collectors import SyncDataCollector, MultiSyncDataCollector\n"
            "assert 'torchrl' not in sys.modules, 'torchrl imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def q_actor():
    from torchrl.modules import MLP, QValueActor

    env = cartpole()
    mlp = MLP(in_features=4, out_features=env.action_spec.shape[-1], num_cells=[16])
    return QValueActor(mlp, spec=env.action_spec, in_keys=["observation"])


@pytest.mark.parametrize("cls", [SyncDataCollector, MultiSyncDataCollector])
def test_batches_keep_the_policy_outputs_while_actions_are_random(cls):
    """As TorchRL: during init_random_frames the policy's other outputs (a QValueActor's
    action_value and chosen_action_value) are there, zero-filled, so a lazily built storage
    sees one key set from the first batch on."""
    kwargs = {"num_workers": 2} if cls is MultiSyncDataCollector else {}
    with cls(cartpole, q_actor(), frames_per_batch=10, total_frames=40, init_random_frames=20,
             **kwargs) as c:
        batches = list(c)
    keys = [set(b.keys(True, True)) for b in batches]
    assert all(k == keys[-1] for k in keys), keys
    assert {"action_value", "chosen_action_value"} <= keys[0]
    assert (batches[0]["action_value"] == 0).all() and (batches[0]["chosen_action_value"] == 0).all()
    assert (batches[-1]["action_value"] != 0).any()
    assert batches[0]["action_value"].dtype == batches[-1]["action_value"].dtype


@pytest.mark.parametrize("cls", [SyncDataCollector, MultiSyncDataCollector])
def test_a_heterogeneous_env_gives_lazy_stacks_that_count_as_torchrls(cls):
    from tensordict import LazyStackedTensorDict
    from torchrl.testing.mocking_classes import (HeterogeneousCountingEnv,
                                                 HeterogeneousCountingEnvPolicy)

    def make():
        return HeterogeneousCountingEnv(max_steps=3, batch_size=(2,))  # agents' shapes differ

    policy = HeterogeneousCountingEnvPolicy(make().input_spec["full_action_spec"])  # counts
    kwargs = {"num_workers": 2, "cat_results": "stack"} if cls is MultiSyncDataCollector else {}
    with cls(make, policy, frames_per_batch=16 * (2 if kwargs else 1), total_frames=-1,
             **kwargs) as c:
        batch = c.next()
    rows = batch if cls is SyncDataCollector else batch[1]  # worker 1's [2 envs, 8 steps]
    assert rows.batch_size == (2, 8) and batch.names[-1] == "time"
    assert isinstance(rows["lazy"], LazyStackedTensorDict)
    for agent in range(3):
        obs = rows["lazy"][..., agent][f"tensor_{agent}"]
        for _ in range(agent + 1):  # each agent's entry has agent + 1 feature dims
            obs = obs.mean(-1)
        assert obs.tolist() == [[0.0, 1.0, 2.0, 3.0] * 2] * 2  # done at 3, then reset
    ids = rows["collector", "traj_ids"]
    assert ids[:, :4].unique().numel() == 2 and (ids[:, 4:] != ids[:, :4]).all()


@pytest.mark.parametrize("cls", [SyncDataCollector, MultiSyncDataCollector])
def test_an_env_whose_shapes_change_each_step_gives_a_lazy_stack_along_time(cls):
    from tensordict import LazyStackedTensorDict
    from torchrl.envs.utils import RandomPolicy
    from torchrl.testing.mocking_classes import EnvWithDynamicSpec

    policy = RandomPolicy(EnvWithDynamicSpec().full_action_spec)
    kwargs = {"num_workers": 2} if cls is MultiSyncDataCollector else {}
    with cls(EnvWithDynamicSpec, policy, frames_per_batch=20, total_frames=-1, **kwargs) as c:
        batch = c.next()
    assert isinstance(batch, LazyStackedTensorDict) and batch.names[-1] == "time"
    steps = (batch if cls is SyncDataCollector else batch[0]).unbind(-1)
    assert len(steps) == 20 // (1 if cls is SyncDataCollector else 2)
    for t, step in enumerate(steps):  # observation (3, count + 1, 2) full of count, no padding
        count = t % 5  # done when it reaches 5, then reset to 0
        assert step["observation"].shape == (3, count + 1, 2)
        assert (step["observation"] == count).all()


def test_options_a_ragged_batch_cannot_serve_are_refused_by_name():
    from torchrl.envs.utils import RandomPolicy
    from torchrl.testing.mocking_classes import EnvWithDynamicSpec

    policy = RandomPolicy(EnvWithDynamicSpec().full_action_spec)
    with pytest.raises(NotImplementedError, match=r"EnvWithDynamicSpec has entries whose shape "
                                                  r"varies.*split_trajs cannot take"):
        SyncDataCollector(EnvWithDynamicSpec, policy, frames_per_batch=20, split_trajs=True)
