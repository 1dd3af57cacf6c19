"""Deployment configs, feasibility checks, metrics, the command line."""
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from collectors import ConfigError, DeploymentConfig, MultiSyncDataCollector, RayReplayBuffer, load_config
from collectors.testing import counting_env
from conftest import METRICS_PORT


def test_local_and_cluster_configs_have_the_same_keys():
    local = yaml.safe_load(open("configs/local.yaml"))
    cluster = yaml.safe_load(open("configs/cluster.yaml"))

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k not in ("runtime_env", "resources"):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(local) == keys(cluster)
    assert load_config("configs/cluster.yaml").placement.strategy == "SPREAD"
    assert load_config(None) == load_config("configs/local.yaml")
    for job in ("configs/cartpole.yaml", "configs/pendulum.yaml"):
        assert load_config(job).job["env"]


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="placement.strategy"):
        load_config({"placement": {"strategy": "DIAGONAL"}})
    with pytest.raises(ConfigError, match="resources.env_worker.num_cpus"):
        load_config({"resources": {"env_worker": {"num_cpus": "lots"}}})
    with pytest.raises(ConfigError, match="colour"):
        load_config({"colour": "blue"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    assert isinstance(load_config({"resources": {"env_worker": {"num_cpus": 0.5}}}), DeploymentConfig)


def test_impossible_requests_fail_fast():
    t0 = time.time()
    with pytest.raises(ValueError, match="no node has that much"):
        MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, num_cpus=64)
    with pytest.raises(ValueError, match="need"):
        MultiSyncDataCollector(counting_env, num_workers=40, frames_per_batch=40, num_cpus=1)
    with pytest.raises(ValueError, match="no node"):
        MultiSyncDataCollector(counting_env, num_workers=1, frames_per_batch=10,
                               resources={"special_hardware": 1})
    assert time.time() - t0 < 10


def test_placement_group_from_config_and_timeout():
    cfg = {"placement": {"strategy": "PACK", "timeout_s": 5},
           "resources": {"env_worker": {"num_cpus": 0.5}}}
    with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, config=cfg) as c:
        assert c.next().batch_size[0] == 2
    strict = {"placement": {"strategy": "STRICT_SPREAD", "timeout_s": 2}}
    t0 = time.time()
    with pytest.raises(Exception, match="could not be placed"):
        MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, config=strict)
    assert time.time() - t0 < 15


def scrape() -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()


def test_metrics_are_exported_with_tags():
    """All twelve metrics of the README, with values that follow the run: frames grow to what
    was delivered, a kill counts a restart, the policy version follows an update."""
    import torch
    from torch import nn

    from collectors.policies import ArgmaxLayer
    from collectors.testing import kill_worker

    rb = RayReplayBuffer(10_000, name="metrics-rb")
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with MultiSyncDataCollector(counting_env, policy, num_workers=2, frames_per_batch=40,
                                total_frames=200, name="metrics-check", replay_buffer=rb) as c:
        it = iter(c)
        next(it)
        kill_worker(c, 0)  # replaced during the next batch: one restart
        next(it)
        with torch.no_grad():
            policy[0].bias.add_(1.0)  # sent before the next batch: policy version 1
        list(it)
    rb.sample(8)
    mine = ('collector="metrics-check"', 'collector="metrics-rb"')
    names = ["frames_total", "episodes_total", "restarts_total", "frames_per_s", "episode_return",
             "env_step_time_s", "batch_latency_s", "policy_version", "policy_lag", "buffer_size",
             "buffer_inserts_total", "buffer_samples_total"]

    def values():
        out = {}
        for line in scrape().splitlines():
            for name in names:
                if line.startswith(f"ray_collectors_{name}{{") and any(t in line for t in mine):
                    out.setdefault(name, []).append((line, float(line.rsplit(" ", 1)[1])))
        return out

    deadline = time.time() + 45
    found = values()
    while time.time() < deadline and (len(found) < len(names) or
                                      sum(v for _, v in found["frames_total"]) < 200 or
                                      sum(v for _, v in found.get("buffer_samples_total", [])) < 8):
        time.sleep(0.5)
        found = values()
    assert set(found) == set(names), sorted(set(names) - set(found))
    assert sum(v for _, v in found["frames_total"]) == 200  # 5 batches of 40 delivered
    assert sum(v for _, v in found["restarts_total"]) == 1
    assert [v for l, v in found["restarts_total"] if 'worker="0"' in l] == [1.0]
    assert all(v == 1.0 for _, v in found["policy_version"])  # the last batches: version 1
    assert all(v == 0.0 for _, v in found["policy_lag"])
    assert all(v == 5.0 for _, v in found["episode_return"])  # counting env: 5 steps of reward 1
    assert sum(v for _, v in found["episodes_total"]) >= 30
    assert all(v > 0 for name in ("frames_per_s", "env_step_time_s", "batch_latency_s")
               for _, v in found[name])
    assert [v for _, v in found["buffer_size"]] == [200.0]
    assert sum(v for _, v in found["buffer_inserts_total"]) == 200
    assert sum(v for _, v in found["buffer_samples_total"]) == 8
    rb.shutdown()


