"""The local route (collectors/local_route.py): with every env actor on the trainer's node,
weights go through the shared-memory board and sync batches through each actor's slot; the
driver still keeps the ledger and handles every failure."""
import functools
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import ray
import torch
from torch import nn

from actors.shm.folders import private_root
from collectors import (CollectorError, MultiaSyncDataCollector, MultiSyncDataCollector,
                        RayReplayBuffer, SyncDataCollector)
from collectors.testing import counting_env, faulty_counting_env, kill_worker
from conftest import alive_actor_names
from test_faults import invariant

SLOW = functools.partial(faulty_counting_env, "raise_step", [99], delay_s=0.02)  # no fault, 20 ms a step


class ConstAction(nn.Module):
    """Action = a buffer the trainer changes in place (the weights must carry it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.a.expand(x.shape[0])


def kill_and_wait(collector, index: int) -> None:
    """Kill worker ``index`` and wait for its process to end (``ray.kill`` returns before: a
    request sent straight to its socket meanwhile may still be served)."""
    pid = collector.worker_info[index]["pid"]
    kill_worker(collector, index)
    psutil.Process(pid).wait(30) if psutil.pid_exists(pid) else None


def no_duplicate_frames(batches):
    frames = [(int(t), float(o)) for b in batches for t, o in
              zip(b.get(("collector", "traj_ids")).reshape(-1), b["observation"].reshape(-1, 1)[:, 0])]
    assert len(frames) == len(set(frames))


def test_batches_through_shared_memory_equal_those_by_ray_calls():
    runs = {}
    for shared in (True, False):
        with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=24,
                                    total_frames=96, seed=3, shared_memory=shared) as c:
            runs[shared] = (torch.stack(list(c)), c.stats())
    (local, stats), (driver, driver_stats) = runs[True], runs[False]  # False: the Ray route
    assert stats["shared_memory_batches"] == 4 and driver_stats["shared_memory_batches"] == 0
    assert stats["direct_batches"] == 0 and driver_stats["direct_batches"] == 8  # worker batches
    assert (local == driver).all()
    assert local.shape == (4, 2, 12)
    assert (local.get(("collector", "worker_id"))[:, 1] == 1).all()
    for s in (stats, driver_stats):
        assert s["frames"] == 96 and [p["delivered"] for p in s["per_worker"]] == [48, 48]
        invariant(s)


def test_the_driver_figures_include_every_batch_when_asked():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=-1) as c:
        for n in range(1, 6):
            c.next()
            stats = c.stats()
            assert stats["per_worker"][0]["delivered"] == 10 * n  # settled before stats answers
        assert stats["shared_memory_batches"] == 5


def test_in_place_weight_changes_reach_the_next_batch_through_the_board():
    policy = ConstAction()
    with SyncDataCollector(counting_env, policy, frames_per_batch=10, total_frames=-1) as c:
        assert (c.next()["action"] == 0).all()
        policy.a.fill_(1)
        batch = c.next()
        assert (batch["action"] == 1).all()
        assert (batch.get(("collector", "policy_version")) == 1).all()
        assert c._route.board.writes == 1  # written once into shared memory
        batch = c.next()  # unchanged: nothing written
        assert c._route.board.writes == 1 and (batch["action"] == 1).all()


def test_weights_for_some_workers_reach_only_those():
    policy = ConstAction()
    with MultiSyncDataCollector(counting_env, policy, num_workers=3, frames_per_batch=15,
                                total_frames=-1, auto_sync_weights=False) as c:
        c.next()
        policy.a.fill_(7)
        c.update_policy_weights_(worker_ids=[1])
        batch = c.next()
        assert batch["action"][:, 0].tolist() == [0, 7, 0]
        assert batch.get(("collector", "policy_version"))[:, 0].tolist() == [0, 1, 0]
        c.update_policy_weights_()
        batch = c.next()
        assert batch["action"][:, 0].tolist() == [7, 7, 7]
        assert batch.get(("collector", "policy_version"))[:, 0].tolist() == [2, 2, 2]
        assert c.stats()["shared_memory_batches"] == 3


def test_a_replacement_worker_starts_from_the_weights_on_the_board():
    policy = ConstAction()
    with SyncDataCollector(counting_env, policy, frames_per_batch=10, total_frames=-1) as c:
        policy.a.fill_(3)
        assert (c.next()["action"] == 3).all()
        kill_and_wait(c, 0)
        batch = c.next()
        assert c.stats()["restarts"] == 1
    assert (batch["action"] == 3).all()
    assert (batch.get(("collector", "policy_version")) == 1).all()


@pytest.mark.parametrize("kill", ["between_batches", "exit_mid_batch", "sigkill_during_the_wait"])
def test_a_worker_lost_during_a_hand_off_is_replaced_and_nothing_counts_twice(kill):
    env = {"between_batches": counting_env, "sigkill_during_the_wait": SLOW,
           "exit_mid_batch": functools.partial(faulty_counting_env, "exit", [0], 45, 1)}[kill]
    with SyncDataCollector(env, frames_per_batch=10, total_frames=80, name=f"local-{kill}") as c:
        it = iter(c)
        batches = [next(it) for _ in range(4)]
        if kill == "between_batches":
            kill_and_wait(c, 0)
        elif kill == "sigkill_during_the_wait":  # 0.1 s into a 0.2 s batch
            pid = c.worker_info[0]["pid"]
            threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()
        batches += list(it)
        stats = c.stats()
    assert sum(b.numel() for b in batches) == 80
    assert stats["restarts"] == 1
    assert stats["per_worker"][0]["dropped"] == {"worker_died": 10}
    assert stats["per_worker"][0]["delivered"] == 80
    assert stats["shared_memory_batches"] == 8  # the replacement served the same round
    no_duplicate_frames(batches)
    invariant(stats)


@pytest.mark.parametrize("shared_memory", [None, False])  # False: the Ray route
def test_a_hanging_worker_misses_its_deadline_and_is_replaced(shared_memory):
    env = functools.partial(faulty_counting_env, "hang_step", [0], 45, 1)  # in batch 5
    with SyncDataCollector(env, frames_per_batch=10, total_frames=80, sample_timeout_s=2.0,
                           shared_memory=shared_memory, name="local-hang") as c:
        t0 = time.monotonic()
        batches = list(c)
        took = time.monotonic() - t0
        stats = c.stats()
    assert [b.numel() for b in batches] == [10] * 8
    assert took < 30
    assert stats["per_worker"][0]["timeouts"] == 1 and stats["restarts"] == 1
    assert stats["per_worker"][0]["dropped"] == {"timeout": 10}
    invariant(stats)


@pytest.mark.parametrize("shared_memory", [None, False])  # False: the Ray route
def test_an_error_in_a_worker_raises_as_through_the_driver(shared_memory):
    env = functools.partial(faulty_counting_env, "raise_step", [0], 45, 1)  # in batch 5
    c = SyncDataCollector(env, frames_per_batch=10, on_worker_error="raise",
                          shared_memory=shared_memory, name="local-raise")
    try:
        for _ in range(4):
            c.next()
        with pytest.raises(CollectorError, match="worker 0 .* failed with") as info:
            c.next()
        assert info.value.worker == 0 and "injected fault: step raises" in str(info.value)
    finally:
        c.shutdown(raise_on_error=False)


def test_an_env_error_reaches_the_driver_log_through_the_bulk_ledger():
    env = functools.partial(faulty_counting_env, "raise_step", [1], 25, 1)  # worker 1, batch 3
    with MultiSyncDataCollector(env, num_workers=2, frames_per_batch=20, total_frames=100) as c:
        batches = list(c)
        stats = c.stats()
    assert [b.shape for b in batches] == [(2, 10)] * 5
    assert stats["shared_memory_batches"] == 5 and stats["restarts"] == 0
    assert [p["env_errors"] for p in stats["per_worker"]] == [0, 1]
    [logged] = stats["env_error_log"]
    assert logged["worker"] == 1 and "injected fault: step raises" in logged["traceback"]
    invariant(stats)


def test_waiting_env_actors_and_a_waiting_trainer_use_no_core():
    with SyncDataCollector(SLOW, frames_per_batch=25, total_frames=-1) as c:
        c.next()
        worker = psutil.Process(c.worker_info[0]["pid"])
        worker.cpu_percent(None)
        time.sleep(1.0)  # the trainer trains; the actor waits for a request
        idle = worker.cpu_percent(None)
        assert idle < 5, f"the waiting env actor used {idle:.0f}% of a core"
        t0, cpu0 = time.monotonic(), time.thread_time()
        c.next()  # 25 steps of 20 ms: the trainer waits about 0.5 s
        waited, used = time.monotonic() - t0, time.thread_time() - cpu0
        assert waited > 0.4 and used < 0.05 * waited, (waited, used)
        assert c.stats()["shared_memory_batches"] == 2


def test_the_folder_is_private_and_removed_at_shutdown():
    c = SyncDataCollector(counting_env, ConstAction(), frames_per_batch=10, total_frames=-1)
    folder = c._route.folder
    try:
        c.next()
        st = os.lstat(folder)
        assert os.path.dirname(folder) == private_root()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        for name in os.listdir(folder):
            assert stat.S_IMODE(os.lstat(os.path.join(folder, name)).st_mode) & 0o077 == 0, name
    finally:
        c.shutdown()
    assert not os.path.exists(folder)
    c.shutdown()  # idempotent


def test_a_trainer_killed_mid_read_leaves_no_actor_and_its_folder_is_reclaimed():
    address = ray.get_runtime_context().gcs_address
    script = textwrap.dedent(f"""
        import functools, ray
        ray.init(address={address!r})
        from collectors import SyncDataCollector
        from collectors.testing import faulty_counting_env
        env = functools.partial(faulty_counting_env, "raise_step", [99], delay_s=0.05)
        c = SyncDataCollector(env, frames_per_batch=200, name="killed-trainer")
        print(c._route.folder, flush=True)
        while True:
            c.next()  # 10 s a batch: killed while it waits
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        folder = proc.stdout.readline().strip()
        assert os.path.isdir(folder)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 60
        while alive_actor_names("killed-trainer/") and time.time() < deadline:
            time.sleep(0.5)
        assert alive_actor_names("killed-trainer/") == []
        assert os.path.isdir(folder)  # nobody removed it: the next collector does
        with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=10) as c:
            list(c)
        assert not os.path.exists(folder)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_shared_memory_true_where_it_cannot_apply_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="shared_memory=True.*prefetch=2"):
        MultiaSyncDataCollector(counting_env, num_workers=1, frames_per_batch=10,
                                shared_memory=True, prefetch=2)
    with pytest.raises(ValueError, match="shared_memory=True.*preemptive_threshold"):
        MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10,
                               preemptive_threshold=0.5, shared_memory=True)
    rb = RayReplayBuffer(100)
    try:
        with pytest.raises(ValueError, match="shared_memory=True.*RayReplayBuffer"):
            SyncDataCollector(counting_env, frames_per_batch=10, shared_memory=True,
                              replay_buffer=rb)
    finally:
        rb.shutdown()
    with pytest.raises(ValueError, match="shared_memory"):
        SyncDataCollector(counting_env, frames_per_batch=10, shared_memory="yes")
    with pytest.raises(TypeError, match="compiled_graph"):  # the option it replaced is gone
        SyncDataCollector(counting_env, frames_per_batch=10, compiled_graph=True)


