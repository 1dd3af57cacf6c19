"""Fault injection: env errors, crashed and hung workers, persistent failures, bad output,
policy bugs, a dying replay buffer, a dying trainer, bounded shutdown, exact accounting."""
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import ray
import torch
from torch import nn

from collectors import (CollectorError, MultiaSyncDataCollector, MultiSyncDataCollector,
                        RayReplayBuffer, ReplayBufferUnavailable, SyncDataCollector)
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env, faulty_counting_env, kill_worker
from conftest import alive_actor_names


def invariant(stats):
    for p in stats["per_worker"]:
        assert p["frames"] == p["delivered"] + sum(p["dropped"].values()), p


def wait_exited(pid: int, timeout_s: float = 10.0) -> None:
    """Until ``pid`` has exited with all its threads, so its sockets are closed: gone, or a
    zombie (or dead, not yet reaped) with no other thread left. A SIGKILLed process's leader
    can show as a zombie while its other threads still exit, holding its files open."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        try:
            status = psutil.Process(pid).status()
            if (status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
                    and len(os.listdir(f"/proc/{pid}/task")) <= 1):
                return
        except (psutil.NoSuchProcess, FileNotFoundError):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running {timeout_s}s after SIGKILL ({status})")


def test_env_step_raises_env_rebuilt_episode_cut():
    env = functools.partial(faulty_counting_env, "raise_step", [1], 5, 1)
    with MultiSyncDataCollector(env, num_workers=2, frames_per_batch=40, total_frames=80) as c:
        batches = list(c)
        stats = c.stats()
    assert [b.numel() for b in batches] == [40, 40]
    assert stats["env_errors"] == 1 and stats["per_worker"][1]["env_errors"] == 1
    assert stats["restarts"] == 0
    w1 = torch.cat([b[1] for b in batches])
    # the failing step (the 5th) is the truncated end of its episode; a new trajectory follows
    assert w1["next", "truncated"][4].item() and w1["next", "done"][4].item()
    assert w1["collector", "traj_ids"][5] > w1["collector", "traj_ids"][4]
    assert w1["observation"][5].item() == 0.0  # fresh env, fresh episode
    assert not w1["next", "truncated"][torch.arange(40) != 4].any()
    invariant(stats)


def test_worker_process_dies_is_replaced_with_current_weights():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    env = functools.partial(faulty_counting_env, "exit", [0], 15, 1)
    with MultiSyncDataCollector(env, policy, num_workers=2, frames_per_batch=20, total_frames=60,
                                name="dies") as c:
        c.update_policy_weights_()  # version 1 before the crash
        batches = list(c)
        stats = c.stats()
        assert sorted(alive_actor_names("dies/")) == ["dies/driver", "dies/env-worker-0-r1",
                                                      "dies/env-worker-1"]
    assert len(batches) == 3 and all(b.numel() == 20 for b in batches)
    assert stats["restarts"] == 1
    assert stats["per_worker"][0]["dropped"] == {"worker_died": 10}
    assert all((b["collector", "policy_version"] == 1).all() for b in batches)
    ids = torch.cat([b["collector", "traj_ids"].flatten() for b in batches])
    w0 = torch.cat([b["collector", "traj_ids"][0] for b in batches])
    assert len(set(w0.tolist()) & set(torch.cat([b["collector", "traj_ids"][1] for b in batches]).tolist())) == 0
    assert ids.numel() == 60
    invariant(stats)


def test_sigkill_of_a_worker_mid_run():
    with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=50,
                                 total_frames=500) as c:
        it = iter(c)
        next(it)
        pid = c.worker_info[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_exited(pid)  # else worker 0 may deliver the other 450 frames before the death shows
        rest = list(it)
        stats = c.stats()
    assert sum(b.numel() for b in rest) == 450
    assert stats["restarts"] == 1
    invariant(stats)


def test_hung_worker_times_out_and_is_replaced():
    env = functools.partial(faulty_counting_env, "hang_step", [1], 3, 1)
    t0 = time.time()
    with MultiSyncDataCollector(env, num_workers=2, frames_per_batch=20, total_frames=40,
                                sample_timeout_s=2.0) as c:
        batches = list(c)
        stats = c.stats()
    assert len(batches) == 2 and all(b.numel() == 20 for b in batches)
    assert stats["per_worker"][1]["timeouts"] == 1 and stats["restarts"] == 1
    assert time.time() - t0 < 30
    invariant(stats)


def test_persistent_env_failure_raises_within_bound():
    env = functools.partial(faulty_counting_env, "raise_step", [0], 1, float("inf"))
    c = MultiSyncDataCollector(env, num_workers=2, frames_per_batch=20, max_restarts=2,
                               restart_backoff_s=0.05, name="persistent")
    t0 = time.time()
    with pytest.raises(CollectorError) as info:
        c.next()
    assert time.time() - t0 < 30
    msg = str(info.value)
    assert "worker 0" in msg and "max_restarts=2" in msg and "injected fault" in msg
    assert "testing.py" in msg  # the traceback of the last error
    assert info.value.worker == 0
    c.shutdown()


def test_restart_backoff_doubles_end_to_end():
    """max_restarts=3 with a 0.3 s backoff: the error comes after 0.3 + 0.6 + 1.2 s of waits
    (a constant backoff would take 0.9 s), and within the documented bound."""
    env = functools.partial(faulty_counting_env, "raise_step", None, 1, float("inf"))
    c = SyncDataCollector(env, frames_per_batch=20, max_restarts=3, restart_backoff_s=0.3,
                          name="backoff")
    try:
        t0 = time.monotonic()
        with pytest.raises(CollectorError, match="max_restarts=3"):
            c.next()
        elapsed = time.monotonic() - t0
    finally:
        c.shutdown()
    assert 2.1 <= elapsed < 2.1 + 20, elapsed


def test_restart_window_lets_old_failures_age_out():
    """An env that fails every 5 steps, 5 x 20 ms of working time apart: with
    restart_window_s=0.05 each failure has left the window before the next, so max_restarts=1
    never trips; with a 60 s window the second failure ends the run."""
    env = functools.partial(faulty_counting_env, "raise_step", None, 5, float("inf"), 1000, 0.02)
    with SyncDataCollector(env, frames_per_batch=40, total_frames=40, max_restarts=1,
                           restart_window_s=0.05, name="window-short") as c:
        batches = list(c)
        stats = c.stats()
    assert [b.numel() for b in batches] == [40]
    assert stats["env_errors"] >= 7  # every failure was rebuilt, none tripped the budget
    c = SyncDataCollector(env, frames_per_batch=40, max_restarts=1, restart_window_s=60,
                          name="window-long")
    try:
        with pytest.raises(CollectorError, match="failed 2 times within 60s"):
            c.next()
    finally:
        c.shutdown()


def test_persistent_crash_raises_collector_error():
    env = functools.partial(faulty_counting_env, "exit", [1], 2, float("inf"))
    c = MultiSyncDataCollector(env, num_workers=2, frames_per_batch=20, max_restarts=1)
    with pytest.raises(CollectorError, match="worker 1"):
        for _ in range(5):
            c.next()
    c.shutdown()


def test_fail_fast_mode():
    env = functools.partial(faulty_counting_env, "raise_step", [0], 2, 1)
    c = SyncDataCollector(env, frames_per_batch=10, on_worker_error="raise", name="failfast")
    with pytest.raises(CollectorError, match="injected fault"):
        list(zip(range(3), c))
    assert alive_actor_names("failfast/") == []  # iteration that raises shuts down


def test_policy_error_fails_fast_with_traceback():
    calls = {"n": 0}

    class Flaky(nn.Module):
        def forward(self, x):
            if x.shape[0] == 1 and x[0, 0] >= 3:
                raise RuntimeError("policy bug at obs 3")
            return torch.zeros(x.shape[0], dtype=torch.int64)

    c = SyncDataCollector(counting_env, Flaky(), frames_per_batch=10)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="policy bug at obs 3") as info:
        c.next()
    # the policy's own exception (as TorchRL raises it), chained from ours, which says where
    assert type(info.value) is RuntimeError and time.time() - t0 < 10
    assert isinstance(info.value.__cause__, CollectorError)
    assert "PolicyError" in str(info.value.__cause__)
    assert any("env actor" in note for note in info.value.__notes__)
    assert c.stats()["restarts"] == 0
    c.shutdown()
    del calls


def test_bad_observation_shape_is_a_clear_error():
    env = functools.partial(faulty_counting_env, "bad_shape", [0], 3, 1)
    c = SyncDataCollector(env, frames_per_batch=10)
    with pytest.raises(CollectorError, match=r"shape \(2,\).*shape \(1,\)"):
        c.next()
    c.shutdown()


def test_nan_observation_with_check_finite():
    env = functools.partial(faulty_counting_env, "nan", [0], 3, 1)
    rb = RayReplayBuffer(1000)
    c = SyncDataCollector(env, frames_per_batch=10, check_finite=True, replay_buffer=rb)
    with pytest.raises(CollectorError, match="non-finite"):
        c.next()
    assert len(rb) == 0  # malformed data never reaches the buffer
    c.shutdown()
    rb.shutdown()


def test_bounded_shutdown_with_hung_worker():
    env = functools.partial(faulty_counting_env, "hang_step", [0], 2, 1)
    c = MultiaSyncDataCollector(env, num_workers=2, frames_per_batch=10, name="hung-down")
    c.next()  # worker 1 delivers; worker 0 hangs
    t0 = time.time()
    c.shutdown(timeout=3)
    assert time.time() - t0 < 3 + 3
    c.shutdown(timeout=3)
    assert alive_actor_names("hung-down/") == []


def test_buffer_restart_from_checkpoint_no_duplicates(tmp_path):
    rb = RayReplayBuffer(100_000, checkpoint_dir=str(tmp_path / "rb"), checkpoint_every=1,
                         name="rb-restart")
    c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=100,
                                replay_buffer=rb)
    c.start()
    deadline = time.monotonic() + 30
    current = tmp_path / "rb" / "CURRENT"
    while (rb.write_count < 500 or not current.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)  # until a checkpoint exists to restart from
    os.kill(rb.info()["pid"], signal.SIGKILL)
    while rb.info()["restored_from"] is None and time.monotonic() < deadline + 30:
        time.sleep(0.1)  # info() itself waits out the restart
    written = rb.write_count
    while rb.write_count < written + 500 and time.monotonic() < deadline + 60:
        time.sleep(0.05)  # collection goes on into the restored buffer
    c.async_shutdown()
    stats = c.stats()
    ids = rb.batch_ids()
    assert sorted(map(tuple, stats["written_batch_ids"])) == sorted(map(tuple, ids))
    assert stats["buffer_resends"] > 0  # the restart made the writer resend, and dedup held
    assert rb.write_count == stats["frames"] == len(ids) * 100
    assert rb.info()["restored_from"] is not None
    invariant(stats)
    rb.shutdown()


def test_resent_batches_the_restored_buffer_already_holds_are_not_stored_again(tmp_path):
    """The writer keeps what was acknowledged since the last checkpoint it heard of. Here a
    checkpoint it has not heard of holds all three batches, so after the restart each resend
    is a batch the buffer already has: only the ids stop them from being stored twice."""
    path = str(tmp_path / "rb")
    rb = RayReplayBuffer(10_000, checkpoint_dir=path, checkpoint_every=1000, name="rb-dedup")
    try:
        with SyncDataCollector(counting_env, frames_per_batch=50, replay_buffer=rb) as c:
            for _ in range(3):
                c.next()
            rb.checkpoint(path)
            os.kill(rb.info()["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while rb.info()["restored_from"] is None:
                assert time.monotonic() < deadline, "the buffer did not come back"
                time.sleep(0.1)
            assert rb.write_count == 150
            c.next()  # its acknowledgement names a new incarnation: the three are sent again
            stats = c.stats()
        assert stats["buffer_restart_resends"] == 3
        assert rb.write_count == len(rb) == stats["frames"] == 200
        assert sorted(map(tuple, stats["written_batch_ids"])) == sorted(map(tuple, rb.batch_ids()))
        storage = rb.state_dict()["storage"][:200]
        frames = set(zip(storage["collector", "traj_ids"].tolist(),
                         storage["observation"][:, 0].tolist()))
        assert len(frames) == 200  # each (trajectory, step) frame stored once
    finally:
        rb.shutdown()


def test_buffer_gone_for_good_is_a_clear_error():
    rb = RayReplayBuffer(1000)
    c = SyncDataCollector(counting_env, frames_per_batch=10, replay_buffer=rb, write_timeout_s=2)
    c.next()
    rb.shutdown()
    t0 = time.time()
    with pytest.raises(ReplayBufferUnavailable, match="write_timeout_s=2"):
        c.next()
    assert time.time() - t0 < 10
    c.shutdown()


def test_trainer_death_takes_every_actor_with_it(tmp_path):
    address = ray.get_runtime_context().gcs_address
    script = textwrap.dedent(f"""
        import time, ray
        ray.init(address={address!r})
        from collectors import MultiSyncDataCollector
        c = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=20, name="orphan-check")
        c.next()
        print("READY", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert len(alive_actor_names("orphan-check/")) == 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 60
        while alive_actor_names("orphan-check/") and time.time() < deadline:
            time.sleep(0.5)
        assert alive_actor_names("orphan-check/") == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chaos_kills_workers_and_buffer(tmp_path):
    rb = RayReplayBuffer(20_000, checkpoint_dir=str(tmp_path / "chaos"), checkpoint_every=1)
    c = MultiaSyncDataCollector(counting_env, num_workers=4, frames_per_batch=50, replay_buffer=rb,
                                max_restarts=10)
    c.start()

    def wait_for(condition, what):
        deadline = time.time() + 30
        while not condition():
            assert time.time() < deadline, f"not within 30 s: {what}"
            time.sleep(0.05)

    for k in (0, 2, 3):  # each kill lands in a running collection: 200 more frames written first
        written = rb.write_count
        wait_for(lambda: rb.write_count >= written + 200, "200 frames written")
        kill_worker(c, k)
    wait_for(lambda: c.stats()["restarts"] >= 3, "every killed worker replaced")
    os.kill(rb.info()["pid"], signal.SIGKILL)  # restarts from its checkpoint in a few seconds
    wait_for(lambda: rb.info()["restored_from"] is not None, "the buffer restored")
    restored = rb.write_count
    wait_for(lambda: rb.write_count >= restored + 200, "collection going on into the restored buffer")
    assert c.background_error() is None, c.background_error()
    c.async_shutdown()
    stats = c.stats()
    ids = [tuple(i) for i in rb.batch_ids()]
    # every batch the collector reports written is in the buffer exactly once, and no other
    assert sorted(map(tuple, stats["written_batch_ids"])) == sorted(ids)
    assert rb.write_count == stats["frames"]
    assert stats["restarts"] >= 3
    assert stats["lost_frames"] >= 100
    assert rb.info()["restored_from"] is not None
    invariant(stats)
    rb.shutdown()


def test_env_factory_failing_in_one_worker_is_an_env_creation_error():
    from collectors import EnvCreationError

    env = functools.partial(faulty_counting_env, "raise_init", [1], 0, 1)
    t0 = time.time()
    with pytest.raises(EnvCreationError, match="env worker 1"):
        MultiSyncDataCollector(env, num_workers=2, frames_per_batch=10, name="init-fails")
    assert time.time() - t0 < 30
    assert alive_actor_names("init-fails/") == []


def test_nan_episode_dropped_and_counted_when_configured():
    env = functools.partial(faulty_counting_env, "nan", [0], 3, 1, 1000)
    rb = RayReplayBuffer(1000)
    with SyncDataCollector(env, frames_per_batch=10, check_finite="drop_episode") as c:
        b = c.next()
        stats = c.stats()
    mask = b["collector", "mask"]
    # the episode that produced NaN (steps 0..2 of this batch) is dropped; a new one follows
    assert mask.tolist() == [False] * 3 + [True] * 7
    assert torch.isfinite(b["next", "observation"]).all()
    assert stats["frames"] == 7
    assert stats["per_worker"][0]["dropped"] == {"bad_output": 3}
    invariant(stats)
    with SyncDataCollector(env, frames_per_batch=10, check_finite="drop_episode", replay_buffer=rb) as c:
        c.next()
    assert len(rb) == 7 and torch.isfinite(rb.sample(64)["next", "observation"]).all()
    rb.shutdown()


def test_observation_outside_its_space_when_checking():
    from collectors.testing import CountingEnv

    def shrunk():
        env = CountingEnv(100)
        env.observation_space = type(env.observation_space)(0, 2, (1,), "float32")
        return env

    with SyncDataCollector(shrunk, frames_per_batch=10) as c:
        c.next()  # not checked by default
    c = SyncDataCollector(shrunk, frames_per_batch=10, check_obs_space=True)
    with pytest.raises(CollectorError, match="outside its space"):
        c.next()
    c.shutdown()


def test_buffer_restart_with_sparse_checkpoints_loses_nothing(tmp_path):
    """checkpoint_every=5: batches acknowledged after the last checkpoint are sent again."""
    rb = RayReplayBuffer(1_000_000, checkpoint_dir=str(tmp_path / "rb"), checkpoint_every=5,
                         name="rb-sparse")
    c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=100,
                                total_frames=20_000, replay_buffer=rb)
    try:
        c.start()
        deadline = time.monotonic() + 60
        info = rb.info()  # the kill needs a checkpoint on disk and batches after it
        while (info["write_count"] < 3_000 or info["checkpointed_batches"] == 0) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            info = rb.info()
        assert info["checkpointed_batches"] > 0, info
        os.kill(info["pid"], signal.SIGKILL)
        while c.is_running() and time.monotonic() < deadline + 60:
            time.sleep(0.1)
        c.async_shutdown()
        stats = c.stats()
        ids = [tuple(i) for i in rb.batch_ids()]
        assert rb.info()["restored_from"] is not None
        assert stats["frames"] == 20_000
        assert sorted(ids) == sorted(map(tuple, stats["written_batch_ids"]))  # each once
        assert rb.write_count == len(rb) == stats["frames"]  # nothing lost, nothing twice
        invariant(stats)
    finally:
        c.shutdown(raise_on_error=False)
        rb.shutdown()


