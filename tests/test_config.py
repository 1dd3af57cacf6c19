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
    rb = RayReplayBuffer(10_000, name="metrics-rb")
    with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=40, total_frames=200,
                                name="metrics-check", replay_buffer=rb) as c:
        list(c)
    rb.sample(8)
    wanted = {
        'ray_collectors_frames_total': 'collector="metrics-check"',
        'ray_collectors_episodes_total': 'collector="metrics-check"',
        'ray_collectors_env_step_time_s': 'role="env-worker"',
        'ray_collectors_policy_version': 'worker="1"',
        'ray_collectors_buffer_size': 'collector="metrics-rb"',
        'ray_collectors_buffer_inserts_total': 'role="replay-buffer"',
    }
    deadline = time.time() + 45
    found = {}
    while time.time() < deadline and len(found) < len(wanted):
        for line in scrape().splitlines():
            for name, tag in wanted.items():
                if line.startswith(name + "{") and tag in line:
                    found[name] = line
        time.sleep(1)
    assert set(found) == set(wanted), sorted(set(wanted) - set(found))
    frames = [l for l in scrape().splitlines() if l.startswith("ray_collectors_frames_total{")
              and 'collector="metrics-check"' in l]
    assert sum(float(l.rsplit(" ", 1)[1]) for l in frames) == 200
    size = [l for l in scrape().splitlines() if l.startswith("ray_collectors_buffer_size{")
            and 'collector="metrics-rb"' in l]
    assert float(size[0].rsplit(" ", 1)[1]) == 200
    rb.shutdown()


def test_cli_runs_a_job_and_rejects_bad_input(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"job": {"env": "CartPole-v1", "collector": "multisync",
                                           "num_workers": 2, "frames_per_batch": 200,
                                           "total_frames": 1000}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(job), "--quiet",
                          "--total-frames", "600"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Ray dashboard: http://127.0.0.1:" in out.stdout
    assert "frames/s" in out.stdout and "600" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"job": {"env": "NoSuchEnv-v0"}}))
    out = subprocess.run([sys.executable, "-m", "collectors", "run", str(bad)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "NoSuchEnv-v0" in out.stderr