def test_shared_memory_false_uses_ray_for_batches_and_weights():
    policy = ConstAction()
    with SyncDataCollector(counting_env, policy, frames_per_batch=10, total_frames=-1,
                           shared_memory=False) as c:
        c.next()
        policy.a.fill_(2)
        batch = c.next()
        assert c._route.board is None and c.stats()["shared_memory_batches"] == 0
    assert (batch["action"] == 2).all()


def test_async_collectors_take_weights_from_the_board():
    policy = ConstAction()
    with MultiaSyncDataCollector(counting_env, policy, num_workers=2, frames_per_batch=10,
                                 total_frames=-1, auto_sync_weights=False) as c:
        c.next()
        policy.a.fill_(5)
        c.update_policy_weights_()
        assert c._route.board.writes == 1
        seen = [c.next() for _ in range(8)]  # runs ahead by up to prefetch batches per worker
    last = seen[-1]
    assert (last["action"] == 5).all() and (last.get(("collector", "policy_version")) == 1).all()
    for b in seen:  # one version per batch, and its action with it
        versions = b.get(("collector", "policy_version")).unique().tolist()
        assert len(versions) == 1 and (b["action"] == 5 * versions[0]).all()


def test_a_short_dev_shm_keeps_batches_on_ray_calls_and_weights_on_the_board(monkeypatch):
    import collectors.local_route as route

    monkeypatch.setattr(route, "shareable", lambda nbytes: nbytes <= 1 << 20)  # 1 MiB of room
    policy = ConstAction()
    with SyncDataCollector(counting_env, policy, frames_per_batch=20_000, total_frames=-1) as c:
        policy.a.fill_(4)  # (a 20,000-frame slot needs about 6 MiB)
        batch = c.next()
        stats = c.stats()
        assert stats["shared_memory_batches"] == 0 and stats["direct_batches"] == 1
        assert c._route.board.writes == 1
    assert (batch["action"] == 4).all() and batch.numel() == 20_000
    with pytest.raises(ValueError, match="shared_memory=True.*/dev/shm has room"):
        SyncDataCollector(counting_env, frames_per_batch=20_000, shared_memory=True)