def test_two_collectors_with_one_name_into_one_buffer_keep_every_batch():
    rb = RayReplayBuffer(100_000)
    try:
        for _ in range(2):  # "a script run twice into one buffer"
            with SyncDataCollector(counting_env, frames_per_batch=50, total_frames=500,
                                   replay_buffer=rb, name="same-name") as c:
                list(c)
        assert rb.write_count == 1000 and len(rb.batch_ids()) == 20
    finally:
        rb.shutdown()


def test_async_replaces_only_the_hung_worker_while_the_other_delivers():
    env = functools.partial(faulty_counting_env, "hang_step", [1], 30, 1)
    with MultiaSyncDataCollector(env, num_workers=2, frames_per_batch=20, sample_timeout_s=3.0,
                                 name="async-hang") as c:
        from_worker = {0: 0, 1: 0}
        deadline = time.monotonic() + 60
        while c.stats()["restarts"] == 0 and time.monotonic() < deadline:
            b = c.next()
            from_worker[int(b["collector", "worker_id"][0])] += 1
        stats = c.stats()
        assert stats["per_worker"][1]["restarts"] == 1 and stats["per_worker"][0]["restarts"] == 0
        assert stats["per_worker"][1]["timeouts"] == 1
        assert from_worker[0] > 5  # worker 0 kept delivering while worker 1 hung
        for _ in range(6):  # and the replacement delivers too
            b = c.next()
            from_worker[int(b["collector", "worker_id"][0])] += 1
        deadline = time.monotonic() + 30
        while from_worker[1] < 3 and time.monotonic() < deadline:
            b = c.next()
            from_worker[int(b["collector", "worker_id"][0])] += 1
        assert from_worker[1] >= 3
        invariant(c.stats())


