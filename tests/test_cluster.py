"""Laptop to cluster: a multi-node ray.cluster_utils.Cluster, and a cluster started with
`ray start`. Each runs in its own process so the test session's Ray is left alone."""
import os
import re
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
import os, ray, torch, yaml
from ray.cluster_utils import Cluster
from collectors import MultiSyncDataCollector
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
    "dashboard_host": "127.0.0.1", "dashboard_port": DASH_PORT})
nodes = [cluster.add_node(num_cpus=NODE_CPUS) for _ in range(NUM_NODES)]
cluster.wait_for_nodes()
CONNECT

def run_in_background(c, within_s=120):  # start() to total_frames; stats after shutdown
    import time
    c.start()
    deadline = time.monotonic() + within_s
    while c.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = c.stats()
    c.shutdown(timeout=5)
    return stats

try:
%s
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def run_in_cluster(body: str, node_cpus: int = 1, connect: bool = True, num_nodes: int = 2) -> str:
    """Run ``body`` against a head (no CPUs) plus ``num_nodes`` nodes, in its own process. With
    ``connect=False`` the script does not call ``ray.init``: the collectors connect as the
    config (and ``RAY_COLLECTORS_ADDRESS``) say."""
    body = textwrap.indent(textwrap.dedent(body), "    ")
    script = (CLUSTER.replace("DASH_PORT", str(free_port())).replace("NODE_CPUS", str(node_cpus))
              .replace("NUM_NODES", str(num_nodes))
              .replace("CONNECT", "ray.init(address=cluster.address)" if connect else ""))
    return run_script(script % body)


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


def test_cluster_config_connects_ships_code_and_spreads_workers():
    """configs/cluster.yaml as is, reached through RAY_COLLECTORS_ADDRESS (nothing calls
    ray.init first): its runtime_env is the job's, and SPREAD puts 2 workers x 0.5 CPU on two
    2-CPU nodes, which PACK (the same config otherwise) puts on one."""
    out = run_in_cluster("""
        from ray.util.state import list_actors
        os.environ["RAY_COLLECTORS_ADDRESS"] = cluster.address
        assert not ray.is_initialized()

        def nodes_of(prefix):
            actors = [a for a in list_actors(address=cluster.address,
                                             filters=[("state", "=", "ALIVE")], limit=1000)
                      if a.name and a.name.startswith(prefix + "/env-worker")]
            assert len(actors) == 2, actors
            return {a.node_id for a in actors}

        c = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=40,
                                   config="configs/cluster.yaml", name="spread")
        assert c.next().batch_size == torch.Size([2, 20])
        assert ray.get_runtime_context().gcs_address == cluster.address
        modules = ray.get_runtime_context().runtime_env.get("py_modules") or []
        print("MODULES", len(modules))
        print("SPREAD", len(nodes_of("spread")), len(set(c.stats()["worker_nodes"])))
        c.shutdown(timeout=5)
        with open("configs/cluster.yaml") as fh:
            packed = yaml.safe_load(fh)
        packed["placement"]["strategy"] = "PACK"
        c = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=40,
                                   config=packed, name="pack")
        assert c.next().batch_size == torch.Size([2, 20])
        print("PACK", len(nodes_of("pack")))
        c.shutdown(timeout=5)
    """, node_cpus=2, connect=False)
    assert "MODULES 2" in out, out
    assert "SPREAD 2 2" in out and "PACK 1" in out, out


