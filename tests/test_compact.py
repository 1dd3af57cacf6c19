"""compact_obs: each observation stored once, ("next", obs) rebuilt at sample time from the
following slot, episode-final observations kept apart. Samples must equal the plain storage's."""
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from actors.storage.compact_storage import CompactNext
from actors.storage.replay_buffer import ReplayBufferActor
from collectors import MultiSyncDataCollector, RayReplayBuffer, SyncDataCollector
from collectors.testing import counting_env


def collected_batches(total: int = 600):
    """Counting-env batches from 2 workers x 2 envs, 6 steps each: episodes of 5 end
    mid-batch, and each env's rows stop mid-episode at every batch (and worker) boundary."""
    with MultiSyncDataCollector(counting_env, num_workers=2, num_envs=2, frames_per_batch=24,
                                total_frames=total, name="compact-src") as c:
        return [b.reshape(-1) for b in c]


@pytest.mark.parametrize("sampler,kwargs", [("random", {}), ("slice", {"slice_len": 4}),
                                            ("prioritized", {"alpha": 0.6, "beta": 0.4, "eps": 1e-8})])
def test_samples_equal_the_plain_storage(sampler, kwargs):
    batches = collected_batches()
    plain = ReplayBufferActor(101, sampler=sampler, sampler_kwargs=kwargs, seed=3)
    compact = ReplayBufferActor(101, sampler=sampler, sampler_kwargs=kwargs, seed=3, compact_obs=True)
    checked = 0
    for batch in batches:  # 101 slots: writes wrap around the ring at varying offsets
        plain.extend(batch)
        compact.extend(batch)
        for _ in range(3):
            a, b = plain.sample(16), compact.sample(16)
            assert (a["index"] == b["index"]).all()
            assert set(a.keys(True, True)) == set(b.keys(True, True))
            assert (a == b).all()
            checked += 16
    assert ("next", "observation") not in compact.storage.keys(True, True)
    ends = plain.storage["next", "done"].squeeze(-1)
    assert ends.any()  # episode ends were stored, and sampled as they were
    assert checked == 16 * 3 * len(batches)


def test_episode_final_observations_are_kept_apart_not_lost():
    """A terminal next observation that no following slot holds (here: 99, never an obs)."""
    obs = torch.tensor([[0.], [1.], [2.], [0.], [1.]])
    nxt = torch.tensor([[1.], [2.], [99.], [1.], [2.]])
    td = TensorDict({"observation": obs, ("next", "observation"): nxt,
                     ("next", "done"): torch.tensor([[False], [False], [True], [False], [False]])}, [5])
    rb = ReplayBufferActor(8, seed=0, compact_obs=True)
    rb.extend(td)
    index = torch.arange(5)
    out = rb.compact.rebuild(rb.storage[index].clone(), index, rb.storage)
    assert out["next", "observation"].ravel().tolist() == [1., 2., 99., 1., 2.]
    # kept apart: the episode end (slot 2) and the last frame of the write (slot 4)
    assert (rb.compact.side_slot[:5] >= 0).tolist() == [False, False, True, False, True]


def test_side_rows_are_reused_as_the_ring_overwrites():
    c = CompactNext(capacity=10)
    for start in range(0, 200, 5):  # 40 writes of 5 frames, each with its last frame apart
        obs = torch.arange(start, start + 5.0)[:, None]
        td = TensorDict({"observation": obs, ("next", "observation"): obs + 1}, [5])
        c.strip(td, (torch.arange(5) + start) % 10)
    assert int((c.side_slot >= 0).sum()) == 2  # one per live write
    assert c.side.rows() <= 64  # bounded: rows freed and taken again


def test_pixel_memory_is_close_to_the_observations_alone():
    """uint8 [4, 84, 84] stacks (Pong's layout), episodes of 200 frames, writes of 250: the
    compact storage is at most 1.1x the bytes of the observations alone."""
    rng = np.random.default_rng(0)
    frames = 2000
    stream = torch.from_numpy(rng.integers(0, 255, (frames + 1, 4, 84, 84), dtype=np.uint8))
    plain = ReplayBufferActor(frames, seed=0)
    compact = ReplayBufferActor(frames, seed=0, compact_obs=True)
    for start in range(0, frames, 250):
        t = torch.arange(start, start + 250)
        nxt = stream[t + 1].clone()
        ends = (t + 1) % 200 == 0
        nxt[ends] = 0  # a final observation no following frame holds
        td = TensorDict({"observation": stream[t], ("next", "observation"): nxt,
                         ("next", "done"): ends[:, None], ("next", "reward"): torch.zeros(250, 1)}, [250])
        plain.extend(td)
        compact.extend(td)
    obs_bytes = frames * 4 * 84 * 84
    assert plain.storage_bytes() >= 2 * obs_bytes
    assert compact.storage_bytes() <= 1.1 * obs_bytes, compact.storage_bytes() / obs_bytes
    a, b = plain.sample(32), compact.sample(32)
    assert (a == b).all()


