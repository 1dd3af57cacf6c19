"""Real workloads: Atari Pong (uint8 pixel stacks, a Nature-DQN conv net) and MuJoCo
HalfCheetah (continuous control, a 256-256 MLP) with every collector; pixels stay uint8 from env
to buffer; batches equal what the raw loop records. Needs the atari and mujoco extras (the test
command installs them); skipped without."""
import numpy as np
import pytest
import torch

from collectors import (MultiaSyncDataCollector, MultiSyncDataCollector, RayReplayBuffer,
                        SyncDataCollector, aSyncDataCollector)
from collectors.workloads import CheetahMLP, NatureDQN, half_cheetah, pong

ale_py = pytest.importorskip("ale_py", reason="install the atari extra")
mujoco = pytest.importorskip("mujoco", reason="install the mujoco extra")

COLLECTORS = [(SyncDataCollector, {}), (MultiSyncDataCollector, {"num_workers": 2}),
              (MultiaSyncDataCollector, {"num_workers": 2}), (aSyncDataCollector, {})]


@pytest.mark.parametrize("cls, extra", COLLECTORS)
def test_pong_collects_uint8_stacks_with_every_collector(cls, extra):
    with cls(pong, NatureDQN(), frames_per_batch=32, total_frames=64, **extra) as c:
        b = c.next()
    obs = b["observation"]
    assert obs.dtype == torch.uint8 and obs.shape[-3:] == (4, 84, 84)
    assert b["next", "observation"].dtype == torch.uint8
    assert b["action"].dtype == torch.int64 and b.numel() == 32


@pytest.mark.parametrize("cls, extra", COLLECTORS)
def test_half_cheetah_collects_with_every_collector(cls, extra):
    with cls(half_cheetah, CheetahMLP(), frames_per_batch=40, total_frames=80, **extra) as c:
        b = c.next()
    assert b["observation"].shape[-1] == 17 and b["action"].shape[-1] == 6
    assert b["action"].dtype == torch.float32 and b["action"].abs().max() <= 1.0
    assert torch.isfinite(b["next", "reward"]).all() and b.numel() == 40


def test_pixels_stay_uint8_from_env_to_buffer_to_sample():
    rb = RayReplayBuffer(1_000, batch_size=16)
    try:
        with SyncDataCollector(pong, frames_per_batch=64, total_frames=128, replay_buffer=rb) as c:
            list(c)
        sample = rb.sample()
        assert sample["observation"].dtype == torch.uint8
        assert sample["next", "observation"].dtype == torch.uint8
        storage = rb.state_dict()["storage"]
        assert storage["observation"].dtype == torch.uint8  # no float copy in the buffer either
    finally:
        rb.shutdown()


@pytest.mark.parametrize("make, policy", [(pong, NatureDQN), (half_cheetah, CheetahMLP)])
def test_batch_equals_the_raw_loop(make, policy):
    net = policy()
    n = 60
    env = make()
    obs, _ = env.reset(seed=0)
    rows = []
    with torch.no_grad():
        for _ in range(n):
            action = net(torch.as_tensor(obs)[None])[0].numpy()
            step_action = action.item() if action.ndim == 0 else action
            nxt, reward, term, trunc, _ = env.step(step_action)
            rows.append((np.array(obs), action, reward, term, np.array(nxt)))
            obs = nxt
            if term or trunc:
                obs, _ = env.reset()
    env.close()
    with SyncDataCollector(make, policy(), frames_per_batch=n, seed=0) as c:
        b = c.next()
    for t, (o, a, r, term, nxt) in enumerate(rows):
        assert np.array_equal(b["observation"][t].numpy(), o.astype(b["observation"].numpy().dtype)), t
        assert np.allclose(b["action"][t].numpy(), a), t
        assert b["next", "reward"][t, 0].item() == pytest.approx(float(r), rel=1e-6), t
        assert bool(b["next", "terminated"][t, 0]) == bool(term), t
        assert np.array_equal(b["next", "observation"][t].numpy(), nxt.astype(b["observation"].numpy().dtype)), t


def test_pong_frame_storage_equals_the_plain_storage():
    """compact_obs='frames' on real Pong batches from 2 workers, in a ring that wraps: every
    slot reads back as the plain storage holds it, with about a frame per slot."""
    from actors.storage.replay_buffer import ReplayBufferActor

    with MultiSyncDataCollector(pong, None, num_workers=2, frames_per_batch=200,
                                total_frames=1200) as c:
        batches = [b.reshape(-1) for b in c]
    plain = ReplayBufferActor(700, seed=0)
    frames = ReplayBufferActor(700, seed=0, compact_obs="frames")
    for td in batches:
        plain.extend(td)
        frames.extend(td)
        index = torch.arange(plain.size)
        a = plain.storage[index]
        b = frames.compact.rebuild(frames.storage[index].clone(), index, frames.storage)
        assert (a == b).all()
    assert frames.storage["observation"].shape == (700, 84, 84)
    # plain holds 2 stacks per slot; a frame per slot is 1/8 of that, plus the side stores
    # (their first 64 rows weigh here; at 20,000 frames the total is 0.26x one stack per slot)
    assert frames.storage_bytes() < 0.25 * plain.storage_bytes()
