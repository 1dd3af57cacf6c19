"""A one-worker sync collector takes batches through a Ray compiled graph from its third batch
on (collectors/direct_path.py); the driver still accounts them and handles every failure."""
import functools
import time

import psutil

import pytest
import torch
from torch import nn

from collectors import (CollectorError, MultiaSyncDataCollector, MultiSyncDataCollector,
                        RayReplayBuffer, SyncDataCollector)
from collectors.testing import counting_env, faulty_counting_env, kill_worker
from test_faults import invariant


class ConstAction(nn.Module):
    """Action = a buffer the trainer changes in place (weights sync must carry it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.a.expand(x.shape[0])


def test_batches_through_the_graph_equal_those_through_the_driver():
    runs = {}
    for compiled in (True, False):
        with SyncDataCollector(counting_env, frames_per_batch=12, total_frames=96, seed=3,
                               compiled_graph=compiled) as c:
            batches = list(c)
            runs[compiled] = (torch.stack(batches), c.stats())
    (graph, stats), (driver, driver_stats) = runs[True], runs[False]
    assert stats["compiled_graph_batches"] == 6  # batches 3..8
    assert driver_stats["compiled_graph_batches"] == 0
    assert (graph == driver).all()
    assert graph.get(("collector", "traj_ids")).unique().numel() == 96 // 5 + 1  # 5-step episodes
    for s in (stats, driver_stats):
        assert s["frames"] == 96 and s["per_worker"][0]["delivered"] == 96
        invariant(s)


def test_stats_follow_each_batch_of_the_graph():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=-1,
                           compiled_graph=True) as c:
        for n in range(1, 6):
            c.next()
            stats = c.stats()
            assert stats["per_worker"][0]["delivered"] == 10 * n  # settled before stats answers
        assert stats["compiled_graph_batches"] == 3


def test_in_place_weight_changes_reach_the_next_graph_batch():
    policy = ConstAction()
    with SyncDataCollector(counting_env, policy, frames_per_batch=10, total_frames=-1,
                           compiled_graph=True) as c:
        for _ in range(4):
            assert (c.next()["action"] == 0).all()
        policy.a.fill_(1)
        batch = c.next()
        assert c.stats()["compiled_graph_batches"] == 3
    assert (batch["action"] == 1).all()
    assert (batch.get(("collector", "policy_version")) == 1).all()


@pytest.mark.parametrize("kill", ["between_batches", "exit_mid_batch"])
def test_a_worker_lost_on_the_graph_is_replaced_and_the_graph_reopens(kill):
    env = counting_env if kill == "between_batches" else \
        functools.partial(faulty_counting_env, "exit", [0], 45, 1)  # in batch 5
    with SyncDataCollector(env, frames_per_batch=10, total_frames=100, name=f"direct-{kill}",
                           compiled_graph=True) as c:
        it = iter(c)
        batches = [next(it) for _ in range(4)]  # 3 and 4 through the graph
        if kill == "between_batches":
            kill_worker(c, 0)
        batches += list(it)
        stats = c.stats()
    assert sum(b.numel() for b in batches) == 100
    assert stats["restarts"] == 1
    assert stats["per_worker"][0]["dropped"] == {"worker_died": 10}
    # batch 5 came through the driver (it replaced the worker); 6..10 through a new graph
    assert stats["compiled_graph_batches"] == 2 + 5
    invariant(stats)


def test_a_worker_hanging_on_the_graph_times_out_and_is_replaced():
    env = functools.partial(faulty_counting_env, "hang_step", [0], 45, 1)  # in batch 5
    with SyncDataCollector(env, frames_per_batch=10, total_frames=80, sample_timeout_s=2.0,
                           compiled_graph=True,
                           name="direct-hang") as c:
        batches = list(c)
        stats = c.stats()
    assert [b.numel() for b in batches] == [10] * 8
    assert stats["per_worker"][0]["timeouts"] == 1 and stats["restarts"] == 1
    assert stats["per_worker"][0]["dropped"] == {"timeout": 10}
    invariant(stats)


def test_an_error_on_the_graph_raises_as_through_the_driver():
    env = functools.partial(faulty_counting_env, "raise_step", [0], 45, 1)  # in batch 5
    c = SyncDataCollector(env, frames_per_batch=10, on_worker_error="raise", name="direct-raise",
                          compiled_graph=True)
    try:
        for _ in range(4):
            c.next()
        with pytest.raises(CollectorError, match="worker 0 .* failed with") as info:
            c.next()
        assert info.value.worker == 0 and "injected fault: step raises" in str(info.value)
    finally:
        c.shutdown(raise_on_error=False)


def test_compiled_graph_true_where_it_cannot_apply_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="compiled_graph=True.*one worker"):
        MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10,
                               compiled_graph=True)
    with pytest.raises(ValueError, match="compiled_graph=True.*one worker"):
        MultiaSyncDataCollector(counting_env, num_workers=1, frames_per_batch=10,
                                compiled_graph=True)
    rb = RayReplayBuffer(100)
    try:
        with pytest.raises(ValueError, match="compiled_graph=True.*RayReplayBuffer"):
            SyncDataCollector(counting_env, frames_per_batch=10, compiled_graph=True,
                              replay_buffer=rb)
    finally:
        rb.shutdown()
    with pytest.raises(ValueError, match="compiled_graph"):
        SyncDataCollector(counting_env, frames_per_batch=10, compiled_graph="yes")


def test_compiled_graph_false_never_opens_one():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=60,
                           compiled_graph=False) as c:
        list(c)
        assert c.stats()["compiled_graph_batches"] == 0


def test_the_graph_opens_by_itself_for_a_trainer_that_asks_again_at_once():
    with SyncDataCollector(counting_env, frames_per_batch=12, total_frames=120) as c:
        batches = list(c)  # nothing between batches
        stats = c.stats()
    assert len(batches) == 10 and stats["compiled_graph_batches"] >= 1


def test_a_trainer_that_works_between_batches_gets_the_graph_closed_and_the_worker_rests():
    """An env actor waiting on a graph spins a core (Ray's channel read polls); a trainer away
    longer than a tenth of a collect (at least 5 ms) gets the driver path, whose worker waits
    without one."""
    with SyncDataCollector(counting_env, frames_per_batch=50, total_frames=-1) as c:
        for _ in range(10):
            c.next()
        opened = c.stats()["compiled_graph_batches"]
        assert opened >= 1
        time.sleep(0.3)  # the trainer trains
        c.next()  # the graph closes; this batch comes through the driver
        worker = psutil.Process(c.worker_info[0]["pid"])
        worker.cpu_percent(None)
        time.sleep(1.0)  # the trainer trains again
        busy = worker.cpu_percent(None)
        assert busy < 30, f"the waiting env actor used {busy:.0f}% of a core"
        for _ in range(3):
            time.sleep(0.1)
            c.next()
        assert c.stats()["compiled_graph_batches"] == opened  # no graph for this trainer


def test_compiled_graph_true_keeps_the_graph_while_the_trainer_works():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=-1,
                           compiled_graph=True) as c:
        for _ in range(3):
            c.next()
        time.sleep(0.2)
        c.next()
        assert c.stats()["compiled_graph_batches"] == 2