def test_state_dict_round_trip_and_mismatch_refused():
    batches = collected_batches(240)
    rb = ReplayBufferActor(100, seed=1, compact_obs=True)
    for b in batches:
        rb.extend(b)
    state = rb.state_dict()
    again = ReplayBufferActor(100, seed=1, compact_obs=True)
    again.load_state_dict(state)
    index = torch.arange(100)
    assert (again.compact.rebuild(again.storage[index].clone(), index, again.storage) ==
            rb.compact.rebuild(rb.storage[index].clone(), index, rb.storage)).all()
    with pytest.raises(ValueError, match="compact_obs=True"):
        ReplayBufferActor(100, seed=1).load_state_dict(state)


def test_collectors_write_to_a_compact_ray_buffer_and_checkpoint_it(tmp_path):
    with RayReplayBuffer(1000, batch_size=64, compact_obs=True, seed=0) as rb:
        with MultiSyncDataCollector(counting_env, num_workers=2, num_envs=2, frames_per_batch=24,
                                    total_frames=480, replay_buffer=rb, compact_obs=True,
                                    name="compact-rb") as c:
            for _ in c:
                pass
        assert len(rb) == 480
        for _ in range(5):
            s = rb.sample()
            # counting env: every next observation is obs + 1, the episode-final 5 included
            assert (s["next", "observation"] == s["observation"] + 1).all()
        rb.checkpoint(str(tmp_path / "ck"))
        info = rb.info()
    assert info["storage_bytes"] > 0
    with RayReplayBuffer.from_checkpoint(str(tmp_path / "ck"), batch_size=200) as back:
        assert back.compact_obs
        s = back.sample()
        assert (s["next", "observation"] == s["observation"] + 1).all()


def test_collector_batches_leave_out_next_observations():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=10, compact_obs=True,
                           max_frames_per_traj=50) as c:
        batch = c.next()
    keys = set(batch.keys(True, True))
    assert ("next", "observation") not in keys and ("next", "step_count") not in keys
    assert {"observation", "step_count", ("next", "reward"), ("next", "done"),
            ("next", "terminated"), ("next", "truncated")} <= keys
    rb = RayReplayBuffer(100)
    try:
        with pytest.raises(ValueError, match="compact_obs=True"):
            SyncDataCollector(counting_env, frames_per_batch=10, compact_obs=True, replay_buffer=rb)
    finally:
        rb.shutdown()


def test_compact_keys_match_torchrl():
    pytest.importorskip("torchrl")
    from torchrl.collectors import Collector
    from torchrl.envs import Compose, GymEnv, InitTracker, RewardSum, StepCounter, TransformedEnv

    def make():
        return TransformedEnv(GymEnv("CartPole-v1"), Compose(RewardSum(), StepCounter(), InitTracker()))

    theirs = Collector(make, None, frames_per_batch=20, total_frames=20, compact_obs=True)
    want = set(next(iter(theirs)).keys(True, True))
    theirs.shutdown()
    with SyncDataCollector(make, None, frames_per_batch=20, total_frames=20, compact_obs=True) as c:
        got = set(c.next().keys(True, True))
    assert got - {("collector", "policy_version")} == want  # ours always records the version


def test_env_actors_ship_compact_batches_that_expand_exactly():
    """With compact_obs the worker leaves out the next observations the following step holds;
    the buffer side puts back exactly what the full batch had (episode ends, row ends, a
    preempted tail), and the shipped batch is about half the observation bytes."""
    from actors.stepping.compact import compact_arrays, expand_arrays
    from actors.stepping.env_worker import EnvWorker, WorkerPlan
    from actors.options import CollectorOptions
    from collectors.validate import build_spec

    env = counting_env
    options = CollectorOptions(frames_per_batch=14, num_envs=2, max_frames_per_traj=50)
    spec, kind = build_spec(env, None, None, 2)
    worker = EnvWorker(WorkerPlan((env,), None, kind, spec, 7, options))
    try:
        for _ in range(3):
            full, _ = worker.collect()
            full = {k: v.copy() for k, v in full.items()}
            shipped = compact_arrays(full)
            assert ("next", "observation") not in shipped and ("next", "step_count") not in shipped
            back = expand_arrays(shipped)
            assert set(back) == set(full)
            for key in full:
                assert np.array_equal(back[key], full[key]), key
            # episodes of 5 in rows of 7: each row ships its last step and its episode ends only
            assert len(shipped[("_compact", "at")]) <= 2 * 3
    finally:
        worker.close()


