"""The native vector loop: gymnasium ids with a vector_entry_point (CartPole) step as one vector
env. A finished env skips its autoreset step, so envs drift apart; batches must still hold
exactly T consecutive frames per env, continuing across batches."""
import numpy as np
import pytest
import torch

from actors.options import CollectorOptions
from actors.stepping.vector_rollout import VectorRollout, native_vector_problem
from collectors import MultiSyncDataCollector, SyncDataCollector

SPEC = {"obs": {"observation": ((1,), "float32")}, "obs_is_dict": False,
        "outputs": {"action": ((), "int64")}}
ENV = "collectors.testing:CountingVecEnv-v0"  # env i: episodes of 5 + i steps, NEXT_STEP autoreset


def check_rows(obs, nxt, reward, term, traj, lengths):
    """Per env (rows concatenated over batches): the count runs 0..L-1 with no frame lost or
    repeated, next = obs + 1, reward 1, terminated exactly at L, one id per episode."""
    seen = set()
    for i, length in enumerate(lengths):
        o = obs[i]
        start = int(o[0])
        want = (start + np.arange(len(o))) % length
        assert np.array_equal(o, want), (i, o[:20], want[:20])
        assert np.array_equal(nxt[i], o + 1)
        assert (reward[i] == 1).all()
        assert np.array_equal(term[i], nxt[i] == length)
        episode = np.cumsum(np.r_[0, term[i][:-1]])  # episode index of each frame
        ids = traj[i]
        for e in np.unique(episode):
            assert len(set(ids[episode == e])) == 1
        per_episode = [ids[episode == e][0] for e in np.unique(episode)]
        assert len(set(per_episode)) == len(per_episode) and per_episode == sorted(per_episode)
        assert not seen & set(per_episode)
        seen |= set(per_episode)


def test_frames_are_exact_and_continue_across_batches():
    r = VectorRollout(ENV, None, None, "random", SPEC, 7,
                      CollectorOptions(frames_per_batch=28, num_envs=4, seed=0), id_stride=3,
                      id_offset=2)
    parts = {k: [] for k in ("obs", "next", "reward", "term", "traj")}
    returns = []
    for _ in range(12):
        b = r.collect()
        assert r.last_valid_steps == 7
        parts["obs"].append(b["observation"][..., 0].copy())
        parts["next"].append(b["next", "observation"][..., 0].copy())
        parts["reward"].append(b["next", "reward"][..., 0].copy())
        parts["term"].append(b["next", "terminated"][..., 0].copy())
        parts["traj"].append(b["collector", "traj_ids"].copy())
        assert np.array_equal(b["next", "done"], b["next", "terminated"] | b["next", "truncated"])
        returns += r.episode_returns
        r.episode_returns = []
    rows = {k: np.concatenate(v, axis=1) for k, v in parts.items()}
    check_rows(rows["obs"], rows["next"], rows["reward"], rows["term"], rows["traj"], [5, 6, 7, 8])
    assert (rows["traj"] % 3 == 2).all()
    assert sorted(set(returns)) == [5.0, 6.0, 7.0, 8.0]
    assert len(returns) == int(rows["term"].sum())  # every finished episode, once
    assert r._carry is not None  # the envs drifted: some frames wait for the next batch
    r.close()


def test_envs_that_drift_apart_are_resynchronised_within_a_batch():
    """Episodes of 1, 2, 3 and 4 steps: env 0 skips every other step, so the others run ahead.
    Their extra frames never exceed about a batch: past that, episodes are truncated at the last
    delivered frame and all envs restart together; every frame is still a real transition."""
    r = VectorRollout(ENV, {"episode_length": 1}, None, "random", SPEC, 10,
                      CollectorOptions(frames_per_batch=40, num_envs=4))
    for _ in range(30):
        b = r.collect()
        assert r.last_valid_steps == 10
        obs, nxt = b["observation"][..., 0], b["next", "observation"][..., 0]
        assert np.array_equal(nxt, obs + 1)  # never an autoreset step
        assert ((obs >= 0) & (obs < np.arange(1, 5)[:, None])).all()
        done = b["next", "done"][..., 0]
        assert np.array_equal(b["next", "terminated"][..., 0], nxt == np.arange(1, 5)[:, None])
        ids = b["collector", "traj_ids"]
        assert (ids[:, 1:] == ids[:, :-1])[~done[:, :-1]].all()  # one id inside an episode
        assert (ids[:, 1:] != ids[:, :-1])[done[:, :-1]].all()  # a new one after each end
        if r._carry is not None:
            assert int(r._carry["live"].sum(0).max()) <= 10
    assert r.resyncs > 0
    r.close()


