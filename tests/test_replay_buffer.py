"""RayReplayBuffer: storage ring, samplers, rate limiter, checkpoints, errors."""
import os
import time

import pytest
import torch
from tensordict import TensorDict

from actors.storage.replay_buffer import ReplayBufferActor
from collectors import RayReplayBuffer, ReplayBufferUnavailable


def frames(start, n, traj=None):
    x = torch.arange(start, start + n)
    td = TensorDict({"x": x.float().unsqueeze(-1), "collector": {
        "traj_ids": x // 10 if traj is None else traj}}, batch_size=[n])
    return td


def test_ring_wraps_and_counts():
    rb = ReplayBufferActor(10, batch_size=4)
    rb.extend(frames(0, 6))
    rb.extend(frames(6, 6))
    assert len(rb) == 10 and rb.write_count == 12
    stored = set(rb.storage["x"].squeeze(-1).long().tolist())
    assert stored == set(range(2, 12))
    # batch dims are flattened into frames
    rb.extend(frames(100, 4).reshape(2, 2))
    assert rb.write_count == 16


def test_extend_errors_change_nothing():
    rb = ReplayBufferActor(10)
    rb.extend(frames(0, 3))
    with pytest.raises(ValueError, match="capacity"):
        rb.extend(frames(0, 11))
    bad = frames(0, 2)
    bad["x"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        rb.extend(bad)
    with pytest.raises(ValueError, match="missing"):
        rb.extend(frames(0, 2).exclude("x"))
    assert len(rb) == 3 and rb.write_count == 3


def test_uniform_sampler_covers_storage():
    rb = ReplayBufferActor(100, seed=0)
    rb.extend(frames(0, 100))
    seen = torch.cat([rb.sample(256)["index"] for _ in range(20)])
    counts = torch.bincount(seen, minlength=100).float()
    assert counts.min() > 0 and counts.std() / counts.mean() < 0.3


def test_without_replacement_epochs():
    rb = ReplayBufferActor(20, sampler="without_replacement", seed=0)
    rb.extend(frames(0, 20))
    first = torch.cat([rb.sample(5)["x"] for _ in range(4)]).squeeze(-1).sort().values
    assert first.tolist() == list(range(20))


def test_prioritized_tracks_priorities_and_weights():
    rb = ReplayBufferActor(10, sampler="prioritized", sampler_kwargs={"alpha": 1.0, "beta": 1.0}, seed=0)
    rb.extend(frames(0, 10))
    rb.update_priority(torch.arange(10), torch.tensor([1.0] * 9 + [91.0]))
    s = rb.sample(2000)
    share = (s["index"] == 9).float().mean().item()
    assert 0.85 < share < 0.95  # 91 / 100
    w = s["priority_weight"]
    assert w.max() <= 1.0 + 1e-6
    assert w[s["index"] == 9].max() < w[s["index"] != 9].min()


def test_slice_sampler_stays_inside_trajectories():
    rb = ReplayBufferActor(200, sampler="slice", sampler_kwargs={"slice_len": 4}, seed=0)
    # two workers interleaved: ids never shared; trajectories of different lengths
    rb.extend(frames(0, 30, traj=torch.tensor([0] * 7 + [2] * 3 + [4] * 20)))
    rb.extend(frames(30, 30, traj=torch.tensor([1] * 12 + [3] * 2 + [5] * 16)))
    rb.extend(frames(60, 10, traj=torch.tensor([4] * 10)))  # traj 4 again, not adjacent
    s = rb.sample(400).reshape(100, 4)
    ids = s["collector", "traj_ids"]
    assert (ids == ids[:, :1]).all()
    x = s["x"].squeeze(-1)
    assert ((x[:, 1:] - x[:, :-1]) == 1).all()  # contiguous in time
    assert not (ids == 2).any() and not (ids == 3).any()  # shorter than a slice
    with pytest.raises(ValueError, match="multiple"):
        rb.sample(6)


def test_rate_limiter_blocks_and_times_out():
    rb = ReplayBufferActor(100, min_size=10, default_timeout_s=0.3)
    rb.extend(frames(0, 5))
    with pytest.raises(TimeoutError, match="min_size=10"):
        rb.sample(2)
    rb.extend(frames(5, 5))
    assert rb.sample(2).shape == (2,)
    spi = ReplayBufferActor(100, min_size=1, samples_per_insert=1.0, error_buffer=5,
                            default_timeout_s=0.3)
    spi.extend(frames(0, 4))
    spi.sample(4)
    spi.sample(4)  # inside the band: 4 inserts * 1.0 - 8 samples >= 1 * 1 - 5
    with pytest.raises(TimeoutError, match="samples"):
        spi.sample(4)
    with pytest.raises(ValueError, match="block each other"):
        ReplayBufferActor(100, samples_per_insert=4.0, error_buffer=1)


def test_checkpoint_round_trip_and_interrupted_write(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    rb = ReplayBufferActor(50, sampler="prioritized", seed=1)
    rb.extend(frames(0, 30), batch_id=(0, 0, 1))
    rb.update_priority(torch.tensor([3]), torch.tensor([7.0]))
    rb.checkpoint(path)
    assert os.path.exists(os.path.join(path, "RAY_COLLECTORS_CHECKPOINT"))
    assert open(os.path.join(path, "CURRENT")).read().strip() == "v000001"
    restored = ReplayBufferActor(50, sampler="prioritized", checkpoint_dir=path)
    assert len(restored) == 30 and restored.write_count == 30
    assert restored.sampler.priority[3] == 7.0
    assert torch.equal(restored.storage["x"][:30], rb.storage["x"][:30])
    assert restored.extend(frames(0, 30), batch_id=(0, 0, 1)) == 0  # a duplicate is ignored
    # a checkpoint that fails half-way leaves the previous one loadable
    rb.extend(frames(30, 10))

    def broken(self, prefix, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(TensorDict, "memmap", broken)
    with pytest.raises(OSError):
        rb.checkpoint(path)
    monkeypatch.undo()
    again = ReplayBufferActor(50, sampler="prioritized", checkpoint_dir=path)
    assert len(again) == 30
    assert not [p for p in os.listdir(path) if ".tmp-" in p]


def test_handle_round_trip_and_picklable(tmp_path):
    import ray

    rb = RayReplayBuffer(1000, batch_size=8, name="rb-handle")
    rb.extend(frames(0, 100))
    assert len(rb) == 100 and rb.write_count == 100
    assert rb.sample().batch_size == torch.Size([8])

    @ray.remote
    def use(handle, td):
        handle.extend(td)
        return len(handle)

    assert ray.get(use.remote(rb, frames(100, 10))) == 110
    rb.checkpoint(str(tmp_path / "c"))
    other = RayReplayBuffer.from_checkpoint(str(tmp_path / "c"))
    assert len(other) == 110
    with pytest.raises(TimeoutError):
        RayReplayBuffer(10, min_size=5, timeout_s=0.5).sample(1)
    with pytest.raises(ValueError, match="capacity"):
        rb.extend(frames(0, 1001))
    state = rb.state_dict()
    rb.empty()
    assert len(rb) == 0
    rb.load_state_dict(state)
    assert len(rb) == 110
    rb.shutdown()
    rb.shutdown()
    with pytest.raises(ReplayBufferUnavailable):
        len(rb)
    other.shutdown()


@pytest.mark.parametrize("prefetch", [True, 4])
def test_prefetching_sample(prefetch):
    rb = RayReplayBuffer(1000, batch_size=16, prefetch=prefetch, local_sampling=False)
    rb.extend(frames(0, 100))
    for _ in range(9):
        batch = rb.sample()
        assert batch.batch_size == torch.Size([16])
        assert torch.equal(batch["x"].squeeze(-1).long(), batch["index"])  # frame i is at slot i
    assert rb._local is None and len(rb._ready) == (3 if prefetch == 4 else 0)
    assert rb.sample(8).batch_size == torch.Size([8])  # another size: what was ahead is dropped
    rb.shutdown()


def test_local_sampling_reads_shared_storage_without_torn_frames():
    import threading

    rb = RayReplayBuffer(500, batch_size=64, name="rb-local")
    with pytest.raises(TimeoutError):
        rb.sample(4, timeout=0.3)  # empty: bounded wait, through the actor or locally
    def constant(value, n=50):  # every entry of every frame of a write holds the same value
        v = torch.full((n,), value)
        return TensorDict({"x": v.float().unsqueeze(-1), "collector": {"traj_ids": v}}, [n])

    rb.extend(constant(10_000, 100))
    for _ in range(20):  # the first samples go through the actor while it says where to map
        rb.sample()
        time.sleep(0.05)
    assert rb._local is not None and rb._local.reader is not None  # same node: mapped
    folder = rb._local.reader.dir
    assert os.path.isdir(folder)

    stop = threading.Event()

    def writer():
        k = 0
        while not stop.is_set():
            rb.extend(constant(k))
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):  # frames are whole: x and traj_ids come from the same write
            batch = rb.sample()
            assert torch.equal(batch["x"].squeeze(-1).long(), batch["collector", "traj_ids"])
    finally:
        stop.set()
        thread.join()
    sampled = rb.info()["samples"]
    assert sampled >= 301 * 64  # local samples are counted by the actor
    rb.shutdown()
    assert not os.path.exists(folder)  # shared files removed
    with pytest.raises(ReplayBufferUnavailable):
        rb.sample()


def test_local_sampling_notices_a_killed_buffer():
    import ray

    rb = RayReplayBuffer(100, batch_size=8)
    rb.extend(frames(0, 50))
    for _ in range(20):
        rb.sample()
        time.sleep(0.05)
    assert rb._local.reader is not None
    ray.kill(rb.actor)
    deadline = time.time() + 10
    with pytest.raises(ReplayBufferUnavailable):
        while time.time() < deadline:
            rb.sample()
    assert time.time() < deadline


def test_local_sampling_follows_a_restart_from_checkpoint(tmp_path):
    import signal

    rb = RayReplayBuffer(1000, batch_size=8, checkpoint_dir=str(tmp_path / "c"))
    rb.extend(frames(0, 50))
    rb.checkpoint(str(tmp_path / "c"))
    for _ in range(20):
        rb.sample()
        time.sleep(0.05)
    old = rb._local.reader.dir
    os.kill(rb.info()["pid"], signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline and rb.info()["restored_from"] is None:
        time.sleep(0.2)
    rb.extend(frames(50, 50))
    for _ in range(20):  # the old mapping is dropped, the new storage mapped
        rb.sample()
        time.sleep(0.05)
    assert rb._local.reader.dir != old and not os.path.exists(old)
    seen = set()
    for _ in range(50):  # 3,200 uniform draws over 100 frames: all of them come up
        seen |= set(rb.sample(64)["x"].squeeze(-1).long().tolist())
    assert seen == set(range(100))  # restored frames and the ones written after
    rb.shutdown()


def test_local_sampling_only_for_the_uniform_sampler():
    with pytest.raises(ValueError, match="local_sampling=True"):
        RayReplayBuffer(10, sampler="prioritized", local_sampling=True)
    rb = RayReplayBuffer(100, sampler="prioritized", batch_size=4)
    rb.extend(frames(0, 10))
    assert rb.sample().batch_size == torch.Size([4]) and rb._local is None
    rb.shutdown()


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampler"):
        RayReplayBuffer(10, sampler="nope")
    with pytest.raises(ValueError, match="slice_len"):
        RayReplayBuffer(10, sampler="slice")
    with pytest.raises(ValueError, match="capacity"):
        RayReplayBuffer(0)


def test_local_sampler_stays_off_for_storage_it_cannot_reach():
    from collectors.local_sampler import LocalSampler

    s = LocalSampler(actor=None, name="x")
    s._locate(None)  # nothing written yet: keep asking
    assert s.reader is None and not s.off
    s._locate({"node_id": "another-node", "dir": "/nonexistent", "pid": 1, "layout": [],
               "capacity": 1, "min_size": 0})
    assert s.reader is None and s.off  # another node: calls from now on, no more probes
    assert s.sample(4, timeout=1.0) is None


def test_slices_never_cross_the_write_cursor():
    """One long trajectory through a small ring: once it wraps, the newest frame sits next to
    the oldest in storage with the same trajectory id; no slice may join them."""
    rb = ReplayBufferActor(200, sampler="slice", sampler_kwargs={"slice_len": 8}, seed=0)
    for start in range(0, 10_000, 50):
        td = TensorDict({"t": torch.arange(start, start + 50, dtype=torch.float32)[:, None],
                         ("collector", "traj_ids"): torch.zeros(50, dtype=torch.int64)}, [50])
        rb.extend(td)
        if start >= 200:
            t = rb.sample(8 * 40)["t"].view(40, 8)
            assert ((t[:, 1:] - t[:, :-1]) == 1).all(), t[((t[:, 1:] - t[:, :-1]) != 1).any(-1)]


def test_two_concurrent_sends_of_one_batch_store_it_once():
    """Both sends wait on the rate limiter; the id is reserved before waiting, so the second
    send waits for the first and then finds it stored."""
    import threading

    rb = ReplayBufferActor(1000, samples_per_insert=1.0, min_size=10, error_buffer=1.0,
                           default_timeout_s=10)
    rb.extend(frames(0, 10), batch_id=("c", 0))
    rb.extend(frames(10, 10), batch_id=("c", 1))  # now the limiter holds writers back
    results = []
    sends = [threading.Thread(target=lambda: results.append(
        rb.extend(frames(20, 10), batch_id=("c", 2)))) for _ in range(2)]
    for t in sends:
        t.start()
    time.sleep(0.3)  # a window in which both sends are blocked
    assert rb.write_count == 20
    for _ in range(2):
        rb.sample(5)  # frees room for one insert
    for t in sends:
        t.join(10)
    assert sorted(results) == [0, 10] and rb.write_count == 30
    assert list(rb.batch_ids()).count(("c", 2)) == 1


def test_num_slices_and_update_priority_through_the_handle():
    """Both options as a user reaches them: a RayReplayBuffer filled by a collector."""
    import functools

    from collectors import MultiSyncDataCollector
    from collectors.testing import counting_env

    env = functools.partial(counting_env, 40)  # episodes of 40 steps: room for slices of 8
    with RayReplayBuffer(2000, sampler="slice", num_slices=4, batch_size=32, seed=0) as rb:
        with MultiSyncDataCollector(env, num_workers=2, frames_per_batch=400, total_frames=800,
                                    replay_buffer=rb, name="slices") as c:
            for _ in c:
                pass
        s = rb.sample().reshape(4, 8)  # 4 slices of 32 / 4 frames
        ids, obs = s["collector", "traj_ids"], s["observation"].squeeze(-1)
        assert (ids == ids[:, :1]).all() and ((obs[:, 1:] - obs[:, :-1]) == 1).all()
    with RayReplayBuffer(1000, sampler="prioritized", alpha=1.0, beta=1.0, batch_size=64,
                         seed=0) as rb:
        with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=100,
                                    total_frames=200, replay_buffer=rb, name="prio") as c:
            for _ in c:
                pass
        first = rb.sample()
        # all weight on slot 7: every draw returns it, with the smallest importance weight
        priority = torch.full((200,), 1e-6)
        priority[7] = 1e3
        rb.update_priority(torch.arange(200), priority)
        s = rb.sample()
        assert (s["index"] == 7).all(), s["index"]
        assert first["index"].unique().numel() > 1
