"""Our batches in TorchRL's GAE, ClipPPOLoss and ReplayBuffer, unchanged; TorchRL-style
policies in our collectors; equality with TorchRL's own Collector on the counting env.

Needs the bench extra (TorchRL); scripts/test.sh installs it."""
import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn

torchrl = pytest.importorskip("torchrl", reason="install the bench extra: pip install -e .[bench]")

from torchrl.collectors import Collector as TorchRLCollector  # noqa: E402
from torchrl.data import LazyTensorStorage, ReplayBuffer  # noqa: E402
from torchrl.envs import GymWrapper  # noqa: E402
from torchrl.modules import ProbabilisticActor, ValueOperator  # noqa: E402
from torchrl.objectives import ClipPPOLoss  # noqa: E402
from torchrl.objectives.value import GAE  # noqa: E402

from collectors import MultiSyncDataCollector, SyncDataCollector  # noqa: E402
from collectors.testing import CountingEnv, counting_env  # noqa: E402


class Parity(nn.Module):
    def forward(self, obs):
        return (obs[..., 0].long() % 2)


def value_net():
    torch.manual_seed(0)
    return ValueOperator(nn.Linear(1, 1), in_keys=["observation"])


def test_same_batch_as_torchrl_collector_and_same_gae():
    policy = TensorDictModule(Parity(), in_keys=["observation"], out_keys=["action"])
    env = lambda: GymWrapper(CountingEnv(5), categorical_action_encoding=True)  # noqa: E731
    theirs = TorchRLCollector(env, policy, frames_per_batch=23, total_frames=23)
    ref = next(iter(theirs))
    theirs.shutdown()
    with SyncDataCollector(counting_env, policy, frames_per_batch=23) as c:
        ours = c.next()
    ours_keys = set(ours.keys(True, True)) - {("collector", "policy_version")}
    assert ours_keys == set(ref.keys(True, True))
    for key in ours_keys:
        a, b = ours.get(key), ref.get(key)
        assert a.shape == b.shape and a.dtype == b.dtype, key
        assert torch.equal(a, b), key
    assert ours.names == ref.names
    gae = GAE(gamma=0.9, lmbda=0.8, value_network=value_net())
    assert torch.allclose(gae(ours.clone())["advantage"], gae(ref.clone())["advantage"])


@pytest.mark.parametrize("multi", [False, True])
def test_batches_feed_gae_ppo_loss_and_replay_buffer_without_renaming(multi):
    kwargs = dict(frames_per_batch=40, total_frames=80)
    # a TorchRL ProbabilisticActor runs unchanged: its logits and log-prob are in the batch
    actor = ProbabilisticActor(
        TensorDictModule(nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)),
                         in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], distribution_class=torch.distributions.Categorical, return_log_prob=True)
    critic = ValueOperator(nn.Linear(4, 1), in_keys=["observation"])
    cls = MultiSyncDataCollector if multi else SyncDataCollector
    extra = {"num_workers": 2} if multi else {"num_envs": 2}
    with cls("CartPole-v1", actor, **kwargs, **extra) as c:
        batch = c.next()
    assert "logits" in batch.keys() and batch["logits"].shape[-1] == 2
    log_prob_keys = [k for k in batch.keys() if "log_prob" in k]
    assert log_prob_keys
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic)
    batch = gae(batch)
    assert batch["advantage"].shape == batch["next", "reward"].shape
    loss = ClipPPOLoss(actor, critic)
    out = loss(batch.reshape(-1))
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    assert torch.isfinite(total)
    total.backward()
    rb = ReplayBuffer(storage=LazyTensorStorage(1000), batch_size=16)
    rb.extend(batch.reshape(-1))
    assert len(rb) == 40 and rb.sample().batch_size == torch.Size([16])


def test_torchrl_replay_buffer_as_collector_buffer():
    rb = ReplayBuffer(storage=LazyTensorStorage(1000))
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=30, replay_buffer=rb) as c:
        assert list(c) == [None] * 3
    assert len(rb) == 30 and rb.write_count == 30
