"""Replay-buffer storage in shared memory, so a trainer on the same node samples without a call.

The buffer actor (the only writer) keeps its ring of frames in files under ``/dev/shm``; a
trainer on the same node maps them and draws uniform samples itself, so sampling costs neither
a round trip nor CPU time of the buffer actor while collectors write.

Torn reads are ruled out per slot, seqlock style: the writer sets a slot's stamp to -1, writes
the frame, then sets the stamp to a new, larger value; a reader copies stamps, frames, stamps
again, and redraws any slot whose two stamps differ or are negative. Stores and loads keep
their program order on x86 (TSO), which is what this relies on; elsewhere it is not used.
"""
from __future__ import annotations

import os
import platform
import shutil
import uuid

import torch

SHM_ROOT = "/dev/shm/ray-collectors"
HEADER = 2  # [size, closed]


def shareable(nbytes: int) -> bool:
    """True when ``nbytes`` of storage fits comfortably in ``/dev/shm`` on an x86 machine."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm"):
        return False
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return nbytes * 2 < stat.f_bavail * stat.f_frsize


def remove_stale() -> None:
    """Delete ring folders whose writer process is gone (a buffer actor that was killed)."""
    try:
        names = os.listdir(SHM_ROOT)
    except OSError:
        return
    for name in names:
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(SHM_ROOT, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except (OSError, IndexError):
        return False


def _mapped(path: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


class SharedRing:
    """The writer side: ``tensors`` (key -> ``[capacity, ...]`` tensor) live in shared files."""

    def __init__(self, template: dict, capacity: int):
        self.dir = os.path.join(SHM_ROOT, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.dir)
        self.layout = []  # (key, file, per-frame shape, dtype name)
        self.tensors = {}
        for i, (key, value) in enumerate(template.items()):
            shape = (capacity, *value.shape[1:])
            path = os.path.join(self.dir, f"{i}.bin")
            self.tensors[key] = _mapped(path, shape, value.dtype)
            self.layout.append((key, path, list(shape), str(value.dtype).split(".")[-1]))
        self.stamps = _mapped(os.path.join(self.dir, "stamps.bin"), (capacity,), torch.int64)
        self.stamps.fill_(-1)
        self.header = _mapped(os.path.join(self.dir, "header.bin"), (HEADER,), torch.int64)
        self.header.zero_()
        self.version = 0

    def location(self) -> dict:
        return {"dir": self.dir, "pid": os.getpid(), "layout": self.layout,
                "capacity": int(self.stamps.shape[0])}

    def begin(self, idx: torch.Tensor) -> None:
        self.stamps[idx] = -1

    def end(self, idx: torch.Tensor, size: int) -> None:
        self.version += 1
        self.stamps[idx] = self.version
        self.header[0] = size

    def stamp_all(self, size: int) -> None:
        """After a restore or ``empty()``: slots below ``size`` hold frames, the rest none."""
        self.stamps.fill_(-1)
        self.version += 1
        self.stamps[:size] = self.version
        self.header[0] = size

    def close(self) -> None:
        if os.path.isdir(self.dir):
            self.header[1] = 1
            shutil.rmtree(self.dir, ignore_errors=True)


class RingReader:
    """The reader side, in the trainer: uniform samples with replacement from a mapped ring."""

    def __init__(self, location: dict, seed: int | None = None):
        self.dir = location["dir"]
        self.pid = location["pid"]
        self.tensors = {key: _mapped(path, tuple(shape), getattr(torch, dtype))
                        for key, path, shape, dtype in location["layout"]}
        capacity = location["capacity"]
        self.stamps = _mapped(os.path.join(self.dir, "stamps.bin"), (capacity,), torch.int64)
        self.header = _mapped(os.path.join(self.dir, "header.bin"), (HEADER,), torch.int64)
        self.gen = torch.Generator()
        self.gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))

    def usable(self) -> bool:
        """False once the writer closed the ring or its process is gone."""
        return int(self.header[1]) == 0 and _alive(self.pid)

    def size(self) -> int:
        return int(self.header[0])

    def sample(self, n: int) -> tuple[dict, torch.Tensor] | None:
        """``({key: tensor[n, ...]}, index)``, or ``None`` while the ring holds no frame."""
        size = self.size()
        if size <= 0:
            return None
        idx = torch.randint(0, size, (n,), generator=self.gen)
        for _ in range(1000):
            before = self.stamps[idx]
            out = {key: t[idx] for key, t in self.tensors.items()}
            torn = (self.stamps[idx] != before) | (before < 0)
            if not bool(torn.any()):
                return out, idx
            idx[torn] = torch.randint(0, max(1, self.size()), (int(torn.sum()),), generator=self.gen)
        return None  # the writer keeps overwriting what we draw: let the caller use the actor