@pytest.mark.parametrize("shared_memory,prefetch", [(None, 1), (False, 1), (None, 2)],
                         ids=["shared-memory", "ray-calls", "driver"])
def test_async_notices_a_hung_worker_while_the_others_always_have_a_batch_ready(shared_memory,
                                                                                prefetch):
    # a slow trainer: when it asks, the healthy workers' batches are always there already; the
    # hung worker's deadline must still be checked (it was only checked when none was ready)
    env = functools.partial(faulty_counting_env, "hang_step", [2], 30, 1)
    with MultiaSyncDataCollector(env, num_workers=3, frames_per_batch=10, sample_timeout_s=2.0,
                                 shared_memory=shared_memory, prefetch=prefetch,
                                 name="async-hang-busy") as c:
        c.next()
        t0 = time.monotonic()
        while c.stats()["restarts"] == 0 and time.monotonic() - t0 < 20:
            c.next()
            time.sleep(0.05)
        waited = time.monotonic() - t0
        stats = c.stats()
        assert stats["per_worker"][2]["timeouts"] == 1, stats["per_worker"]
        assert waited < 2.0 + 6.0, f"the hung worker was noticed after {waited:.1f}s"
        invariant(stats)


def test_adaptive_hang_timeout():
    from actors.coordination.collection import Collection, Ledger
    from actors.coordination.metrics import Metrics

    class Pool:
        count = 2

    col = Collection(Pool(), Ledger(2, Metrics("t", "driver")), frames_per_worker_batch=1,
                     sample_timeout_s=None, prefetch=1, on_error="restart")
    assert col.timeout(0) == 600.0  # before the first batch
    col.slowest[0] = 0.5
    assert col.timeout(0) == 60.0  # never under the floor
    col.slowest[0] = 20.0
    assert col.timeout(0) == 200.0  # 10x the slowest batch
    col.sample_timeout_s = 2.0
    assert col.timeout(1) == 2.0


