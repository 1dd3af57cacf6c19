"""Laptop to cluster: a multi-node ray.cluster_utils.Cluster, and a cluster started with
`ray start`. Each runs in its own process so the test session's Ray is left alone."""
import os
import shutil
import tempfile
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CLUSTER = """
import ray, torch
from ray.cluster_utils import Cluster
from collectors import MultiSyncDataCollector
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
    "dashboard_host": "127.0.0.1", "dashboard_port": DASH_PORT})
nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
ray.init(address=cluster.address)
try:
%s
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def run_in_cluster(body: str) -> str:
    """Run ``body`` against a head (no CPUs) plus two 1-CPU nodes, in its own process."""
    body = textwrap.indent(textwrap.dedent(body), "    ")
    return run_script(CLUSTER.replace("DASH_PORT", str(free_port())) % body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(body: str, timeout: float = 240) -> str:
    script = textwrap.dedent(body)  # run in ROOT: `python -c` imports from the working tree
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_cluster_config_spreads_workers_over_nodes():
    out = run_in_cluster("""
        from ray.util.state import list_actors
        c = MultiSyncDataCollector("CartPole-v1", num_workers=4, frames_per_batch=40,
                                   config="configs/cluster.yaml", name="spread")
        b = c.next()
        assert b.batch_size == torch.Size([4, 10]), b.batch_size
        actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                  if a.name and a.name.startswith("spread/env-worker")]
        node_ids = {a.node_id for a in actors}
        print("NODES", len(node_ids), len(actors))
        assert len(node_ids) == 2 and len(actors) == 4
        c.shutdown(timeout=5)
        # a node is lost: the same script still runs on what is left
        cluster.remove_node(nodes[1])
        c2 = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=20,
                                    num_cpus=0.25, name="after-loss")
        print("AFTER", c2.next().numel())
        c2.shutdown()
    """)
    assert "NODES 2 4" in out and "AFTER 20" in out


def test_cluster_started_with_ray_start():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths are limited
    # token authentication stays on: clients of an existing cluster send the token
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    started = [head]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            probe = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, env=env)
            if probe.returncode == 0:
                break
            time.sleep(1)
        worker = subprocess.Popen(
            ["ray", "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        started.append(worker)
        deadline = time.time() + 60
        while True:  # until the worker node has joined (two nodes alive), not a fixed sleep
            probe = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True,
                                   text=True, env=env)
            active = probe.stdout.split("Pending:")[0] if probe.returncode == 0 else ""
            if active.count("node_") >= 2:
                break
            assert time.time() < deadline, "the worker node did not join within 60 s"
            time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, "-m", "collectors", "run", "configs/cartpole.yaml", "--deploy",
             "configs/cluster.yaml", "--address", address, "--total-frames", "8000", "--quiet"],
            capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "8,000" in out.stdout
    finally:
        pids = []
        for proc in started:
            try:
                pids += [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        deadline = time.time() + 30
        while time.time() < deadline and any(psutil.pid_exists(p) and
                                             psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                             for p in pids):
            time.sleep(0.5)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        for p in left:  # only what this test started
            os.kill(p, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes left by ray start: {left}"


def test_node_loss_recreates_or_degrades():
    out = run_in_cluster("""
        # one worker per node (each asks for a whole CPU)
        c = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=40,
                                   num_cpus=1, startup_timeout_s=10, name="lossy")
        assert c.next().batch_size == torch.Size([2, 20])
        # lose a node that is not this process's (the driver prefers this process's node)
        here = ray.get_runtime_context().get_node_id()
        cluster.remove_node(next(n for n in nodes if n.node_id != here))
        b = c.next()   # the lost worker cannot be placed again: the run goes on with one
        stats = c.stats()
        print("AFTER", tuple(b.batch_size), stats["workers_alive"], stats["restarts"])
        c.shutdown(timeout=5)
    """)
    assert "AFTER (1, 20) 1 1" in out
