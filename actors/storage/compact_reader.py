"""``CompactReader``: uniform samples of a compact ring (``compact_obs``), rebuilt in the trainer.

The buffer actor's compact ring keeps each observation (or each frame of a stack) once, plus
side stores for the values no neighbouring slot holds (:mod:`actors.storage.compact_storage`).
When all of it lives in shared files (:mod:`actors.storage.side_files`), a trainer on the node
maps it read-only and rebuilds next observations and stacks itself, with the same code the
actor uses, so a sample costs no call and no CPU time of the actor.

Consistency, as for a plain ring: the writer sets the stamps of every slot a write may change
to -1 first (the slots it overwrites, and the live slots whose stacks read frames from them,
which it may keep whole), writes, then stamps them anew. A sampled slot whose stamp held still,
and non-negative, across the read was rebuilt from values that did not change: its next value
comes from the following slot only while both came from one write, and its stack reads back
only from slots that cannot be overwritten without touching its own stamp. A slot it reads
back from may be kept whole meanwhile (that slot's stamp, not the sampled one's, is cleared):
its stack is then written into a row before its side entry names the row, so the sample reads
the same frames either way. A side store that grew is in new files: the header's generation
changed (before any entry names a row of the new files), and the sample is left to the actor
while the reader asks for the new layout.
"""
from __future__ import annotations

import os

import torch
from tensordict import TensorDict

from actors.storage.compact_storage import CompactNext
from actors.storage.gather import rows
from actors.storage.shared_ring import GEN, RingReader, _read_only


class CompactReader(RingReader):
    """The reader side of a compact ring; ``location["side"]`` is the actor's layout."""

    def __init__(self, location: dict, seed: int | None = None):
        super().__init__(location, seed)
        side = location["side"]
        self.side_gen = int(side["gen"])
        capacity = location["capacity"]
        self.compact = CompactNext(capacity, frames=side.get("frames") is not None)
        self.compact.keys = tuple(tuple(k) for k in side["keys"] or ())
        if self.compact.frames is not None:
            self.compact.frames.sizes = {tuple(k): int(s) for k, s in side["frames"]}
        self._map(self.compact.side, side["side"])
        if self.compact.frames is not None:
            self._map(self.compact.frames.side, side["frame_side"])
        self.storage = TensorDict(batch_size=[capacity])
        for key, tensor in self.tensors.items():
            self.storage.set(key, tensor)
        skip = set(self.compact.rebuilt_keys())
        self.plain = [(k, t) for k, t in self.tensors.items() if k not in skip]

    def _map(self, store, layout: dict) -> None:
        store.slot = self._file(*layout["slot"])
        store.values = {tuple(k): self._file(*where) for k, where in layout["values"]}

    def _file(self, path: str | None, shape: list, dtype: str) -> torch.Tensor:
        if path is None:  # an empty store: nothing to map
            if any(shape):
                raise OSError("a side store is not in shared memory")
            return torch.zeros(shape, dtype=getattr(torch, dtype))
        if os.path.dirname(path) != self.dir:
            raise OSError("the side store's files are not in the ring's folder")
        return _read_only(path, tuple(shape), getattr(torch, dtype))

    def stale(self) -> bool:
        """The side stores moved to new files: ask the actor for the layout again."""
        return int(self.header[GEN]) != self.side_gen

    def sample(self, n: int) -> tuple[dict, torch.Tensor] | None:
        """``({key: tensor[n, ...]}, index)`` with next values and stacks rebuilt; ``None``
        while the ring is empty, or when the actor must draw this one (files moved)."""
        size = self.size()
        if size <= 0 or self.stale():
            return None
        idx = torch.randint(0, size, (n,), generator=self.gen)
        for _ in range(1000):
            before = rows(self.stamps, idx)
            try:
                out = {key: rows(t, idx) for key, t in self.plain}
                self.compact.rebuild(out, idx, self.storage)
            except (IndexError, KeyError, RuntimeError):  # rows of files not mapped here
                return None
            if self.stale():
                return None
            torn = (rows(self.stamps, idx) != before) | (before < 0)
            if not bool(torn.any()):
                return out, idx
            redraw = (int(torn.sum()),)
            idx[torn] = torch.randint(0, max(1, self.size()), redraw, generator=self.gen)
        return None