def test_preempted_batch_keeps_the_rest_for_the_next():
    r = VectorRollout(ENV, None, None, "random", SPEC, 6,
                      CollectorOptions(frames_per_batch=12, num_envs=2))
    first = {k: v.copy() for k, v in r.collect().items()}
    r.stop_requested = True
    cut = r.collect()
    assert r.last_valid_steps <= 6 and (cut["collector", "traj_ids"][:, r.last_valid_steps:] == -1).all()
    valid = r.last_valid_steps
    cut = {k: v[:, :valid].copy() for k, v in cut.items()}
    r.stop_requested = False
    after = r.collect()
    obs = np.concatenate([first["observation"], cut["observation"], after["observation"]], axis=1)[..., 0]
    for i, length in enumerate((5, 6)):
        assert np.array_equal(obs[i], np.arange(obs.shape[1]) % length)
    r.close()


def test_collectors_use_the_native_vector_env_where_it_exists():
    opts = CollectorOptions(frames_per_batch=10, num_envs=4)
    assert native_vector_problem("CartPole-v1", opts) is None
    assert "vector_entry_point" in native_vector_problem("Pendulum-v1", opts)
    assert "num_envs" in native_vector_problem("CartPole-v1", CollectorOptions(frames_per_batch=10))
    assert "max_frames_per_traj" in native_vector_problem(
        "CartPole-v1", CollectorOptions(frames_per_batch=10, num_envs=2, max_frames_per_traj=9))
    with MultiSyncDataCollector(ENV, num_workers=2, num_envs=3, frames_per_batch=60,
                                total_frames=600, native_vector=True, name="native") as c:
        assert c.options.native_vector is True
        batches = [b for b in c]
    data = torch.cat(batches, dim=-1)  # [workers, envs, T]
    for w in range(2):
        check_rows(data["observation"][w, ..., 0].numpy(), data["next", "observation"][w, ..., 0].numpy(),
                   data["next", "reward"][w, ..., 0].numpy(), data["next", "terminated"][w, ..., 0].numpy(),
                   data["collector", "traj_ids"][w].numpy(), [5, 6, 7])
    ids = data["collector", "traj_ids"]
    assert not set(ids[0].unique().tolist()) & set(ids[1].unique().tolist())
    with SyncDataCollector("CartPole-v1", frames_per_batch=64, num_envs=16, total_frames=640,
                           seed=3) as c:
        assert c.options.native_vector is True  # picked from 16 envs on
        first = c.next()
        c.set_seed(3)
        again = c.next()
        assert torch.equal(first["observation"], again["observation"])  # seeded: reproducible
        c.set_seed(3, static_seed=True)  # hands over to the per-env loop: same seed everywhere
        first = c.next()["observation"][:, 0]
        assert all(torch.equal(first[0], first[k]) for k in range(1, 16))
    with pytest.raises(ValueError, match="native_vector=True"):
        SyncDataCollector("Pendulum-v1", frames_per_batch=8, num_envs=2, native_vector=True)
    with SyncDataCollector("CartPole-v1", frames_per_batch=8, num_envs=2, native_vector=False) as c:
        assert c.options.native_vector is False and c.next().batch_size == (2, 4)
    with SyncDataCollector("CartPole-v1", frames_per_batch=8, num_envs=2) as c:
        assert c.options.native_vector is False  # below 16 envs, one env object per env
    with SyncDataCollector("CartPole-v1", frames_per_batch=32, num_envs=16, max_frames_per_traj=9) as c:
        assert c.options.native_vector is False  # an option that needs per-env envs
