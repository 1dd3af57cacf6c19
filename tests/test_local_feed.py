"""start() into a RayReplayBuffer on the driver's node: env actors leave batches in shared memory
and the buffer's intake copies them in, named in groups by the driver (no Ray call per batch).
Every test fails when the writes go through the object store (``shared_memory_writes`` is 0) or
when a batch is lost or stored twice."""
import functools
import os
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn

from actors.shm.folders import private_folder
from actors.shm.handoff import SlotWriter
from actors.storage.replay_buffer import ReplayBufferActor
from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, RayReplayBuffer
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env, faulty_counting_env, kill_worker


def wait_done(c, timeout=60.0):
    deadline = time.monotonic() + timeout
    while c.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.is_running(), "background collection did not finish"


def stored_frames(rb, n):
    storage = rb.state_dict()["storage"][:n]
    return list(zip(storage["collector", "traj_ids"].tolist(), storage["observation"][:, 0].tolist()))


def exact(stats, rb):
    for p in stats["per_worker"]:
        assert p["frames"] == p["delivered"] + sum(p["dropped"].values()), p
    assert sorted(map(tuple, rb.batch_ids())) == sorted(map(tuple, stats["written_batch_ids"]))
    assert rb.write_count == len(rb) == stats["frames"]
    frames = stored_frames(rb, rb.write_count)
    assert len(set(frames)) == len(frames)  # no (trajectory, step) frame twice


@pytest.mark.parametrize("cls", [MultiaSyncDataCollector, MultiSyncDataCollector])
def test_start_writes_through_shared_memory_to_exactly_total_frames(cls):
    rb = RayReplayBuffer(10_000)
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    try:
        with cls(counting_env, policy, num_workers=3, frames_per_batch=30, total_frames=300,
                 replay_buffer=rb) as c:
            c.start()
            wait_done(c)
            stats = c.stats()
        assert stats["shared_memory_writes"] == len(stats["written_batch_ids"]) == stats["batches"] > 0
        assert stats["frames"] == 300
        exact(stats, rb)
        assert {w for _, _, w, _, _ in map(tuple, rb.batch_ids())} == {0, 1, 2}
    finally:
        rb.shutdown()


def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_doubled():
    rb = RayReplayBuffer(100_000)
    try:
        with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=20,
                                     total_frames=4000, replay_buffer=rb) as c:
            c.start()
            deadline = time.monotonic() + 30
            while rb.write_count < 400 and time.monotonic() < deadline:
                time.sleep(0.01)
            kill_worker(c, 1)
            wait_done(c)
            stats = c.stats()
        assert stats["restarts"] == 1
        assert stats["shared_memory_writes"] > 0 and stats["frames"] == 4000
        exact(stats, rb)
    finally:
        rb.shutdown()


@pytest.mark.parametrize("mode, reason", [("hang_step", "timeout"), ("exit", "worker_died")])
def test_a_hung_or_exiting_worker_is_replaced_and_its_queued_request_counted(mode, reason):
    # 10 ms a step: worker 0 alone needs about 6 s for the 600 frames, past the 2 s deadline
    env = functools.partial(faulty_counting_env, mode, [1], 25, 1, 1000, 0.01)
    rb = RayReplayBuffer(100_000)
    try:
        with MultiaSyncDataCollector(env, num_workers=2, frames_per_batch=10, total_frames=600,
                                     replay_buffer=rb, sample_timeout_s=2.0) as c:
            c.start()
            wait_done(c, timeout=90)
            stats = c.stats()
        assert stats["restarts"] == 1 and stats["frames"] == 600
        dropped = stats["per_worker"][1]["dropped"]
        # the failed request and the one queued behind it (two in flight per actor)
        assert dropped.get(reason, 0) + dropped.get("worker_died", 0) >= 10
        exact(stats, rb)
        assert stats["shared_memory_writes"] > 0
    finally:
        rb.shutdown()


def test_the_feed_follows_a_restarted_buffer():
    rb = RayReplayBuffer(100_000, max_restarts=1)
    try:
        with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=20,
                                     replay_buffer=rb, write_timeout_s=60) as c:
            c.start()
            deadline = time.monotonic() + 30
            while rb.write_count < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(rb.info()["pid"], signal.SIGKILL)  # no checkpoint: it comes back empty
            while rb.write_count < 200 and time.monotonic() < deadline + 30:
                time.sleep(0.05)  # writes go on into the new incarnation
            assert c.is_running() and c.background_error() is None
            c.async_shutdown()
            stats = c.stats()
        assert rb.write_count >= 200 and stats["shared_memory_writes"] > 0
        frames = stored_frames(rb, len(rb))
        assert len(set(frames)) == len(frames)
    finally:
        rb.shutdown()


