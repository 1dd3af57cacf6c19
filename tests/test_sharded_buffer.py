"""RayReplayBuffer(num_shards=N): N buffer actors behind one handle. Sampling is uniform (or
prioritized) over every stored frame, slices stay in one shard, figures add up, checkpoints
cover every shard, a dead shard loses only its own frames, and collectors write each batch into
the shard its env actor's node (here: one node, so worker i's shard) holds."""
import os
import pickle
import signal
import time

import pytest
import ray
import torch
from tensordict import TensorDict

from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, RayReplayBuffer
from collectors.sharded_buffer import ShardedReplayBuffer
from collectors.testing import counting_env


def frames(start, n, traj=None):
    x = torch.arange(start, start + n)
    return TensorDict({"x": x.float().unsqueeze(-1), "collector": {
        "traj_ids": x // 10 if traj is None else traj}}, batch_size=[n])


def fill(rb, sizes):
    """Shard i holds frames i*1000 ... i*1000 + sizes[i] - 1."""
    for i, n in enumerate(sizes):
        if n:
            rb.shards[i].extend(frames(i * 1000, n))


@pytest.mark.parametrize("local_sampling", [None, False])
def test_uniform_over_every_frame_in_proportion_to_shard_sizes(local_sampling):
    with RayReplayBuffer(300, num_shards=3, batch_size=500, seed=0,
                         local_sampling=local_sampling) as rb:
        assert isinstance(rb, ShardedReplayBuffer) and [s.capacity for s in rb.shards] == [100] * 3
        fill(rb, [100, 50, 10])
        x = torch.cat([rb.sample()["x"].squeeze(-1).long() for _ in range(40)])  # 20,000 draws
        shard = x // 1000
        share = torch.bincount(shard, minlength=3).float() / len(x)
        assert torch.allclose(share, torch.tensor([100, 50, 10]) / 160.0, atol=0.015), share
        per_frame = torch.bincount(x - shard * 1000 + shard * 100, minlength=300).float()
        stored = torch.cat([torch.arange(100), 100 + torch.arange(50), 200 + torch.arange(10)])
        assert (per_frame[stored] > 0).all()  # every stored frame is drawn...
        mask = torch.ones(300, dtype=torch.bool)
        mask[stored] = False
        assert per_frame[mask].sum() == 0  # ...and nothing else
        expected = len(x) / 160  # each frame's count near len(x)/160 whatever its shard
        assert (per_frame[stored] - expected).abs().max() < 0.5 * expected


def test_indices_are_global_and_reach_the_right_shard_for_priorities():
    with RayReplayBuffer(40, num_shards=2, batch_size=2000, sampler="prioritized", alpha=1.0,
                         beta=0.5, eps=0.0, seed=1) as rb:
        fill(rb, [20, 20])
        s = rb.sample()
        assert set((s["index"] // rb.stride).tolist()) == {0, 1}
        # every frame of shard 1 three times as likely: shard 1 drawn 3/4 of the time
        idx1 = torch.arange(20) + rb.stride
        rb.update_priority(idx1, torch.full((20,), 3.0))
        s = rb.sample()
        share = (s["x"].squeeze(-1) >= 1000).float().mean()
        assert abs(share - 0.75) < 0.04, share
        # the weights are those one buffer of all 40 frames would give: (p / p_min) ** -beta
        w = s["priority_weight"]
        from_shard1 = s["x"].squeeze(-1) >= 1000
        assert torch.allclose(w[~from_shard1], torch.ones(1))
        assert torch.allclose(w[from_shard1], torch.full((1,), 3.0 ** -0.5))


def test_torchrl_sampler_objects_are_mapped_for_every_shard():
    """(TorchRL's PrioritizedSampler needs a C++ extension this machine lacks.)"""
    from torchrl.data import SamplerWithoutReplacement, SliceSampler

    with pytest.raises(NotImplementedError, match="num_shards=2"):
        RayReplayBuffer(40, num_shards=2, sampler=SamplerWithoutReplacement())
    with RayReplayBuffer(40, num_shards=2, batch_size=8, sampler=SliceSampler(slice_len=4)) as rb:
        assert rb.sampler == "slice" and [s.capacity for s in rb.shards] == [20, 20]
        fill(rb, [20, 20])
        x = rb.sample()["x"].squeeze(-1).long().reshape(2, 4)
        assert ((x[:, 1:] - x[:, :-1]) == 1).all()


def test_slices_never_span_shards():
    with RayReplayBuffer(200, num_shards=2, batch_size=40, sampler="slice", slice_len=5,
                         seed=0) as rb:
        fill(rb, [100, 100])
        for _ in range(20):
            x = rb.sample()["x"].squeeze(-1).long().reshape(8, 5)
            assert ((x[:, 1:] - x[:, :-1]) == 1).all()  # contiguous
            assert ((x // 1000).min(1).values == (x // 1000).max(1).values).all()  # one shard
            assert ((x // 10).min(1).values == (x // 10).max(1).values).all()  # one trajectory


def test_figures_add_up_with_per_shard_figures():
    with RayReplayBuffer(90, num_shards=3, batch_size=4) as rb:
        fill(rb, [30, 20, 5])
        rb.shards[0].extend(frames(0, 10))  # wraps: 30 stored, 40 written
        info = rb.info()
        assert len(rb) == info["size"] == 55 and rb.write_count == info["write_count"] == 65
        assert info["capacity"] == 90 and info["num_shards"] == 3
        assert [s["size"] for s in info["shards"]] == [30, 20, 5]
        assert [s["write_count"] for s in info["shards"]] == [40, 20, 5]
        assert rb.stats()["size"] == 55


def test_extend_and_pickled_handles_in_a_task():
    with RayReplayBuffer(100, num_shards=2, batch_size=8, seed=0) as rb:
        for k in range(6):
            rb.extend(frames(10 * k, 10))
        assert len(rb) == 60 and sorted(s["size"] for s in rb.info()["shards"]) != [0, 60]

        @ray.remote(num_cpus=0)
        def draw(handle):
            return handle.sample()["x"].shape, len(handle)

        shape, n = ray.get(draw.remote(pickle.loads(pickle.dumps(rb))), timeout=60)
        assert tuple(shape) == (8, 1) and n == 60


def test_checkpoint_and_restore_every_shard(tmp_path):
    with RayReplayBuffer(60, num_shards=3, batch_size=16, seed=0) as rb:
        fill(rb, [20, 10, 5])
        rb.checkpoint(str(tmp_path / "ck"))
        before = [sorted(s["x"].squeeze(-1).tolist()) for s in
                  (shard.state_dict()["storage"][:shard.info()["size"]] for shard in rb.shards)]
    assert os.path.exists(tmp_path / "ck" / "shards.json")
    with RayReplayBuffer.from_checkpoint(str(tmp_path / "ck"), batch_size=16) as back:
        assert isinstance(back, ShardedReplayBuffer) and back.num_shards == 3
        after = [sorted(s["x"].squeeze(-1).tolist()) for s in
                 (shard.state_dict()["storage"][:shard.info()["size"]] for shard in back.shards)]
        assert after == before and len(back) == 35 and back.sample().batch_size == torch.Size([16])


def test_options_a_shard_cannot_apply_alone_are_refused():
    for kwargs in ({"prefetch": 2}, {"samples_per_insert": 1.0},
                   {"sampler": "without_replacement"}):
        with pytest.raises(NotImplementedError, match="num_shards=2"):
            RayReplayBuffer(100, num_shards=2, **kwargs)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_shards"):
            RayReplayBuffer(100, num_shards=bad)
    with pytest.raises(ValueError, match="at least num_shards"):
        RayReplayBuffer(2, num_shards=3)


def test_a_dead_shard_loses_only_its_frames_and_the_rest_keeps_sampling(tmp_path):
    with RayReplayBuffer(300, num_shards=3, batch_size=64, seed=0) as rb:
        fill(rb, [50, 50, 50])
        os.kill(rb.shards[1].info()["pid"], signal.SIGKILL)  # no checkpoint_dir: gone for good
        deadline = time.monotonic() + 30
        while 1 not in rb.dead and time.monotonic() < deadline:
            try:
                rb.sample()
            except Exception:  # noqa: BLE001 - the death may surface once as an error
                pass
        x = rb.sample()["x"].squeeze(-1)
        assert 1 in rb.dead and not ((x >= 1000) & (x < 2000)).any()
        for k in range(8):  # writes go to the live shards only
            assert rb.extend(frames(3000 + 10 * k, 10)) == 10
        rb.empty()
        fill(rb, [50, 0, 50])
        assert len(rb) == 100 and rb.info()["shards"][1]["alive"] is False
        assert rb.extend(frames(5000, 10)) == 10 and len(rb) == 110
        rb.checkpoint(str(tmp_path / "ck"))  # the live shards; the dead one comes back empty
    with RayReplayBuffer.from_checkpoint(str(tmp_path / "ck")) as back:
        assert [s["size"] for s in back.info()["shards"]][1] == 0 and len(back) == 110


def test_a_shard_restarts_from_its_own_checkpoint(tmp_path):
    with RayReplayBuffer(300, num_shards=2, batch_size=32, seed=0,
                         checkpoint_dir=str(tmp_path / "ck")) as rb:
        fill(rb, [40, 40])
        rb.shards[0].checkpoint(str(tmp_path / "ck" / "shard-0"))
        rb.shards[0].extend(frames(500, 10))  # not in its checkpoint: at risk
        pid = rb.shards[0].info()["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if rb.shards[0].info()["pid"] != pid:
                    break
            except Exception:  # noqa: BLE001 - restarting
                time.sleep(0.2)
        sizes = [s["size"] for s in rb.info()["shards"]]
        assert sizes == [40, 40], sizes  # its unsaved 10 frames lost; shard 1 untouched
        assert rb.sample().batch_size == torch.Size([32])


def test_collectors_write_each_workers_batches_into_its_shard():
    """One node: worker i's batches go to shard i % 3, through the shared-memory feed during
    start() and through the object store when iterating."""
    with RayReplayBuffer(6000, num_shards=3, batch_size=32, seed=0) as rb:
        c = MultiSyncDataCollector(counting_env, num_workers=3, frames_per_batch=30,
                                   total_frames=150, replay_buffer=rb, name="shard-sync")
        for _ in c:
            pass
        c.shutdown()
        c = MultiaSyncDataCollector(counting_env, num_workers=3, frames_per_batch=10,
                                    total_frames=600, replay_buffer=rb, name="shard-async")
        c.start()
        deadline = time.monotonic() + 120
        while c.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = c.stats()
        c.shutdown()
        assert stats["shared_memory_writes"] == len(stats["written_batch_ids"]) == 60
        for i, shard in enumerate(rb.shards):
            workers = {tuple(bid)[2] for bid in shard.batch_ids()}
            assert workers == {i}, (i, workers)
        assert len(rb) == 750 and rb.write_count == 750
        obs = rb.sample()["observation"]
        assert ((obs >= 0) & (obs < 5)).all()