def test_buffer_pinned_to_another_node_samples_through_the_actor():
    """resources.replay_buffer.node pins the buffer; the trainer (on the head) is on another
    node, so sampling falls back to actor calls instead of mapping shared memory."""
    out = run_in_cluster("""
        from collectors import RayReplayBuffer
        from collectors.testing import counting_env
        with open("configs/cluster.yaml") as fh:
            config = yaml.safe_load(fh)
        config["ray"]["address"] = None  # connected above
        target = nodes[1].node_id
        config["resources"]["replay_buffer"]["node"] = target
        rb = RayReplayBuffer(1000, batch_size=32, config=config, seed=0)
        c = MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=100,
                                   total_frames=400, replay_buffer=rb, name="pinned")
        for _ in c:
            pass
        c.shutdown(timeout=5)
        info = rb.info()
        assert info["node_id"] == target, (info["node_id"], target)
        assert ray.get_runtime_context().get_node_id() != target
        import time
        deadline = time.monotonic() + 30  # the sampler learns where the storage is from a probe
        while True:
            s = rb.sample()
            obs = s["observation"]
            assert s.batch_size == torch.Size([32]) and ((obs >= 0) & (obs < 5)).all()
            assert (s["next", "observation"] == obs + 1).all()  # counting env: next = obs + 1
            if rb._local.off or time.monotonic() > deadline:
                break
        print("FALLBACK", rb._local is not None and rb._local.off, rb._local.reader is None, len(rb))
        rb.shutdown()
    """)
    assert "FALLBACK True True 400" in out, out