def test_stop_fences_the_feed_and_pause_holds_it():
    rb = RayReplayBuffer(1_000_000)
    try:
        c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, replay_buffer=rb)
        c.start()
        deadline = time.monotonic() + 30
        while rb.write_count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with c.pause():
            held = rb.write_count
            time.sleep(0.5)  # (nothing may land meanwhile: there is no event to wait for)
            assert rb.write_count == held
        while rb.write_count == held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rb.write_count > held
        c.async_shutdown()
        stopped = rb.write_count
        time.sleep(0.5)
        assert rb.write_count == stopped
        stats = c.stats()
        exact(stats, rb)
        assert stats["shared_memory_writes"] > 0
    finally:
        rb.shutdown()


def test_a_checkpointing_buffer_keeps_the_object_store_path(tmp_path):
    rb = RayReplayBuffer(10_000, checkpoint_dir=str(tmp_path / "rb"), checkpoint_every=5)
    try:
        with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10,
                                     total_frames=100, replay_buffer=rb) as c:
            c.start()
            wait_done(c)
            stats = c.stats()
        assert stats["shared_memory_writes"] == 0 and rb.write_count == 100
    finally:
        rb.shutdown()


def worker_arrays(worker: int, start: int, envs=1, steps=5, valid=None) -> dict:
    obs = np.arange(start, start + envs * steps, dtype=np.float32).reshape(envs, steps, 1)
    ids = np.full((envs, steps), worker, np.int64)
    if valid is not None:
        ids[:, valid:] = -1
    return {"observation": obs, ("next", "observation"): obs + 1,
            ("collector", "traj_ids"): ids}


def test_intake_writes_a_group_once_and_answers_per_batch():
    """The buffer body in this process: a group is written in one go, a resent group stores
    nothing twice, a fenced epoch writes nothing, a padded batch counts its real frames."""
    from multiprocessing.connection import Client

    folder, fd = private_folder("test-")
    buffer = ReplayBufferActor(1000)
    try:
        slots = [SlotWriter(folder, f"w{i}") for i in range(3)]
        items = []
        for i, slot in enumerate(slots):
            path, layout, inline = slot.write(worker_arrays(i, 100 * i, valid=3 if i == 2 else None))
            items.append((("c", "x", i, 0, 1), (path, layout, inline)))
        conn = Client(buffer.open_intake(folder), family="AF_UNIX")
        conn.send(("e1", items))
        assert conn.recv() == [{"frames": 5}, {"frames": 5}, {"frames": 3}]
        assert buffer.write_count == 13 and buffer.batches == 3
        conn.send(("e1", items))  # a resend: each id is stored already
        assert conn.recv() == [{"frames": 0}] * 3 and buffer.write_count == 13
        buffer.fence("e2")
        conn.send(("e2", [(("c", "x", 0, 0, 2), items[0][1])]))
        assert conn.recv() == [{"frames": 0, "fenced": True}]
        stored = buffer.storage["observation"][:13, 0].tolist()
        assert stored == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104, 200, 201, 202]
        conn.close()
    finally:
        buffer.close()
        os.close(fd)


class AlwaysOne(nn.Module):
    """Action 1 for every observation: a random action shows as a 0 now and then."""

    def forward(self, obs):
        return torch.ones(obs.shape[:-1], dtype=torch.int64)


@pytest.mark.parametrize("checkpoints", [False, True])
def test_start_takes_random_actions_for_init_random_frames(tmp_path, checkpoints):
    kwargs = {"checkpoint_dir": str(tmp_path / "rb"), "checkpoint_every": 10} if checkpoints else {}
    rb = RayReplayBuffer(10_000, **kwargs)
    try:
        with MultiaSyncDataCollector(counting_env, AlwaysOne(), num_workers=2, frames_per_batch=10,
                                     total_frames=400, init_random_frames=100,
                                     replay_buffer=rb) as c:
            c.start()
            wait_done(c)
            stats = c.stats()
        assert (stats["shared_memory_writes"] > 0) != checkpoints  # both routes
        actions = rb.state_dict()["storage"]["action"][:400]
        assert (actions[:100] == 0).any()  # random: P(100 ones) = 2**-100
        assert (actions[200:] == 1).all()  # the policy's, once 100 frames were written
    finally:
        rb.shutdown()
