"""The actor bodies without Ray: the rollout loop and the env worker, in this process."""
import numpy as np

from actors.stepping.env_worker import EnvWorker, WorkerPlan
from actors.options import CollectorOptions
from actors.stepping.rollout import Rollout
from collectors.testing import CountingEnv
from collectors.validate import build_spec


def test_rollout_loop_in_process():
    spec, kind = build_spec(CountingEnv, {"episode_length": 3}, None, 2)
    r = Rollout([lambda: CountingEnv(3)] * 2, None, kind, spec, 4, id_stride=5, id_offset=2)
    buf = r.collect()
    assert buf["observation"][:, :, 0].tolist() == [[0, 1, 2, 0]] * 2
    assert buf[("next", "observation")][:, :, 0].tolist() == [[1, 2, 3, 1]] * 2
    assert buf[("next", "done")][:, :, 0].tolist() == [[False, False, True, False]] * 2
    # one counter per worker, ids counter * stride + offset
    assert buf[("collector", "traj_ids")].tolist() == [[2, 2, 2, 12], [7, 7, 7, 17]]
    buf = r.collect()  # state carries over: episodes continue across batches
    assert buf["observation"][:, 0, 0].tolist() == [1, 1]
    assert buf[("collector", "traj_ids")][:, 0].tolist() == [12, 17]


def test_env_worker_in_process(monkeypatch):
    # an in-process worker sets RAY_COLLECTORS_WORKER_ID in this process: set it here first so
    # monkeypatch puts it back afterwards, or FaultyEnv in later tests would think the trainer
    # is worker 0
    monkeypatch.setenv("RAY_COLLECTORS_WORKER_ID", "0")
    monkeypatch.setenv("RAY_COLLECTORS_WORKER_RESTARTS", "0")
    spec, kind = build_spec("CartPole-v1", None, None, 1)
    plan = WorkerPlan(env_fns=("CartPole-v1",), policy=None, policy_kind=kind, spec=spec, steps=50,
                      options=CollectorOptions(frames_per_batch=50, seed=3))
    w = EnvWorker(plan, worker_index=0)
    batch, meta = w.collect()
    assert meta["frames"] == 50 and batch["observation"].shape == (1, 50, 4)
    assert np.isfinite(batch[("next", "reward")]).all()
    w.close()


def test_sequential_policy_runs_its_layers_directly_unless_hooked():
    import torch
    from torch import nn

    from actors.stepping.policy_runner import PolicyRunner, sequential_chain
    from collectors.policies import ArgmaxLayer

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
    policy = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), inner, nn.Linear(64, 2), ArgmaxLayer())
    x = torch.randn(5, 4)
    chain = sequential_chain(policy)
    assert chain is not None and torch.equal(chain(x), policy(x))
    runner = PolicyRunner(policy, "module", ("observation",), 5)
    runner.prepare()
    assert runner._forward is not policy  # the direct chain is used
    assert np.array_equal(runner({"observation": x.numpy()})["action"], policy(x).numpy())

    calls = []
    handle = inner[0].register_forward_hook(lambda m, i, o: calls.append(1))
    assert sequential_chain(policy) is None  # a hook anywhere: call the module as usual
    runner.prepare()
    runner({"observation": x.numpy()})
    assert calls == [1]
    handle.remove()

    class Custom(nn.Sequential):  # a Sequential with its own forward is called as written
        def forward(self, x):
            return super().forward(x) * 0

    custom = Custom(nn.Linear(4, 2))
    assert torch.equal(sequential_chain(custom)(x), torch.zeros(5, 2))
    assert sequential_chain(nn.Linear(4, 2)) is None


def test_a_reset_observation_of_the_wrong_shape_is_a_clear_error():
    """Observations are written into the batch row by row: a reset returning the wrong shape
    must raise, not broadcast into the row."""
    import pytest

    from actors.errors import EnvSpecError

    class ShortReset(CountingEnv):
        def reset(self, seed=None, options=None):
            obs, info = super().reset(seed=seed, options=options)
            return obs[:0], info  # shape (0,) where the space says (1,)

    spec, kind = build_spec(CountingEnv, {"episode_length": 3}, None, 1)
    with pytest.raises(EnvSpecError, match=r"'observation' with shape \(0,\).*shape \(1,\)"):
        Rollout([lambda: ShortReset(3)], None, kind, spec, 4).collect()
