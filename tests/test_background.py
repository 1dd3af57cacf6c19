"""Collectors with a replay-buffer actor; background collection with start()."""
import time

import pytest
import torch
from torch import nn

from collectors import (AsyncCollector, MultiaSyncDataCollector, MultiSyncDataCollector,
                        RayReplayBuffer, SyncDataCollector, aSyncDataCollector)
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env
from conftest import alive_actor_names


@pytest.fixture
def rb():
    buffer = RayReplayBuffer(100_000, batch_size=64)
    yield buffer
    buffer.shutdown()


@pytest.mark.parametrize("cls,kwargs", [
    (SyncDataCollector, {}), (MultiSyncDataCollector, {"num_workers": 2}),
    (MultiaSyncDataCollector, {"num_workers": 2}), (aSyncDataCollector, {})])
def test_iteration_with_buffer_yields_none_and_counts_exactly(rb, cls, kwargs):
    with cls(counting_env, frames_per_batch=20, total_frames=100, replay_buffer=rb, **kwargs) as c:
        out = list(c)
        stats = c.stats()
    assert out == [None] * 5
    assert stats["frames"] == 100
    assert rb.write_count == 100 and len(rb) == 100
    # every batch the collector reports written is in the buffer, nothing else is, and no
    # frame (trajectory, step) is there twice
    assert sorted(map(tuple, rb.batch_ids())) == sorted(map(tuple, stats["written_batch_ids"]))
    storage = rb.state_dict()["storage"][:100]
    frames = set(zip(storage["collector", "traj_ids"].tolist(), storage["observation"][:, 0].tolist()))
    assert len(frames) == 100


def test_collectors_sharing_a_buffer_each_get_every_batch_written(rb):
    # batch ids carry the collector's name: a second collector's batch 1 is not a resend
    kwargs = dict(frames_per_batch=20, total_frames=60, replay_buffer=rb)
    with SyncDataCollector(counting_env, **kwargs) as a, SyncDataCollector(counting_env, **kwargs) as b:
        for _ in zip(a, b):
            pass
    with MultiaSyncDataCollector(counting_env, num_workers=2, **kwargs) as c:
        c.start()
        deadline = time.time() + 60
        while c.is_running() and time.time() < deadline:
            time.sleep(0.05)
    assert rb.write_count == 180 and len(rb.batch_ids()) == 9


def test_async_collector_alias_and_batches():
    assert AsyncCollector is aSyncDataCollector
    with aSyncDataCollector(counting_env, frames_per_batch=10, total_frames=30) as c:
        batches = list(c)
    assert [b.batch_size for b in batches] == [torch.Size([10])] * 3
    ids = torch.cat([b["collector", "traj_ids"] for b in batches])
    assert torch.all(ids[1:] >= ids[:-1])


def test_start_runs_to_total_frames(rb):
    c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=50,
                                total_frames=1000, replay_buffer=rb)
    c.start()
    deadline = time.time() + 60
    while c.is_running() and time.time() < deadline:
        time.sleep(0.05)
    assert not c.is_running()
    assert c.stats()["frames"] == 1000
    assert rb.write_count == 1000
    c.shutdown()


def test_start_sample_async_shutdown_exact_counts(rb):
    c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=50,
                                total_frames=-1, replay_buffer=rb, name="bg-run")
    c.start()
    assert c.is_running()
    sampled = rb.sample(256, timeout=30)  # waits (bounded) until enough frames arrived
    assert sampled.batch_size == torch.Size([256])
    c.async_shutdown()
    stats = c.stats()
    written = rb.write_count
    time.sleep(0.5)
    assert rb.write_count == written  # nothing reaches the buffer after async_shutdown()
    assert stats["frames"] == written > 0
    assert stats["running"] is False and c.background_error() is None
    assert alive_actor_names("bg-run/") == []
    # every written batch is in the buffer exactly once
    assert sorted(map(tuple, stats["written_batch_ids"])) == sorted(map(tuple, rb.batch_ids()))


