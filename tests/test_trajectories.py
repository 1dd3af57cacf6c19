"""``trajs_per_batch``: batches of whole trajectories, as TorchRL 0.14 yields them, and complete
trajectories only into a replay buffer in this process."""
import functools

import pytest
import torch

from collectors import (MultiSyncDataCollector, RayReplayBuffer, SyncDataCollector)
from collectors.testing import counting_env


def collect(collector):
    try:
        return list(collector)
    finally:
        collector.shutdown()


@pytest.mark.parametrize("traj_format", ["padded", "cat"])
def test_each_batch_holds_whole_episodes(traj_format):
    # episodes of 5 frames (obs 0..4, done at the 5th), batches of 3 frames: every episode spans
    # two or three batches
    got = collect(SyncDataCollector(counting_env, frames_per_batch=3, total_frames=30,
                                    trajs_per_batch=2, traj_format=traj_format))
    assert len(got) == 3  # 30 frames: six episodes, three batches of two
    for b in got:
        if traj_format == "padded":
            assert b.batch_size == (2, 5) and b["collector", "mask"].all()
            rows = [b[i] for i in range(2)]
        else:
            assert b.batch_size == (10,) and int(b["next", "done"].sum()) == 2
            rows = [b[:5], b[5:]]
        for row in rows:
            assert row["observation"].flatten().tolist() == [0, 1, 2, 3, 4]
            assert row["next", "done"].flatten().tolist() == [False] * 4 + [True]
            assert len(set(row["collector", "traj_ids"].tolist())) == 1
    ids = [int(b["collector", "traj_ids"].flatten()[0]) for b in got]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_padded_rows_are_masked_and_unfinished_episodes_are_held_back():
    # episodes of 3 frames, one batch of 8: two whole episodes and two frames of a third
    got = collect(SyncDataCollector(functools.partial(counting_env, 3), frames_per_batch=8,
                                    total_frames=8, trajs_per_batch=2, traj_format="padded"))
    assert len(got) == 1 and got[0].batch_size == (2, 3)  # two whole episodes of 3; the third waits
    torch.testing.assert_close(got[0]["collector", "mask"], torch.ones(2, 3, dtype=torch.bool))


def test_format_unset_warns_as_torchrl_and_means_padded():
    with pytest.warns(FutureWarning, match="traj_format"):
        c = SyncDataCollector(counting_env, frames_per_batch=5, total_frames=10, trajs_per_batch=1)
    got = collect(c)
    assert got[0].batch_size == (1, 5)


def test_next_gives_trajectory_batches():
    c = SyncDataCollector(counting_env, frames_per_batch=3, total_frames=15, trajs_per_batch=1,
                          traj_format="cat")
    try:
        first, second = c.next(), c.next()
        assert first.batch_size == second.batch_size == (5,)
        assert first["collector", "traj_ids"][0] != second["collector", "traj_ids"][0]
    finally:
        c.shutdown()


def test_multi_collector_rows_never_mix_workers():
    got = collect(MultiSyncDataCollector([counting_env, functools.partial(counting_env, 3)],
                                         frames_per_batch=8, total_frames=48, trajs_per_batch=3,
                                         traj_format="padded"))
    assert got
    for b in got:
        for row, mask in zip(b, b["collector", "mask"]):
            workers = set(row["collector", "worker_id"][mask].tolist())
            assert len(workers) == 1
            length = int(mask.sum())
            assert length == (5 if workers == {0} else 3)  # each worker's own episode length


class CountingWrites:
    """A replay buffer in this process that remembers each write."""

    def __init__(self):
        self.writes = []

    def extend(self, data):
        self.writes.append(data.clone())


def test_replay_buffer_gets_complete_trajectories_flat_in_groups():
    rb = CountingWrites()
    out = collect(SyncDataCollector(counting_env, frames_per_batch=10, total_frames=30,
                                    trajs_per_batch=4, replay_buffer=rb, trajs_per_write=2))
    assert out == [None, None, None]
    sizes = [w.batch_size for w in rb.writes]
    assert sizes == [(10,), (10,), (10,)]  # each batch completes two episodes: one write of two
    frames = torch.cat(rb.writes)
    assert frames["observation"].flatten().tolist() == [0, 1, 2, 3, 4] * 6
    assert int(frames["next", "done"].sum()) == 6


def test_replay_buffer_holds_back_an_unfinished_episode():
    rb = CountingWrites()
    collect(SyncDataCollector(counting_env, frames_per_batch=7, total_frames=7,
                              trajs_per_batch=1, replay_buffer=rb))
    assert [w["observation"].flatten().tolist() for w in rb.writes] == [[0, 1, 2, 3, 4]]


def test_options_that_would_do_nothing_or_cannot_work_are_refused():
    with pytest.raises(ValueError, match="traj_format='cat' has no effect unless trajs_per_batch"):
        SyncDataCollector(counting_env, frames_per_batch=5, traj_format="cat")
    with pytest.raises(ValueError, match="trajs_per_write=2 sizes replay buffer writes"):
        SyncDataCollector(counting_env, frames_per_batch=5, trajs_per_batch=1, trajs_per_write=2,
                          traj_format="cat")
    with pytest.raises(ValueError, match="split_trajs=True"):
        SyncDataCollector(counting_env, frames_per_batch=5, trajs_per_batch=1, split_trajs=True,
                          traj_format="cat")
    with pytest.raises(ValueError, match="traj_format"):
        SyncDataCollector(counting_env, frames_per_batch=5, trajs_per_batch=1, traj_format="flat")
    with pytest.raises(ValueError, match="trajs_per_batch"):
        SyncDataCollector(counting_env, frames_per_batch=5, trajs_per_batch=0)
    rb = RayReplayBuffer(100)
    try:
        with pytest.raises(ValueError, match="RayReplayBuffer is not supported"):
            SyncDataCollector(counting_env, frames_per_batch=5, trajs_per_batch=1, replay_buffer=rb)
    finally:
        rb.shutdown()


def test_same_trajectory_batches_as_torchrl():
    pytest.importorskip("torchrl", reason="install the torchrl extra")
    from torchrl.collectors import Collector
    from torchrl.testing.mocking_classes import CountingEnv, CountingEnvCountPolicy

    make = functools.partial(CountingEnv, max_steps=3)
    policy = CountingEnvCountPolicy(make().action_spec)
    for traj_format in ("padded", "cat"):
        theirs = Collector(make, policy, frames_per_batch=5, total_frames=40, trajs_per_batch=2,
                           traj_format=traj_format)
        want = list(theirs)
        theirs.shutdown()
        got = collect(SyncDataCollector(make, policy, frames_per_batch=5, total_frames=40,
                                        trajs_per_batch=2, traj_format=traj_format))
        assert len(got) == len(want) == 5
        for a, b in zip(got, want):
            assert a.batch_size == b.batch_size
            for key in ("observation", ("next", "done"), ("collector", "traj_ids")):
                assert torch.equal(a[key], b[key]), key
            if traj_format == "padded":
                assert torch.equal(a["collector", "mask"], b["collector", "mask"])
