"""Shared-memory storage: a private per-user root, read-only readers that never create files,
space reserved up front (a short /dev/shm falls back at allocation), liveness by lock."""
import os
import subprocess

import pytest
import torch
from tensordict import TensorDict

from actors.shm import folders
from actors.storage.replay_buffer import ReplayBufferActor
from actors.storage.shared_ring import RingReader, SharedRing

TEMPLATE = {"x": torch.zeros(1, 4), ("next", "y"): torch.zeros(1, dtype=torch.int64)}


def test_root_is_private_and_checked(tmp_path):
    root = folders.private_root()
    st = os.lstat(root)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(OSError, match="mode"):
        folders.check_private(str(loose))
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.raises(OSError, match="not a plain directory"):
        folders.check_private(str(link))


def test_reader_maps_read_only_and_never_creates_files():
    ring = SharedRing(TEMPLATE, 16)
    try:
        idx = torch.arange(16)
        ring.begin(idx)
        ring.tensors["x"][idx] = 1.0
        ring.end(idx, 16)
        reader = RingReader(ring.location(), seed=0)
        out, index = reader.sample(8)
        assert (out["x"] == 1.0).all() and reader.usable()
        mapped = [t.mapped for t in [*reader.tensors.values(), reader.stamps, reader.header]]
        assert all(m.mode == "r" and not m.flags.writeable for m in mapped)  # PROT_READ maps
        missing = dict(ring.location(), layout=[("x", os.path.join(ring.dir, "nope.bin"), [16, 4], "float32")])
        with pytest.raises(OSError):
            RingReader(missing)
        assert not os.path.exists(os.path.join(ring.dir, "nope.bin"))
        outside = dict(ring.location(), dir="/tmp")
        with pytest.raises(OSError, match="not under"):
            RingReader(outside)
    finally:
        ring.close()
    assert not reader.usable()  # closed: readers notice


def test_a_slot_left_mid_write_is_never_returned():
    ring = SharedRing(TEMPLATE, 4)
    try:
        idx = torch.arange(4)
        ring.begin(idx)
        ring.tensors["x"][idx] = torch.arange(4, dtype=torch.float32)[:, None]
        ring.end(idx, 4)
        ring.begin(torch.tensor([2]))  # a writer stopped between begin and end of slot 2
        ring.tensors["x"][2] = -1.0
        reader = RingReader(ring.location(), seed=0)
        for _ in range(200):
            got = reader.sample(4)
            if got is None:
                continue
            out, index = got
            assert 2 not in index.tolist() and (out["x"] >= 0).all()
    finally:
        ring.close()


def test_a_dead_writer_is_noticed_by_its_lock_and_its_ring_removed():
    code = ("import time, torch\nfrom actors.storage.shared_ring import SharedRing\n"
            "r = SharedRing({'x': torch.zeros(1, 2)}, 8)\nprint(r.dir, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen(["python", "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        folder = proc.stdout.readline().strip()
        lock = os.path.join(folder, folders.LOCK)
        assert not folders.writer_gone(lock)
        folders.remove_stale()
        assert os.path.isdir(folder)  # alive: kept
    finally:
        proc.kill()
        proc.wait(10)
    assert folders.writer_gone(lock)
    folders.remove_stale()
    assert not os.path.exists(folder)


@pytest.fixture
def small_shm(tmp_path, monkeypatch):
    """A 1 MiB tmpfs standing in for /dev/shm (CI runs as root, so it can mount one)."""
    mount = tmp_path / "shm"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.fail("could not mount a tmpfs; this test needs root (as in CI)")
    monkeypatch.setattr(folders, "SHM", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_short_shm_fails_at_allocation_and_the_buffer_falls_back(small_shm, monkeypatch):
    big = {"x": torch.zeros(1, 1024)}  # 4 KiB per frame: 1000 frames need about 4 MiB
    with pytest.raises(OSError):
        SharedRing(big, 1000)
    assert os.listdir(folders.private_root()) == []  # nothing half-made is left
    import actors.storage.replay_buffer as body

    monkeypatch.setattr(body, "shareable", lambda nbytes: True)
    rb = ReplayBufferActor(1000, share=True)
    rb.extend(TensorDict({"x": torch.ones(10, 1024)}, [10]))
    assert rb.ring is None and len(rb) == 10  # private storage, still working
    assert rb.sample(4)["x"].shape == (4, 1024)
