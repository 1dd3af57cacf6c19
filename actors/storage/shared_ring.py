"""Replay-buffer storage in shared memory, so a trainer on the same node samples without a call.

The buffer actor (the only writer) keeps its ring of frames in files under a per-user folder of
``/dev/shm``; a trainer on the same node maps them read-only and draws uniform samples itself,
so sampling costs neither a round trip nor CPU time of the buffer actor while collectors write.

Safety:
- The root ``/dev/shm/ray-collectors-<uid>`` is created 0700; its owner, mode and type (a real
  directory, not a symlink) are checked by writer and reader, and anything else means "no shared
  storage" (sampling falls back to calls, said once in the log).
- Space is reserved when the ring is made (``posix_fallocate``), so a short ``/dev/shm`` is
  found then, not by a SIGBUS at a later write.
- The writer holds an exclusive ``flock`` on its ring's lock file for as long as it lives; a
  ring whose lock can be taken has no writer (the kernel drops the lock with the process, in
  any pid namespace), which is how readers notice a dead buffer and how stale rings are found.
- Readers open every file read-only and never create one.

Torn reads are ruled out per slot, seqlock style: the writer sets a slot's stamp to -1, writes
the frame, then sets the stamp to a new, larger value; a reader copies stamps, frames, stamps
again, and redraws any slot whose two stamps differ or are negative. Stores and loads keep
their program order on x86 (TSO), which is what this relies on; elsewhere it is not used.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import warnings

import numpy as np
import torch

from actors.shm.folders import LOCK, check_private, private_folder, shm_root, writer_gone
from actors.storage.gather import rows

log = logging.getLogger("ray_collectors.shared_ring")

HEADER = 3  # [size, closed, generation of a compact ring's side files]
GEN = 2


def _reserve(path: str, nbytes: int) -> None:
    """Create ``path`` (0600, new) with ``nbytes`` reserved: ENOSPC here, not SIGBUS later."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)


def _writable(path: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    _reserve(path, numel * torch.empty((), dtype=dtype).element_size())
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


def _read_only(path: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A read-only shared mapping (``PROT_READ``) of an existing regular file: never created,
    never written (a write through it would fault, so the reader only indexes, which copies)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{path} is not a regular file of ours")
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    array = np.memmap(path, dtype=np_dtype, mode="r", shape=tuple(shape))
    with warnings.catch_warnings():  # torch warns that the memory is not writable: intended
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    tensor.mapped = array  # keeps the mapping visible (and checkable) for the tensor's life
    return tensor


class SharedRing:
    """The writer side: ``tensors`` (key -> ``[capacity, ...]`` tensor) live in shared files."""

    def __init__(self, template: dict, capacity: int):
        self.dir, self._lock_fd = private_folder()
        try:
            self.layout = []  # (key, file, per-frame shape, dtype name)
            self.tensors = {}
            for i, (key, value) in enumerate(template.items()):
                shape = (capacity, *value.shape[1:])
                path = os.path.join(self.dir, f"{i}.bin")
                self.tensors[key] = _writable(path, shape, value.dtype)
                self.layout.append((key, path, list(shape), str(value.dtype).split(".")[-1]))
            self.stamps = _writable(os.path.join(self.dir, "stamps.bin"), (capacity,), torch.int64)
            self.stamps.fill_(-1)
            self.header = _writable(os.path.join(self.dir, "header.bin"), (HEADER,), torch.int64)
            self.header.zero_()
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.version = 0

    def location(self) -> dict:
        return {"dir": self.dir, "pid": os.getpid(), "layout": self.layout,
                "capacity": int(self.stamps.shape[0])}

    def begin(self, idx: torch.Tensor) -> None:
        self.stamps[idx] = -1

    def end(self, idx: torch.Tensor, size: int) -> None:
        """The slots ``idx`` hold frames again (those below ``size``: a write that failed
        leaves never-written slots unstamped)."""
        self.version += 1
        self.stamps[idx[idx < size]] = self.version
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class RingReader:
    """The reader side, in the trainer: uniform samples with replacement from a mapped ring."""

    def __init__(self, location: dict, seed: int | None = None):
        self.dir = location["dir"]
        if os.path.dirname(self.dir) != shm_root():
            raise OSError(f"{self.dir} is not under this user's {shm_root()}")
        check_private(shm_root())
        check_private(self.dir)
        self.tensors = {key: _read_only(path, tuple(shape), getattr(torch, dtype))
                        for key, path, shape, dtype in location["layout"]
                        if os.path.dirname(path) == self.dir}
        if len(self.tensors) != len(location["layout"]):
            raise OSError("the ring's files are not all in its folder")
        capacity = location["capacity"]
        self.stamps = _read_only(os.path.join(self.dir, "stamps.bin"), (capacity,), torch.int64)
        self.header = _read_only(os.path.join(self.dir, "header.bin"), (HEADER,), torch.int64)
        self.lock_path = os.path.join(self.dir, LOCK)
        self.gen = torch.Generator()
        self.gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))

    def usable(self) -> bool:
        """False once the writer closed the ring or its process is gone."""
        return int(self.header[1]) == 0 and not writer_gone(self.lock_path)

    def size(self) -> int:
        return int(self.header[0])

    def stale(self) -> bool:
        """Whether the mapping needs a new layout from the actor (a compact ring's may)."""
        return False

    def sample(self, n: int) -> tuple[dict, torch.Tensor] | None:
        """``({key: tensor[n, ...]}, index)``, or ``None`` while the ring holds no frame."""
        size = self.size()
        if size <= 0:
            return None
        idx = torch.randint(0, size, (n,), generator=self.gen)
        for _ in range(1000):
            before = rows(self.stamps, idx)
            out = {key: rows(t, idx) for key, t in self.tensors.items()}
            torn = (rows(self.stamps, idx) != before) | (before < 0)
            if not bool(torn.any()):
                return out, idx
            idx[torn] = torch.randint(0, max(1, self.size()), (int(torn.sum()),), generator=self.gen)
        return None  # the writer keeps overwriting what we draw: let the caller use the actor
