"""The Ray route (collectors/ray_route.py): when batches cannot go through shared memory (env
actors on other nodes, shared_memory=False, no room in /dev/shm) the trainer asks the env actors
itself by Ray calls; the driver still keeps the ledger (fed in bulk) and handles every failure.
Here shared_memory=False puts the batches on it on one node. (Hangs and raised errors: the
local route's tests run on both routes.)"""
import functools

import pytest

from collectors import MultiaSyncDataCollector, MultiSyncDataCollector, SyncDataCollector
from collectors.testing import counting_env, faulty_counting_env
from test_faults import invariant
from test_local_route import kill_and_wait, no_duplicate_frames


def test_the_driver_figures_include_every_batch_when_asked():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=-1, shared_memory=False) as c:
        for n in range(1, 6):
            c.next()
            assert c.stats()["per_worker"][0]["delivered"] == 10 * n  # settled before stats


@pytest.mark.parametrize("cls", [SyncDataCollector, MultiaSyncDataCollector])
def test_a_killed_worker_is_replaced_and_nothing_counts_twice(cls):
    kwargs = {} if cls is SyncDataCollector else {"num_workers": 2}
    total = 80 if cls is SyncDataCollector else 200
    with cls(counting_env, frames_per_batch=10, total_frames=total, shared_memory=False,
             name=f"ray-route-kill-{cls.__name__}", **kwargs) as c:
        it = iter(c)
        got = [next(it) for _ in range(4)]
        kill_and_wait(c, 0)
        got += list(it)
        stats = c.stats()
    assert sum(b.numel() for b in got) == total and stats["restarts"] == 1
    assert stats["per_worker"][0]["dropped"] == {"worker_died": 10}
    assert stats["direct_batches"] == total // 10 and stats["shared_memory_batches"] == 0
    no_duplicate_frames(got)
    invariant(stats)


def test_an_env_error_is_logged_and_the_worker_goes_on():
    env = functools.partial(faulty_counting_env, "raise_step", [1], 25, 1)  # worker 1, batch 3
    with MultiSyncDataCollector(env, num_workers=2, frames_per_batch=20, total_frames=100,
                                shared_memory=False) as c:
        batches = list(c)
        stats = c.stats()
    assert [b.shape for b in batches] == [(2, 10)] * 5 and stats["restarts"] == 0
    assert [p["env_errors"] for p in stats["per_worker"]] == [0, 1]
    invariant(stats)
