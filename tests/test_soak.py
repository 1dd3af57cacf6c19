"""A one-minute soak (scripts/soak.py): background collection into a checkpointed buffer with a
rate limit, random worker kills, a buffer kill and restore, and a pausing trainer; nothing may
be lost or stored twice."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_minute_soak_loses_nothing_and_stores_nothing_twice():
    out = subprocess.run([sys.executable, "scripts/soak.py", "--minutes", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = dict(line.strip().split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert report["buffer killed"] == "True" and int(report["worker kills"]) >= 2
    assert int(report["stored"]) == int(report["delivered"]) > 10_000
    assert report["duplicated"] == "0" and report["written but not stored"] == "[]"
    assert "nothing lost, nothing stored twice" in out.stdout