def test_cluster_started_with_ray_start():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths are limited
    # token authentication stays on: clients of an existing cluster send the token
    # `ray start --address` (a second node) refuses to run with the loopback-only setting of
    # conftest, so this one cluster uses the machine's address (token authentication still on)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
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
        # --deploy applied (its placement strategy), and the workers ran on both nodes: the
        # joined worker node included
        assert re.search(r"^placement\s+SPREAD$", out.stdout, re.M), out.stdout
        assert re.search(r"^nodes\s+2$", out.stdout, re.M), out.stdout
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
        # one worker per node (each asks for a whole CPU); the driver pinned to the head (its
        # preference for this process's node is soft: under load it may land elsewhere)
        pinned = {"resources": {"driver": {"num_cpus": 0, "node": cluster.head_node.node_id}}}
        c = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=40,
                                   num_cpus=1, startup_timeout_s=30, name="lossy", config=pinned)
        assert c.next().batch_size == torch.Size([2, 20])
        cluster.remove_node(nodes[0])  # a worker node: one of the two workers goes with it
        b = c.next()   # the lost worker cannot be placed again: the run goes on with one
        stats = c.stats()
        print("AFTER", tuple(b.batch_size), stats["workers_alive"], stats["restarts"])
        c.shutdown(timeout=5)
    """)
    assert "AFTER (1, 20) 1 1" in out


def test_node_loss_recreates_workers_on_the_remaining_node():
    out = run_in_cluster("""
        # two 2-CPU nodes, two workers of 1 CPU: the node that is left can hold both
        pinned = {"resources": {"driver": {"num_cpus": 0, "node": cluster.head_node.node_id}}}
        c = MultiSyncDataCollector("CartPole-v1", num_workers=2, frames_per_batch=40,
                                   num_cpus=1, startup_timeout_s=30, name="recreate",
                                   config=pinned)
        assert c.next().batch_size == torch.Size([2, 20])
        lost = c.stats()["worker_nodes"][0]
        cluster.remove_node(next(n for n in nodes if n.node_id == lost))
        b = c.next()
        stats = c.stats()
        print("AFTER", tuple(b.batch_size), stats["workers_alive"], stats["restarts"] >= 1)
        c.shutdown(timeout=5)
    """, node_cpus=2)
    assert "AFTER (2, 20) 2 True" in out, out


def test_shared_memory_only_with_the_workers_on_the_trainers_node():
    """The head (this process) has no CPUs, so the env actor runs on another node: batches and
    weights go through Ray by themselves, and shared_memory=True is refused with the nodes
    named."""
    out = run_in_cluster("""
        from collectors import SyncDataCollector
        from collectors.testing import counting_env
        pinned = {"resources": {"driver": {"num_cpus": 0, "node": cluster.head_node.node_id}}}
        here = ray.get_runtime_context().get_node_id()
        with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=60,
                               config=pinned, name="remote-auto") as c:
            n = sum(b.numel() for b in c)
            print("AUTO", n, c.stats()["shared_memory_batches"], c.worker_info[0]["node_id"] != here)
        try:
            SyncDataCollector(counting_env, frames_per_batch=10, shared_memory=True,
                              config=pinned, name="remote-required")
        except ValueError as exc:
            print("REFUSED", "not only on the trainer's" in str(exc))
        from ray.util.state import list_actors
        print("LEFT", [a.name for a in list_actors(filters=[("state", "=", "ALIVE")])])
    """)
    assert "AUTO 60 0 True" in out and "REFUSED True" in out, out
    assert "LEFT []" in out, out


def test_start_from_other_nodes_writes_through_the_object_store_exactly():
    """Env actors on the two worker nodes, the driver and the buffer on the head: start() cannot
    take the local feed (shared memory is per node), so batches reach the buffer through the
    object store, each stored once."""
    out = run_in_cluster("""
        import time
        from collectors import MultiaSyncDataCollector, RayReplayBuffer
        from collectors.testing import counting_env
        rb = RayReplayBuffer(10_000)
        c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=20,
                                    total_frames=400, replay_buffer=rb, name="remote-feed")
        here = ray.get_runtime_context().get_node_id()
        assert here not in c.stats()["worker_nodes"]
        stats = run_in_background(c)
        ids = sorted(map(tuple, rb.batch_ids()))
        assert ids == sorted(map(tuple, stats["written_batch_ids"])) and len(ids) == 20
        print("REMOTE", stats["shared_memory_writes"], rb.write_count, stats["frames"])
        rb.shutdown()
    """)
    assert "REMOTE 0 400 400" in out, out


def test_sharded_buffer_one_shard_per_node_takes_that_nodes_batches():
    """Three nodes, one env actor and one replay shard on each (the driver on the head): every
    batch lands in the shard of its worker's node, a sample spans all shards, and removing a
    node loses only that shard's frames while the other two keep sampling."""
    out = run_in_cluster("""
        import time
        from collectors import MultiaSyncDataCollector, RayReplayBuffer
        from collectors.testing import counting_env
        config = {"placement": {"shards": "per_node"},
                  "resources": {"replay_buffer": {"num_cpus": 0}, "env_worker": {"num_cpus": 1},
                                "driver": {"num_cpus": 0, "node": cluster.head_node.node_id}}}
        rb = RayReplayBuffer(30_000, num_shards=3, batch_size=300, seed=0, config=config)
        assert sorted(rb.nodes) == sorted(n.node_id for n in nodes), rb.nodes
        c = MultiaSyncDataCollector(counting_env, num_workers=3, frames_per_batch=20,
                                    total_frames=900, replay_buffer=rb, name="sharded",
                                    config=config)
        stats = run_in_background(c)
        worker_node = dict(enumerate(stats["worker_nodes"]))
        assert len(set(worker_node.values())) == 3, worker_node
        per_shard = []
        for j, shard in enumerate(rb.shards):
            ids = shard.batch_ids()
            assert ids and {worker_node[tuple(b)[2]] for b in ids} == {rb.nodes[j]}, (j, ids[:3])
            per_shard.append(len(ids))
        assert sum(per_shard) == 45 and rb.write_count == 900, (per_shard, rb.write_count)
        s = rb.sample()
        assert set((s["index"] // rb.stride).tolist()) == {0, 1, 2}
        sizes = [info["size"] for info in rb.info()["shards"]]
        gone = 1
        cluster.remove_node(next(n for n in nodes if n.node_id == rb.nodes[gone]))
        deadline = time.monotonic() + 60
        while gone not in rb.dead and time.monotonic() < deadline:
            try:
                rb.sample()
            except Exception:
                time.sleep(0.2)
        s = rb.sample()
        assert set((s["index"] // rb.stride).tolist()) == {0, 2}
        assert len(rb) == sizes[0] + sizes[2]
        print("SHARDED", per_shard, sizes, len(rb))
        rb.shutdown()
    """, num_nodes=3)
    assert "SHARDED" in out, out
