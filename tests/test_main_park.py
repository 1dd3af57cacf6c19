"""The env actor's main thread parked while it serves (actors/stepping/main_park.py): Ray's loop
on that thread stops waking every 10 ms, Ray calls to the actor still answer, batches are
unchanged and shutdown is prompt."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from actors.options import CollectorOptions
from actors.stepping.main_park import SIGNAL, MainThreadPark, park_interval
from collectors import MultiaSyncDataCollector, MultiSyncDataCollector
from collectors.testing import counting_env


def main_thread_switches(pid: int) -> int:
    """Context switches so far of the main thread of process ``pid`` (Ray's task loop)."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


def switches_per_s(pid: int, seconds: float = 1.0) -> float:
    before = main_thread_switches(pid)
    time.sleep(seconds)
    return (main_thread_switches(pid) - before) / seconds


def test_park_is_off_outside_an_actor_and_for_zero_and_bad_values_raise():
    assert park_interval(0.1) is None  # the test process is no Ray actor
    assert park_interval(None) is None
    park = MainThreadPark(None)
    assert not park.installed
    with park:  # a no-op context
        pass
    with pytest.raises(ValueError, match="interval_s=0"):
        MainThreadPark(0)
    with pytest.raises(ValueError, match="main_thread_sleep_s"):
        CollectorOptions(frames_per_batch=1, main_thread_sleep_s=-0.1)
    with pytest.raises(ValueError, match=r"None \(auto\)"):
        CollectorOptions(frames_per_batch=1, main_thread_sleep_s=float("inf"))
    assert CollectorOptions(frames_per_batch=1, main_thread_sleep_s=0).main_thread_sleep_s == 0


def test_park_is_not_installed_off_the_main_thread_or_over_a_handler_of_the_users():
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("park", MainThreadPark(0.1)))
    t.start()
    t.join()
    assert not box["park"].installed
    mine = lambda *_: None  # noqa: E731
    old = signal.signal(SIGNAL, mine)
    try:
        assert not MainThreadPark(0.1).installed
        assert signal.getsignal(SIGNAL) is mine  # left as the user set it
    finally:
        signal.signal(SIGNAL, old)


def test_a_parked_main_thread_sleeps_between_turns_and_wakes_at_stop():
    """Outside Ray: the main thread waits in C (as Ray's loop does), checking signals every 10 ms;
    parked, it passes nearly all its time in the handler, and the re-arming thread is gone after
    the ``with``."""
    code = textwrap.dedent("""
        import signal, threading, time
        from actors.stepping.main_park import MainThreadPark
        park = MainThreadPark(0.2)
        turns = []                      # times the main thread was back in its own loop
        def serve():
            with park:
                time.sleep(1.0)
        t = threading.Thread(target=serve)
        t.start()
        while t.is_alive():             # Ray's loop: wait 10 ms in C, then check signals
            signal.sigtimedwait([signal.SIGUSR1], 0.01)
            turns.append(time.monotonic())
        print(len(turns), park._thread is None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    turns, stopped = out.stdout.split()
    assert stopped == "True"
    assert int(turns) < 25  # unparked: about 100 in that second


def run_parked(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``body`` run in a fresh Python whose main thread loops as Ray's does (a 10 ms wait in C,
    then the signal check) while another thread runs ``serve`` inside a 30 s park."""
    code = textwrap.dedent("""
        import os, signal, sys, threading, time
        from actors.stepping.main_park import MainThreadPark
        park = MainThreadPark(30.0)
    """) + textwrap.dedent(body) + textwrap.dedent("""
        t = threading.Thread(target=serve, daemon=True)  # the process ends with its main thread
        t.start()
        while t.is_alive():
            signal.sigtimedwait([signal.SIGUSR1], 0.01)
        print("loop ended")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_leaving_the_park_wakes_the_main_thread_and_sigterm_ends_a_parked_process():
    t0 = time.perf_counter()
    out = run_parked("""
        def serve():
            with park:
                time.sleep(0.5)
    """)
    assert out.returncode == 0 and "loop ended" in out.stdout, out.stderr
    assert time.perf_counter() - t0 < 15  # not the 30 s sleep: stop() woke the main thread
    t0 = time.perf_counter()
    out = run_parked("""
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))   # as Ray's handler does
        def serve():
            with park:
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
    """)
    assert out.returncode == 3 and "loop ended" not in out.stdout, out.stderr
    assert time.perf_counter() - t0 < 15


def test_collector_workers_park_their_main_thread_while_serving_and_still_answer_calls():
    with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, total_frames=-1,
                                 num_cpus=0.05) as parked, \
            MultiaSyncDataCollector(counting_env, num_workers=1, frames_per_batch=10, total_frames=-1,
                                    num_cpus=0.05, main_thread_sleep_s=0) as awake:
        it = iter(parked)
        batches = [next(it) for _ in range(20)]
        next(iter(awake))
        assert parked.stats()["shared_memory_batches"] > 0
        pid = parked.worker_info[0]["pid"]
        assert switches_per_s(pid) < 40, "the serving worker's main thread still wakes every 10 ms"
        assert switches_per_s(awake.worker_info[0]["pid"]) > 80  # main_thread_sleep_s=0: Ray's own
        t0 = time.perf_counter()
        assert parked.get_distant_attr("frames_per_batch") == [10, 10]
        assert time.perf_counter() - t0 < 2.0  # a call waits one sleep (0.1 s) at most per actor
        batches += [next(it) for _ in range(20)]
        t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 10.0
    obs = torch.cat([b["observation"].reshape(-1) for b in batches])
    ids = torch.cat([b.get(("collector", "traj_ids")).reshape(-1) for b in batches])
    assert len(obs) == 400 and len(set(zip(ids.tolist(), obs.tolist()))) == 400  # no frame twice


def test_workers_given_a_core_share_of_a_fifth_or_more_do_not_park_by_default():
    with MultiSyncDataCollector(counting_env, num_workers=1, frames_per_batch=10, total_frames=-1,
                                num_cpus=0.25) as c:
        next(iter(c))
        assert switches_per_s(c.worker_info[0]["pid"]) > 80
