"""The actor bodies without Ray: the rollout loop and the env worker, in this process."""
import numpy as np

from actors.env_worker import EnvWorker
from actors.rollout import Rollout
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


def test_env_worker_in_process():
    spec, kind = build_spec("CartPole-v1", None, None, 1)
    w = EnvWorker({"create_env_fn": "CartPole-v1", "num_envs": 1, "policy": None,
                   "policy_kind": kind, "spec": spec, "steps": 50, "seed": 3, "worker_index": 0})
    batch, meta = w.collect()
    assert meta["frames"] == 50 and batch["observation"].shape == (1, 50, 4)
    assert np.isfinite(batch[("next", "reward")]).all()
    w.close()
