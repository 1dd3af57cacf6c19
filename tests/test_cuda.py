"""A policy on a GPU, as TorchRL users pass it: where it runs (its own device unless
``policy_device`` says otherwise), what the env actors receive (a CPU copy they move), how
several workers share one GPU, and where batches go (``storing_device``, the replay buffer).
Every batch must equal the one a CPU policy with the same weights collects.

Skipped without CUDA: the CI machine has none. Run on a GPU machine with
``pytest tests/test_cuda.py``."""
import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn

from collectors import (MultiaSyncDataCollector, MultiSyncDataCollector, RayReplayBuffer,
                        SyncDataCollector)
from collectors.testing import counting_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Threshold(nn.Module):
    """Action 1 once the count passes 2.5 (logits ``[2.5, t]``); also says where it ran."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 2)
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.net.bias.copy_(torch.tensor([2.5, 0.0]))

    def forward(self, obs):
        action = self.net(obs).argmax(-1)
        return action, torch.full_like(action, obs.is_cuda, dtype=torch.bool)


def probe():
    return TensorDictModule(Threshold(), in_keys=["observation"], out_keys=["action", "on_gpu"])


def expected_actions(batch):
    return (batch["observation"][..., 0] > 2.5).to(torch.int64)


def test_a_gpu_policy_runs_on_its_own_device_by_default_and_stays_there():
    policy = probe().cuda()
    with SyncDataCollector(counting_env, policy, frames_per_batch=20) as c:
        assert c.options.policy_device == "cuda:0"
        b = c.next()
    assert b["on_gpu"].all() and b["action"].device.type == "cpu"
    assert torch.equal(b["action"], expected_actions(b))
    assert all(p.is_cuda for p in policy.parameters())  # the trainer's policy was not moved
    with SyncDataCollector(counting_env, probe(), frames_per_batch=20) as c:
        cpu = c.next()
    assert not cpu["on_gpu"].any()
    assert (b.exclude("on_gpu") == cpu.exclude("on_gpu")).all()


def test_a_plain_module_on_the_gpu():
    net = nn.Sequential(nn.Linear(1, 2))
    net[0].load_state_dict(Threshold().net.state_dict())

    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(-1)

    policy = nn.Sequential(net, Argmax()).cuda()
    with SyncDataCollector(counting_env, policy, frames_per_batch=20, num_envs=2) as c:
        b = c.next()
    assert torch.equal(b["action"], expected_actions(b))


def test_policy_device_cpu_runs_a_cpu_copy_that_takes_the_trainers_gpu_weights():
    policy = probe().cuda()
    with SyncDataCollector(counting_env, policy, frames_per_batch=20, policy_device="cpu") as c:
        b = c.next()
        assert not b["on_gpu"].any() and torch.equal(b["action"], expected_actions(b))
        with torch.no_grad():  # a "training step" on the GPU: now every action is 1
            policy.module.net.bias.copy_(torch.tensor([-1.0, 0.0], device="cuda"))
        c.update_policy_weights_()
        b = c.next()
    assert (b["action"] == 1).all() and (b["collector", "policy_version"] == 1).all()


def test_policy_device_cuda_moves_a_cpu_policy_to_the_gpu_and_weights_follow():
    policy = probe()
    with SyncDataCollector(counting_env, policy, frames_per_batch=20, device="cuda") as c:
        b = c.next()
        assert b["on_gpu"].all() and b["action"].is_cuda  # device= is storing_device too
        with torch.no_grad():
            policy.module.net.bias.copy_(torch.tensor([-1.0, 0.0]))
        c.update_policy_weights_()
        b = c.next()
    assert (b["action"] == 1).all()


def test_more_workers_than_gpus_share_them():
    workers = torch.cuda.device_count() + 1  # one GPU each would not fit
    policy = probe().cuda()
    with MultiSyncDataCollector([counting_env] * workers, policy, frames_per_batch=10 * workers,
                                total_frames=40 * workers) as c:
        batches = list(c)
    assert len(batches) == 4 and all(b["on_gpu"].all() for b in batches)
    with MultiSyncDataCollector([counting_env] * workers, probe(), frames_per_batch=10 * workers,
                                total_frames=40 * workers) as c:
        on_cpu = list(c)
    for gpu, cpu in zip(batches, on_cpu):
        assert (gpu.exclude("on_gpu") == cpu.exclude("on_gpu")).all()


def test_async_workers_with_a_gpu_policy():
    policy = probe().cuda()
    with MultiaSyncDataCollector([counting_env] * 2, policy, frames_per_batch=10,
                                 total_frames=60) as c:
        frames = 0
        for b in c:
            assert b["on_gpu"].all() and torch.equal(b["action"], expected_actions(b))
            frames += b.numel()
    assert frames == 60


def test_gpu_batches_go_into_the_replay_buffer():
    rb = RayReplayBuffer(capacity=100)
    try:
        with SyncDataCollector(counting_env, probe(), frames_per_batch=20,
                               storing_device="cuda") as c:
            b = c.next()
        assert b["observation"].is_cuda
        assert rb.extend(b) == 20
        s = rb.sample(50)
        assert s["observation"].device.type == "cpu"
        assert torch.equal(s["action"], expected_actions(s))
        assert set(s["observation"][..., 0].tolist()) <= set(b["observation"][..., 0].tolist())
    finally:
        rb.shutdown()


def test_a_torchrl_env_with_a_gpu_policy():
    pytest.importorskip("torchrl")
    from torchrl.envs import GymEnv

    def cartpole():
        env = GymEnv("CartPole-v1")
        env.set_seed(0)
        return env

    class OneHotArgmax(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(4, 2)

        def forward(self, x):
            return nn.functional.one_hot(self.net(x).argmax(-1), 2)

    def policy():
        return TensorDictModule(OneHotArgmax(), in_keys=["observation"], out_keys=["action"])

    with SyncDataCollector(cartpole, policy().cuda(), frames_per_batch=30) as c:
        gpu = c.next()
    with SyncDataCollector(cartpole, policy(), frames_per_batch=30) as c:
        cpu = c.next()
    assert gpu["action"].device.type == "cpu"
    assert (gpu == cpu).all()
