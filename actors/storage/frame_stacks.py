"""``FrameStacks``: store each frame of a stacked observation once; rebuild stacks at sample.

A stacked observation ``[S, ...]`` (gymnasium's ``FrameStackObservation``: the last ``S``
frames, oldest first) is the previous step's stack shifted by one frame, plus the new frame.
Each slot of the ring keeps only its newest frame. A slot whose stack is the previous slot's
shifted (checked at write time, never assumed) is *derived*: the rest of its stack is read back
from the slots before it. Every other stack is kept whole in a side store: the first of each
write (its predecessor in the ring belongs to another write) and any whose shift does not hold
(an episode's first step, an env that does not stack).

The ring overwrites slots in cursor order, so a derived slot can outlive the slots it reads
from: before a write, the ``S - 1`` live slots right after the region it overwrites get their
stacks kept whole if they were derived. Samples therefore equal those of a plain storage.
Memory: one frame per slot plus a few whole stacks per write (about 0.27x the stacks for
4 x 84 x 84 Pong frames written 256 at a time).

Example:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> frames = torch.arange(6.0)[:, None]               # one 1-pixel frame per step
    >>> stacks = torch.stack([frames[t:t + 2] for t in range(4)])  # [4 steps, 2 frames, 1]
    >>> f = FrameStacks(capacity=8)
    >>> stored = f.strip(TensorDict({"obs": stacks}, [4]), torch.arange(4), (("obs",),), None, 0)
    >>> stored["obs"].ravel().tolist()                    # newest frames only
    [1.0, 2.0, 3.0, 4.0]
    >>> ring = TensorDict({"obs": torch.zeros(8, 1)}, [8])
    >>> ring[:4] = stored
    >>> f.stacks(("obs",), torch.tensor([0, 3]), ring).squeeze(-1).tolist()
    [[0.0, 1.0], [3.0, 4.0]]
"""
from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict

from actors.storage.gather import rows
from actors.storage.side_store import SideStore


class FrameStacks:
    def __init__(self, capacity: int, files=None):
        self.capacity = int(capacity)
        self.sizes: dict = {}  # root key -> stack size S, for the keys stored frame by frame
        self.side = SideStore(self.capacity, files)  # whole stacks of slots not derived

    def check(self, td: TensorDict, keys: tuple) -> None:
        """Find the stacked keys at the first write (stacks of at least 2 frames); refuse a
        write whose stacks have another size. Changes nothing else."""
        if not self.sizes:
            self.sizes = {k: td.get(k).shape[1] for k in keys
                          if td.get(k).dim() >= 3 and td.get(k).shape[1] >= 2}
        for key, size in self.sizes.items():
            if td.get(key).shape[1] != size:
                raise ValueError(
                    f"entry {key!r}: this buffer stores stacks of {size} frames "
                    f"(compact_obs='frames'), got {td.get(key).shape[1]}.")

    def strip(self, td: TensorDict, idx: torch.Tensor, keys: tuple, storage: TensorDict | None,
              size: int) -> TensorDict:
        """``td`` (flat frames for slots ``idx``) with each stacked key cut to its newest frame;
        the stacks that cannot be derived are kept whole."""
        self.check(td, keys)
        if not self.sizes:
            return td
        n = td.shape[0]
        if storage is not None and size:
            self._keep_whole_after(idx, storage, size)
        self.side.release(idx)
        apart = torch.zeros(n, dtype=torch.bool)
        apart[0] = True  # the first of the write: the slot before it belongs to another write
        for key in self.sizes:
            value = td.get(key)
            if n > 1:  # derived only where every stacked key is the previous one shifted
                apart[1:] |= ~(value[1:, :-1] == value[:-1, 1:]).reshape(n - 1, -1).all(1)
        self.side.put(idx[apart], {key: td.get(key)[apart] for key in self.sizes})
        td = td.copy()
        for key in self.sizes:
            td.set(key, td.get(key)[:, -1].contiguous())
        return td

    def _keep_whole_after(self, idx: torch.Tensor, storage: TensorDict, size: int) -> None:
        """The live derived slots right after the region ``idx`` overwrites read frames from it:
        keep their stacks whole first. (Slots ``[0, size)`` are live: the ring fills in order.)"""
        after = self.after(idx, size)
        after = after[self.side.slot[after] < 0]
        if len(after):
            self.side.put(after, {key: self.stacks(key, after, storage) for key in self.sizes})

    def after(self, idx: torch.Tensor, size: int) -> torch.Tensor:
        """The live slots whose stacks may read frames from the region ``idx`` overwrites (a
        write may keep them whole: their side entries change)."""
        reach = max(self.sizes.values()) - 1 if self.sizes else 0
        after = (idx[-1] + 1 + torch.arange(max(0, min(reach, self.capacity - len(idx))))) \
            % self.capacity
        return after[after < size]

    def stacks(self, key, slots: torch.Tensor, storage: TensorDict, into=None) -> torch.Tensor:
        """The whole stacks of ``key`` at ``slots``: newest frames from the ring, older ones
        from the slots before (while derived) or from the first slot kept whole.

        Where each frame comes from is worked out on the indices first; then one row gather
        copies every frame from the ring (into ``into`` when it has the stacks' shape) and the
        few read from kept stacks replace theirs."""
        size, n = self.sizes[key], len(slots)
        frames = storage.get(key)
        kept = self.side.slot.numpy()  # (numpy: this index math is on a few dozen integers)
        at_slot = slots.numpy()
        source = np.empty((n, size), dtype=np.int64)  # ring slot of each frame...
        kept_at = np.full((n, size), -1, dtype=np.int64)  # ...or its row in ``whole``
        source[:, -1] = at_slot
        row = kept[at_slot]  # the whole stack the rest comes from (-1: none yet)
        back = np.zeros(n, dtype=np.int64)  # how many slots before ``slots`` that stack is
        for d in range(1, size):
            j = size - 1 - d
            chain = row < 0
            earlier = (at_slot - d) % self.capacity
            source[:, j] = earlier
            kept_at[:, j] = np.where(chain, -1, row * size + j + back)
            there = kept[earlier]
            found = chain & (there >= 0)
            row = np.where(found, there, row)
            back = np.where(found, d, back)
        kept_at = kept_at.ravel()
        flat = into.view(-1, *frames.shape[1:]) if into is not None \
            and into.shape == (n, size, *frames.shape[1:]) else None
        # (a kept frame's slot is read, then replaced)
        out = rows(frames, torch.from_numpy(source.ravel()), flat)
        at = np.flatnonzero(kept_at >= 0)
        if len(at):
            whole = self.side.values[key].view(-1, *frames.shape[1:])
            out.index_copy_(0, torch.from_numpy(at), rows(whole, torch.from_numpy(kept_at[at])))
        return out.view(n, size, *frames.shape[1:])