# -- compact_obs="frames": each frame of a stacked observation stored once --------------------
def stacked_segments(lengths, envs: int = 3, episode_length: int = 7):
    """Flat TorchRL-layout writes from ``envs`` stacked counting envs stepped in turn, one
    env's next ``length`` steps per write: trajectories continue across writes that are not
    adjacent in the ring, episodes end inside writes, and writes shorter than a stack occur."""
    from collectors.testing import stacked_counting_env

    state = []
    for i in range(envs):
        env = stacked_counting_env(4, episode_length + i)
        state.append([env, env.reset(seed=i)[0], i])  # env, current obs, trajectory id
    for w, length in enumerate(lengths):
        env_obs = state[w % envs]
        obs, nxt, done, traj = [], [], [], []
        for _ in range(length):
            o, _, term, trunc, _ = env_obs[0].step(0)
            obs.append(env_obs[1])
            nxt.append(o)
            done.append(term or trunc)
            traj.append(env_obs[2])
            env_obs[1] = env_obs[0].reset()[0] if term or trunc else o
            env_obs[2] += envs if term or trunc else 0
        n = len(obs)
        yield TensorDict({"observation": torch.from_numpy(np.stack(obs)),
                          ("next", "observation"): torch.from_numpy(np.stack(nxt)),
                          ("next", "done"): torch.tensor(done)[:, None],
                          ("next", "reward"): torch.ones(n, 1),
                          ("collector", "traj_ids"): torch.tensor(traj)}, [n])


def contents(rb: ReplayBufferActor) -> TensorDict:
    """Every stored frame as sampling returns it (stacks and next values rebuilt)."""
    index = torch.arange(rb.size)
    out = rb.storage[index].clone()
    return rb.compact.rebuild(out, index, rb.storage) if rb.compact is not None else out


def test_frame_storage_equals_the_plain_storage_everywhere():
    """After every write, across episode ends, env (worker) boundaries and ring wraps, with
    writes of 1 to 9 frames (some shorter than the stack): every slot reads back as stored
    plainly, and so do samples."""
    lengths = [5, 9, 1, 2, 3, 8, 7, 4, 6, 2, 9, 1, 1, 5] * 6
    plain = ReplayBufferActor(37, seed=2)
    frames = ReplayBufferActor(37, seed=2, compact_obs="frames")
    for td in stacked_segments(lengths):
        plain.extend(td)
        frames.extend(td)
        assert (contents(plain) == contents(frames)).all()
        a, b = plain.sample(8), frames.sample(8)
        assert (a["index"] == b["index"]).all() and (a == b).all()
    assert frames.storage["observation"].shape == (37, 2, 2)  # one frame per slot
    assert plain.storage["next", "done"].any()
    derived = (frames.compact.frames.side.slot < 0).sum()
    assert derived > 37 // 2, derived  # most stacks are rebuilt, not kept whole


@pytest.mark.parametrize("sampler,kwargs", [("slice", {"slice_len": 4}),
                                            ("prioritized", {"alpha": 0.6, "beta": 0.4, "eps": 1e-8})])
def test_frame_storage_samples_equal_with_other_samplers(sampler, kwargs):
    plain = ReplayBufferActor(53, sampler=sampler, sampler_kwargs=kwargs, seed=4)
    frames = ReplayBufferActor(53, sampler=sampler, sampler_kwargs=kwargs, seed=4, compact_obs="frames")
    for td in stacked_segments([6, 11, 3, 8] * 8):
        plain.extend(td)
        frames.extend(td)
        for _ in range(3):
            a, b = plain.sample(16), frames.sample(16)
            assert (a == b).all()


