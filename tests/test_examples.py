"""The training examples: a smoke run of each, and (slow) PPO actually learning."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=300):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def read_curve(path):
    with open(os.path.join(path, "curve.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ["frames", "seconds", "mean_return"]
    assert os.path.getsize(os.path.join(path, "curve.png")) > 1000
    return rows


def test_ppo_smoke(tmp_path):
    run(["scripts/train_ppo.py", "--out", str(tmp_path), "--total-frames", "3072"])
    rows = read_curve(tmp_path)
    assert int(rows[-1]["frames"]) == 3072


def test_sac_smoke(tmp_path):
    run(["scripts/train_sac.py", "--out", str(tmp_path), "--updates", "500"])
    rows = read_curve(tmp_path)
    assert int(rows[-1]["frames"]) > 0


@pytest.mark.slow
def test_ppo_improves_on_cartpole(tmp_path):
    run(["scripts/train_ppo.py", "--out", str(tmp_path), "--total-frames", "60000"], timeout=900)
    rows = read_curve(tmp_path)
    first, last = float(rows[0]["mean_return"]), float(rows[-1]["mean_return"])
    assert last > 200 and last > 3 * first


@pytest.mark.slow
def test_sac_improves_on_pendulum(tmp_path):
    """Background collection into the buffer actor while the learner samples: the policy the
    workers run (pushed every 10 updates) must actually get better."""
    run(["scripts/train_sac.py", "--out", str(tmp_path), "--updates", "5000"], timeout=900)
    rows = read_curve(tmp_path)
    first, last = float(rows[0]["mean_return"]), float(rows[-1]["mean_return"])
    assert last > -400 and last > first + 300, (first, last)
