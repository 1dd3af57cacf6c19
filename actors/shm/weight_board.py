"""Policy weights in shared memory: the trainer writes them once, each env actor on the node
copies them into its policy between batches when their version moved. No Ray call, no object
store copy, no message per worker.

One file per collector in its private folder (see :mod:`actors.storage.shared_ring`): a header of int64
``[seq, version, wanted[0], ..., wanted[W-1]]``, then every tensor of the policy's state dict at
a 64-byte aligned offset. ``seq`` is a seqlock: odd while the trainer writes, so a reader that
saw an odd value, or a different one after its copy, copies again and never keeps a torn set.
``wanted[i]`` is the version worker ``i`` should run (``update_policy_weights_(worker_ids=...)``
sets it for the named workers only). Stores and loads keep their program order on x86 (TSO),
which the seqlock relies on; the collectors use the board only there.

Example:
    >>> import os, tempfile, torch
    >>> net = torch.nn.Linear(2, 2)
    >>> board = WeightBoard(tempfile.mkdtemp(), net.state_dict(), num_workers=1)
    >>> reader = BoardReader(board.spec(), 0, torch.nn.Linear(2, 2))
    >>> board.write(net.state_dict(), version=1)
    >>> reader.poll(), reader.poll()
    (1, None)
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch

from actors.errors import WeightSyncError

ALIGN = 64
READ_TRIES = 10_000  # seqlock retries (each waits 0.1 ms while the trainer is mid-write)


def _layout(state: dict, offset: int) -> tuple[list, int]:
    """``[(key, dtype name, shape, offset, nbytes)]`` and the total size in bytes."""
    out = []
    for key, t in state.items():
        offset = -(-offset // ALIGN) * ALIGN
        nbytes = t.numel() * t.element_size()
        out.append((key, str(t.dtype).split(".")[-1], tuple(t.shape), offset, nbytes))
        offset += nbytes
    return out, max(offset, 1)


def _views(buf: torch.Tensor, layout: list) -> list[torch.Tensor]:
    return [buf[off:off + n].view(getattr(torch, dtype)).view(shape)
            for _, dtype, shape, off, n in layout]


class WeightBoard:
    """The trainer's side: creates the board file in ``folder`` from ``state`` (a state dict)."""

    def __init__(self, folder: str, state: dict, num_workers: int):
        self.num_workers = int(num_workers)
        self.path = os.path.join(folder, "weights.bin")
        self.layout, self.nbytes = _layout(state, 8 * (2 + self.num_workers))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.nbytes)  # ENOSPC now rather than SIGBUS later
        finally:
            os.close(fd)
        buf = torch.from_file(self.path, shared=True, size=self.nbytes, dtype=torch.uint8)
        self.header = buf[:8 * (2 + self.num_workers)].numpy().view(np.int64)
        self.views = _views(buf, self.layout)
        self.writes = 0  # how many times the weights were written

    def spec(self) -> dict:
        """What a reader needs (small, picklable)."""
        return {"path": self.path, "layout": self.layout, "nbytes": self.nbytes,
                "num_workers": self.num_workers}

    def write(self, state: dict, version: int, worker_ids=None) -> None:
        """Copy ``state``'s tensors (same keys, shapes and dtypes as at creation; any device) in,
        then mark ``version`` wanted by ``worker_ids`` (default: every worker)."""
        tensors = [state[key] for key, *_ in self.layout]
        hdr = self.header
        hdr[0] += 1  # odd: readers wait
        try:
            for dst, src in zip(self.views, tensors):
                dst.copy_(src.detach())
            hdr[1] = int(version)
        finally:
            hdr[0] += 1
        for i in range(self.num_workers) if worker_ids is None else worker_ids:
            hdr[2 + int(i)] = int(version)
        self.writes += 1


class BoardReader:
    """An env actor's side: ``poll()`` copies the board into ``module`` when ``wanted[index]``
    moved, and returns the version it loaded (``None``: nothing new)."""

    def __init__(self, spec: dict, index: int, module):
        path = spec["path"]
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or st.st_uid != os.getuid():
            raise WeightSyncError(f"weight board {path} is not a regular file of uid {os.getuid()}")
        self.index = int(index)
        mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(spec["nbytes"],))
        with warnings.catch_warnings():  # read-only memory: only ever copied from
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.from_numpy(mapped)
        self._mapped = mapped
        self.header = np.asarray(mapped[:8 * (2 + spec["num_workers"])]).view(np.int64)
        self.sources = _views(buf, spec["layout"])
        state = module.state_dict()  # tensors that share their storage with the module's
        theirs = [(k, str(t.dtype).split(".")[-1], tuple(t.shape)) for k, t in state.items()]
        ours = [(k, d, tuple(s)) for k, d, s, _, _ in spec["layout"]]
        if sorted(theirs) != sorted(ours):
            raise WeightSyncError(
                f"the env actor's policy does not match the trainer's weights: it has "
                f"{theirs[:4]}..., the trainer sends {ours[:4]}.... Give the collector the same "
                "policy (or a policy_factory that builds the same architecture).")
        self.targets = [state[k] for k, *_ in spec["layout"]]
        self.seen = 0  # the wanted version last loaded (0: the weights the actor started with)
        self.loads = 0

    def poll(self) -> int | None:
        wanted = int(self.header[2 + self.index])
        if wanted == self.seen:
            return None
        hdr = self.header
        for _ in range(READ_TRIES):
            before = int(hdr[0])
            if before & 1:
                time.sleep(1e-4)
                continue
            with torch.no_grad():
                for dst, src in zip(self.targets, self.sources):
                    dst.copy_(src)
            version = int(hdr[1])
            if int(hdr[0]) == before:
                self.seen = wanted
                self.loads += 1
                return version
        raise WeightSyncError("the weight board stayed mid-write for over a second; the "
                              "trainer writing it may have died.")

    def mark_seen(self) -> None:
        """The actor loaded these weights another way (a restored state dict): what the board
        wants for it now counts as loaded."""
        self.seen = int(self.header[2 + self.index])
