"""Replay-buffer interop with TorchRL: its keys, its samplers, and its in-process buffers."""
import time

import pytest
import torch
from tensordict import TensorDict

from collectors import RayReplayBuffer, SyncDataCollector
from collectors.testing import counting_env

data = pytest.importorskip("torchrl.data")


def frames(n, start=0):
    return TensorDict({"observation": torch.arange(start, start + n, dtype=torch.float32)[:, None],
                       ("collector", "traj_ids"): torch.zeros(n, dtype=torch.int64)}, batch_size=[n])


def test_prioritized_samples_carry_torchrl_keys_and_take_td_errors():
    with RayReplayBuffer(100, sampler="prioritized", batch_size=500, seed=0) as rb:
        rb.extend(frames(10))
        td = rb.sample()
        assert {"index", "priority_weight"} <= set(td.keys()) and "_weight" not in td.keys()
        td.set("td_error", torch.where(td["index"] == 3, 100.0, 0.0))
        rb.update_tensordict_priority(td)
        share = (rb.sample()["index"] == 3).float().mean().item()
        assert share > 0.95


def test_torchrl_sampler_objects_are_mapped():
    with RayReplayBuffer(100, sampler=data.SamplerWithoutReplacement(drop_last=True), seed=0) as rb:
        rb.extend(frames(10))
        a, b = rb.sample(4), rb.sample(4)
        c = rb.sample(4)  # the epoch's last 2 frames are dropped
        assert len(set(a["index"].tolist() + b["index"].tolist())) == 8 and c.numel() == 4
    with RayReplayBuffer(100, sampler=data.SliceSampler(slice_len=5), seed=0) as rb:
        rb.extend(frames(20))
        s = rb.sample(10)["observation"].view(2, 5)
        assert ((s[:, 1:] - s[:, :-1]) == 1).all()
    with RayReplayBuffer(100, sampler=data.RandomSampler()) as rb:
        rb.extend(frames(10))
        assert rb.sample(3).numel() == 3
    with pytest.raises(NotImplementedError, match="strict_length"):
        RayReplayBuffer(100, sampler=data.SliceSampler(slice_len=5, strict_length=False))


def test_seed_example_start_fills_a_torchrl_buffer_and_stops_at_async_shutdown():
    rb = data.ReplayBuffer(storage=data.LazyTensorStorage(10_000), batch_size=32)
    collector = SyncDataCollector(counting_env, frames_per_batch=50, total_frames=-1,
                                  replay_buffer=rb)
    collector.start()
    deadline = time.monotonic() + 60
    while len(rb) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(5):
        batch = rb.sample()
        assert batch.batch_size == (32,) and "observation" in batch.keys()
    assert collector.is_running()
    collector.async_shutdown()
    written = len(rb)
    assert written > 0 and written % 50 == 0
    time.sleep(1.0)  # a window in which nothing else may happen
    assert len(rb) == written
    assert not collector.is_running()
