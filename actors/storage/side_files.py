"""``SideFiles``: the side stores of a compact ring in files of its shared folder.

A compact ring (``compact_obs``) keeps most next observations and older stack frames implicit
and the rest in side stores (:mod:`actors.storage.side_store`). For a trainer on the node to
rebuild samples itself (:mod:`actors.storage.compact_reader`), those stores live in files of
the ring's folder too. A store that grows gets new files (the old ones are unlinked; a reader's
mapping of them stays valid and consistent), and the ring header's generation counts new files,
so a reader knows when to ask for the new layout.

Space is reserved when a file is made; when ``/dev/shm`` is short, the store falls back to
private memory and the ring is closed to readers (they sample through the actor from then on).
"""
from __future__ import annotations

import logging
import math
import os

import torch

from actors.storage.shared_ring import GEN, SharedRing, _writable

log = logging.getLogger("ray_collectors.side_files")


class SideFiles:
    """``new(shape, dtype)``: a zeroed tensor in a new file of ``ring``'s folder."""

    def __init__(self, ring: SharedRing):
        self.ring = ring
        self.count = 0  # files made (names them)
        self.failed = False  # no more files: private tensors, ring closed to readers

    def new(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(int(d) for d in shape)
        if self.failed or math.prod(shape) == 0:
            return torch.zeros(shape, dtype=dtype)
        path = os.path.join(self.ring.dir, f"side{self.count}.bin")
        self.count += 1
        try:
            tensor = _writable(path, shape, dtype)  # a new file reads as zeros
        except OSError as exc:  # e.g. /dev/shm full: samplers use the actor from now on
            log.warning("compact replay-buffer storage leaves shared memory (%r)", exc)
            self.failed = True
            self.ring.close()
            return torch.zeros(shape, dtype=dtype)
        tensor.shm_path = path
        self.ring.header[GEN] += 1
        return tensor

    def drop(self, tensor: torch.Tensor) -> None:
        """``tensor`` is no longer used: unlink its file (mappings of it stay valid)."""
        path = getattr(tensor, "shm_path", None)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @staticmethod
    def where(tensor: torch.Tensor) -> list:
        """``[path or None, shape, dtype name]``: ``None`` for a private (empty) tensor."""
        return [getattr(tensor, "shm_path", None), list(tensor.shape),
                str(tensor.dtype).split(".")[-1]]