# -- async collectors through the hand-off ---------------------------------------------------
def test_async_batches_come_through_shared_memory_whole_and_in_order_per_worker():
    fast = functools.partial(counting_env, 4)
    slow = functools.partial(faulty_counting_env, "raise_step", [99], delay_s=0.01)  # 50 ms/batch
    with MultiaSyncDataCollector([fast, slow], frames_per_batch=5, total_frames=-1,
                                 name="async-local") as c:
        got, t0 = [], time.monotonic()
        while time.monotonic() - t0 < 1.0:
            got.append(c.next())
        stats = c.stats()
    assert stats["shared_memory_batches"] == len(got)
    by_worker = {0: [], 1: []}
    for b in got:
        assert b.batch_size == (5,)
        by_worker[int(b["collector", "worker_id"][0])].append(b)
    assert len(by_worker[1]) >= 5, "the slow worker was passed over"
    assert len(by_worker[0]) > 3 * len(by_worker[1])  # the fast one is not held back
    counts = torch.cat([b["observation"][:, 0] for b in by_worker[0]]).tolist()
    assert counts == [0, 1, 2, 3] * (len(counts) // 4) + [0, 1, 2, 3][:len(counts) % 4]
    no_duplicate_frames(got)
    # the requests still in flight at shutdown are counted dropped, as on the driver's route
    for p in stats["per_worker"]:
        assert p["delivered"] == 5 * len(by_worker[stats["per_worker"].index(p)])
    final = c.stats()
    assert all(p["dropped"].get("cancelled") == 5 for p in final["per_worker"])
    invariant(final)


def test_async_worker_killed_is_replaced_and_nothing_counts_twice():
    with MultiaSyncDataCollector([counting_env, counting_env], frames_per_batch=10,
                                 total_frames=200, name="async-kill") as c:
        it = iter(c)
        got = [next(it) for _ in range(4)]
        kill_and_wait(c, 1)
        got += list(it)
        stats = c.stats()
    assert sum(b.numel() for b in got) == 200 and stats["restarts"] == 1
    assert stats["per_worker"][1]["dropped"] == {"worker_died": 10}
    assert stats["shared_memory_batches"] == 20
    no_duplicate_frames(got)
    invariant(stats)