def test_frame_storage_memory_for_pong_stacks():
    """uint8 [4, 84, 84] stacks of a frame stream (episodes of 200, reset-padded, writes of
    256): about a quarter of the stacks' bytes, samples equal to the plain storage's."""
    rng = np.random.default_rng(0)
    frames_total, stream = 2048, torch.from_numpy(rng.integers(0, 255, (2100, 84, 84), dtype=np.uint8))

    def stack(t):  # the stack at step t of its episode (200 steps), padded with the reset frame
        start = t - t % 200
        return torch.stack([stream[max(start, t - k)] for k in (3, 2, 1, 0)])

    plain = ReplayBufferActor(frames_total, seed=0)
    frames = ReplayBufferActor(frames_total, seed=0, compact_obs="frames")
    for start in range(0, frames_total, 256):
        t = range(start, start + 256)
        obs = torch.stack([stack(i) for i in t])
        ends = torch.tensor([(i + 1) % 200 == 0 for i in t])
        nxt = torch.stack([stack(i + 1) if not e else stream[2099].expand(4, 84, 84) for i, e in zip(t, ends)])
        td = TensorDict({"observation": obs, ("next", "observation"): nxt, ("next", "done"): ends[:, None],
                         ("next", "reward"): torch.zeros(256, 1)}, [256])
        plain.extend(td)
        frames.extend(td)
    obs_bytes = frames_total * 4 * 84 * 84
    # a frame per slot is 0.25x; plus the stacks kept whole and the side stores' first 64 rows
    # each (about 3% apiece at this small size)
    assert frames.storage_bytes() <= 0.33 * obs_bytes, frames.storage_bytes() / obs_bytes
    for _ in range(5):
        a, b = plain.sample(32), frames.sample(32)
        assert (a == b).all()


def test_frame_storage_state_round_trip_and_mismatch_refused():
    rb = ReplayBufferActor(40, seed=1, compact_obs="frames")
    for td in stacked_segments([7, 3, 9, 5] * 5):
        rb.extend(td)
    state = rb.state_dict()
    again = ReplayBufferActor(40, seed=1, compact_obs="frames")
    again.load_state_dict(state)
    assert (contents(again) == contents(rb)).all()
    with pytest.raises(ValueError, match="compact_obs='frames'.*compact_obs=True"):
        ReplayBufferActor(40, seed=1, compact_obs=True).load_state_dict(state)
    with pytest.raises(ValueError, match="stacks of 4 frames"):
        rb.extend(TensorDict({"observation": torch.zeros(2, 3, 2, 2, dtype=torch.uint8),
                              ("next", "observation"): torch.zeros(2, 3, 2, 2, dtype=torch.uint8),
                              ("next", "done"): torch.zeros(2, 1, dtype=torch.bool),
                              ("next", "reward"): torch.zeros(2, 1),
                              ("collector", "traj_ids"): torch.zeros(2, dtype=torch.int64)}, [2]))
    assert (contents(again) == contents(rb)).all()  # the refused write changed nothing


def test_collectors_write_stacked_frames_into_a_frame_buffer_and_checkpoint_it(tmp_path):
    from collectors.testing import stacked_counting_env

    with RayReplayBuffer(500, batch_size=64, compact_obs="frames", seed=0) as rb:
        with MultiSyncDataCollector(stacked_counting_env, num_workers=2, num_envs=2,
                                    frames_per_batch=24, total_frames=480, replay_buffer=rb,
                                    compact_obs=True, name="frames-rb") as c:
            for _ in c:
                pass
        assert len(rb) == 480
        for _ in range(5):
            s = rb.sample()
            obs, nxt, done = s["observation"], s["next", "observation"], s["next", "done"].squeeze(-1)
            assert obs.dtype == torch.uint8 and obs.shape == (64, 4, 2, 2)
            # a stack is the env's last 4 frames: steps count up to the newest (reset-padded)
            steps = obs[:, :, 0, 0].long()
            assert ((steps[:, 1:] - steps[:, :-1] == 1) | (steps[:, :-1] == 0)).all()
            assert (nxt[:, -1, 0, 0] == obs[:, -1, 0, 0] + 1).all()
            assert (nxt[~done][:, :-1] == obs[~done][:, 1:]).all()
        assert rb.state_dict()["storage"]["observation"].shape == (500, 2, 2)  # a frame per slot
        rb.checkpoint(str(tmp_path / "ck"))
    with RayReplayBuffer.from_checkpoint(str(tmp_path / "ck"), batch_size=100) as back:
        assert back.compact_obs == "frames"
        s = back.sample()
        assert (s["next", "observation"][:, -1, 0, 0] == s["observation"][:, -1, 0, 0] + 1).all()