def test_cli_runs_a_job_and_rejects_bad_input(tmp_path):
    job = tmp_path / "job.yaml"
    # the counting env: episodes of 5 steps, reward 1 each; 2 workers x 300 steps = 120 episodes
    job.write_text(yaml.safe_dump({"job": {"env": "collectors.testing:CountingEnv-v0",
                                           "collector": "multisync", "num_workers": 2,
                                           "frames_per_batch": 200, "total_frames": 1000}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(job), "--quiet",
                          "--total-frames", "600"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Ray dashboard: http://127.0.0.1:" in out.stdout
    rows = dict(line.rsplit(None, 1) for line in out.stdout.split("\n\n")[-1].splitlines())
    rows = {k.strip(): v for k, v in rows.items()}
    assert float(rows["frames/s"].replace(",", "")) > 0 and float(rows["seconds"]) > 0
    assert {k: rows[k] for k in ("frames", "episodes", "mean return", "restarts", "lost frames",
                                 "nodes", "placement")} == {
        "frames": "600", "episodes": "120", "mean return": "5.00", "restarts": "0",
        "lost frames": "0", "nodes": "1", "placement": "none"}, rows
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"job": {"env": "NoSuchEnv-v0"}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(bad)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "NoSuchEnv-v0" in out.stderr


def test_cli_job_with_a_replay_buffer_writes_into_it(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"job": {"env": "collectors.testing:CountingEnv-v0",
                                           "frames_per_batch": 100, "total_frames": 600,
                                           "replay_buffer": {"capacity": 400}}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(job), "--quiet"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    # the ring holds the last 400 of the 600 frames written
    assert "replay buffer: 400 frames held, 600 written" in out.stdout, out.stdout
    job.write_text(yaml.safe_dump({"job": {"env": "CartPole-v1", "replay_buffer": 1000}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(job)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "job.replay_buffer must be a mapping" in out.stderr, out.stderr


def test_the_test_session_ray_listens_on_loopback_only():
    """Every socket the session's Ray (started by conftest, with a collector's workers running)
    listens on is bound to 127.0.0.1: nothing the tests start is reachable from the network."""
    import psutil
    import ray

    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    with MultiSyncDataCollector(counting_env, None, num_workers=2, frames_per_batch=20,
                                total_frames=40) as c:
        for _ in c:
            pass
        listening = []
        for proc in psutil.Process().children(recursive=True):
            try:
                listening += [(proc.name(), conn.laddr) for conn in proc.net_connections("inet")
                              if conn.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    assert len(listening) >= 3  # the GCS, the raylet, the dashboard at least
    exposed = [(name, addr) for name, addr in listening if addr.ip not in loopback]
    assert not exposed, exposed