def test_async_serves_the_oldest_ready_request(monkeypatch):
    """ray.wait(num_returns=1) reports some ready ref, in no fair order; with workers that are
    always ready, one could be passed over for good (a dead worker went unnoticed for minutes in
    the chaos test). The async stream serves the oldest ready request first."""
    import types

    from actors.coordination import collection
    from actors.coordination.metrics import Metrics

    def meta(i):
        return {"worker": i, "frames": 1, "policy_version": 0, "episode_returns": [],
                "env_errors": [], "id_counter": 0, "collect_time": 0.001, "env_time": 0.0}

    handles = [types.SimpleNamespace(collect_pair=types.SimpleNamespace(
        remote=lambda random_actions, i=i: (ray.put(b"batch"), ray.put(meta(i))))) for i in range(3)]

    class Pool:
        count, version = 3, 0

        def alive(self):
            return list(enumerate(handles))

        def note_id_counter(self, i, value):
            pass

    real_wait = ray.wait

    def newest_first(refs, num_returns=1, timeout=None):  # the unfair order, made deterministic
        ready, rest = real_wait(refs, num_returns=len(refs), timeout=timeout)
        if num_returns == 1:
            return ready[-1:], [r for r in refs if r is not ready[-1]]
        return ready, rest

    monkeypatch.setattr(collection.ray, "wait", newest_first)
    col = collection.Collection(Pool(), collection.Ledger(3, Metrics("t", "driver")),
                                frames_per_worker_batch=1, sample_timeout_s=None, prefetch=1,
                                on_error="restart")
    served = [col.next_ready()[1]["worker"] for _ in range(9)]
    assert served == [0, 1, 2] * 3  # without the fix: worker 0 and 1 never, 2 nine times


def test_env_reset_raising_is_rebuilt_and_logged():
    env = functools.partial(faulty_counting_env, "raise_reset", [0], 5, 1, 5)
    with SyncDataCollector(env, frames_per_batch=20, seed=7) as c:
        b = c.next()
        stats = c.stats()
    assert b.numel() == 20 and stats["env_errors"] == 1
    (entry,) = stats["env_error_log"]
    assert entry["phase"] == "reset" and entry["worker"] == 0 and entry["seed"] is not None
    assert "injected fault: reset raises" in entry["error"] and "Traceback" in entry["traceback"]
    invariant(stats)


def test_a_worker_hanging_at_start_is_a_bounded_startup_error():
    from collectors import StartupTimeout

    env = functools.partial(faulty_counting_env, "hang_init", [0], 5, 1)  # not in the trainer
    t0 = time.monotonic()
    with pytest.raises(StartupTimeout, match="did not start within 3s"):
        SyncDataCollector(env, frames_per_batch=10, startup_timeout_s=3.0, name="hang-start")
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 30
    while alive_actor_names("hang-start/") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive_actor_names("hang-start/") == []