def wait_until(condition, seconds=30.0, what="the condition"):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds:g}s"
        time.sleep(0.05)


def test_pause_stops_writes(rb):
    c = aSyncDataCollector(counting_env, frames_per_batch=20, replay_buffer=rb)
    c.start()
    wait_until(lambda: rb.write_count > 0, what="a first write")
    with c.pause():
        before = rb.write_count
        time.sleep(0.5)  # a window in which nothing may be written
        assert rb.write_count == before
    wait_until(lambda: rb.write_count > before, what="a write after resuming")
    c.async_shutdown()


def test_weight_updates_while_running(rb):
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    c = MultiaSyncDataCollector(counting_env, policy, num_workers=2, frames_per_batch=20,
                                replay_buffer=rb)
    c.start()
    wait_until(lambda: rb.write_count > 0, what="a first write")
    with torch.no_grad():
        policy[0].weight.zero_()
        policy[0].bias.copy_(torch.tensor([0.0, 9.0]))
    c.update_policy_weights_()

    def newest():
        state = rb.state_dict()
        storage = state["storage"][:len(rb)]
        return storage[storage["collector", "policy_version"] >= 1]

    wait_until(lambda: newest().numel() > 0, what="a frame collected with the new weights")
    c.async_shutdown()
    assert (newest()["action"] == 1).all()


def test_start_needs_a_buffer():
    with SyncDataCollector(counting_env, frames_per_batch=10) as c:
        with pytest.raises(RuntimeError, match="replay_buffer"):
            c.start()


def test_a_pausing_trainer_holds_background_collection_without_killing_it():
    """samples_per_insert: while the trainer does not sample, writers wait (longer than
    write_timeout_s) and resume when it samples again; every frame stays counted."""
    rb = RayReplayBuffer(100_000, batch_size=50, samples_per_insert=1.0, min_size=100,
                         error_buffer=200.0)
    c = SyncDataCollector(counting_env, frames_per_batch=50, replay_buffer=rb, write_timeout_s=2.0)
    try:
        c.start()
        for _ in range(10):
            rb.sample(timeout=30)
        time.sleep(6.0)  # the pause: three times write_timeout_s without a sample
        assert c.is_running() and c.background_error() is None
        held = rb.write_count
        for _ in range(20):
            rb.sample(timeout=30)
        deadline = time.monotonic() + 30
        while rb.write_count <= held and time.monotonic() < deadline:
            rb.sample(timeout=30)
        assert rb.write_count > held and c.is_running()
        c.async_shutdown(timeout=0.01)  # a join that times out: the fence still holds
        stored = rb.write_count
        time.sleep(1.5)  # a window in which nothing may land
        assert rb.write_count == stored
        stats = c.stats()
        per = stats["per_worker"][0]
        assert per["frames"] == per["delivered"] + sum(per["dropped"].values())
        assert stored == per["delivered"]
    finally:
        c.shutdown(raise_on_error=False)
        rb.shutdown()


def test_batches_ready_together_reach_the_buffer_in_one_call(rb):
    """Through the object store (shared_memory=False), batches that are ready together share one
    call per shard: after a pause, all four workers' batches wait, and go in one call. Every
    batch is still stored once and the counts stay exact."""
    with MultiaSyncDataCollector(counting_env, num_workers=4, frames_per_batch=10, total_frames=400,
                                 replay_buffer=rb, shared_memory=False) as c:
        with c.pause():
            c.start()
            time.sleep(2.0)  # every worker finishes its batch meanwhile
        deadline = time.monotonic() + 60
        while c.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = c.stats()
    assert stats["shared_memory_writes"] == 0 and stats["frames"] == 400
    ids = sorted(map(tuple, rb.batch_ids()))
    assert ids == sorted(map(tuple, stats["written_batch_ids"])) and len(ids) == 40
    assert rb.write_count == 400 and stats["buffer_write_calls"] < 40, stats["buffer_write_calls"]
    for p in stats["per_worker"]:
        assert p["frames"] == p["delivered"] + sum(p["dropped"].values()), p
