"""Replay-buffer checkpoints: never unpickled, never written over a foreign directory, atomic
and durable (a kill mid-checkpoint restores the old or the new state, whole), validated."""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tensordict import NonTensorData, TensorDict

from actors.storage.checkpoints import CheckpointError
from actors.storage.replay_buffer import ReplayBufferActor
from collectors import RayReplayBuffer


def frames(start, n):
    return TensorDict({"x": torch.arange(start, start + n, dtype=torch.float32)[:, None]}, [n])


def test_a_foreign_directory_is_never_written_into(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("print('precious')\n")
    rb = ReplayBufferActor(10)
    rb.extend(frames(0, 5))
    with pytest.raises(CheckpointError, match="not a ray-collectors checkpoint"):
        rb.checkpoint(str(src))
    assert (src / "main.py").read_text() == "print('precious')\n"
    with pytest.raises(CheckpointError, match="not a ray-collectors checkpoint"):
        ReplayBufferActor(10, checkpoint_dir=str(src), checkpoint_every=1)
    with pytest.raises(ValueError, match="not a ray-collectors checkpoint"):
        RayReplayBuffer(10, checkpoint_dir=str(src))
    assert sorted(os.listdir(src)) == ["main.py"]


def test_restore_never_unpickles(tmp_path):
    path = str(tmp_path / "ckpt")
    rb = ReplayBufferActor(5)
    rb.extend(frames(0, 5))
    rb.checkpoint(path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    version = glob.glob(os.path.join(path, "v*"))[0]
    evil = TensorDict({"x": torch.zeros(5, 1), "obj": NonTensorData(Evil(), batch_size=[5])}, [5])
    import shutil

    shutil.rmtree(os.path.join(version, "storage"))
    evil.memmap(os.path.join(version, "storage"))
    with pytest.raises(CheckpointError):
        ReplayBufferActor(5, checkpoint_dir=path)
    assert not marker.exists()


def test_damaged_versions_fall_back_or_fail_clearly(tmp_path):
    path = str(tmp_path / "ckpt")
    rb = ReplayBufferActor(20)
    rb.extend(frames(0, 5))
    rb.checkpoint(path)  # v1: 5 frames
    rb.extend(frames(5, 5))
    rb.checkpoint(path)  # v2: 10 frames
    (x_file,) = glob.glob(os.path.join(path, "v000002", "storage", "x.memmap"))
    size = os.path.getsize(x_file)
    with open(x_file, "r+b") as fh:
        fh.truncate(size // 2)
    restored = ReplayBufferActor(20, checkpoint_dir=path)
    assert len(restored) == 5 and restored.restored_from.endswith("v000001")  # the older, whole
    assert os.path.getsize(x_file) == size // 2  # the load did not "repair" the short file
    meta_file = os.path.join(path, "v000001", "meta.json")
    meta = open(meta_file).read().replace('"size": 5', '"size": 50')
    open(meta_file, "w").write(meta)
    with pytest.raises(CheckpointError, match="no valid checkpoint.*out of range"):
        ReplayBufferActor(20, checkpoint_dir=path)


KILLER = textwrap.dedent("""
    import sys, torch
    from tensordict import TensorDict
    from actors.storage.replay_buffer import ReplayBufferActor
    path = sys.argv[1]
    rb = ReplayBufferActor(4000, checkpoint_dir=path)
    n = rb.write_count
    print("READY", flush=True)
    while True:  # each state: every stored frame's value is the write count when it was stored
        n += 1000
        rb.extend(TensorDict({"x": torch.full((1000, 64), float(n))}, [1000]))
        rb.checkpoint(path)
""")


def test_a_kill_in_the_middle_of_a_checkpoint_restores_old_or_new_whole(tmp_path):
    path = str(tmp_path / "ckpt")
    seen = set()
    for delay in (0.05, 0.15, 0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, path], stdout=subprocess.PIPE,
                                text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        try:
            assert proc.stdout.readline().strip() == "READY"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        if not os.path.exists(os.path.join(path, "CURRENT")):
            continue  # killed before the first checkpoint finished: nothing to restore yet
        rb = ReplayBufferActor(4000, checkpoint_dir=path)
        n, size = rb.write_count, len(rb)
        assert size == min(n, 4000)
        values = rb.storage["x"][:size, 0]
        newest = values.max().item()
        assert newest == n  # the newest frames are from the state the counters describe
        assert (rb.storage["x"][:size] == rb.storage["x"][:size, :1]).all()  # no torn frame
        seen.add(n)
    assert len(seen) >= 2  # the state kept moving between kills
