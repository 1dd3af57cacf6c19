"""``CompactNext``: store each observation once in a ring; rebuild ``("next", obs)`` at sample.

In a trajectory, the next observation of frame ``t`` is the observation of frame ``t + 1``.
When a write puts those frames in adjacent slots, only the observation is stored and the next
one is read from the following slot at sample time. Every other next observation (episode ends,
the last frame of each write, and any frame whose next value differs from the following
frame's) is kept apart, in a small side store indexed by slot, so nothing is lost: samples equal
those of a plain storage.

Why the following slot stays valid: the ring overwrites slots in cursor order, so slot ``s`` is
always overwritten before slot ``s + 1`` (modulo the capacity) is; while ``s`` is alive, the
slot after it still holds what was written with it.

With ``frames=True`` stacked observations (``[S, ...]``, as gymnasium's
``FrameStackObservation`` makes them) also store each frame once: see :mod:`actors.storage.frame_stacks`.

Example:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> obs = torch.arange(4.0)[:, None]
    >>> td = TensorDict({"observation": obs, ("next", "observation"): obs + 1}, [4])
    >>> c = CompactNext(capacity=8)
    >>> stored = c.strip(td, torch.arange(4))     # what goes into the ring
    >>> sorted(map(str, stored.keys(True, True)))
    ['observation']
    >>> ring = TensorDict({"observation": torch.zeros(8, 1)}, [8])
    >>> ring[:4] = stored
    >>> index = torch.tensor([0, 3])
    >>> c.rebuild(ring[index].clone(), index, ring)["next", "observation"].ravel()
    tensor([1., 4.])
"""
from __future__ import annotations

import torch
from tensordict import TensorDict

from actors.stepping.compact import compacted_keys
from actors.storage.frame_stacks import FrameStacks
from actors.storage.gather import flat_key, rows
from actors.storage.side_store import SideStore


class CompactNext:
    """The per-slot bookkeeping of a compact ring of ``capacity`` slots."""

    def __init__(self, capacity: int, frames: bool = False, files=None):
        self.capacity = int(capacity)
        self.keys: tuple | None = None  # the root keys k whose ("next", k) is compacted
        # ("next", k) values no following slot holds; ``files``: in a shared ring's folder
        self.side = SideStore(self.capacity, files)
        self.frames = FrameStacks(self.capacity, files) if frames else None

    @property
    def side_slot(self) -> torch.Tensor:
        return self.side.slot

    # -- writes ------------------------------------------------------------------------------
    def find_keys(self, td: TensorDict) -> None:
        """Pick, at the first write, the root keys whose next value has the same shape and dtype."""
        if self.keys is not None:
            return
        self.keys = tuple(k for k in compacted_keys(td.keys(include_nested=True, leaves_only=True))
                          if td.get(k).shape == td.get(("next", *k)).shape
                          and td.get(k).dtype == td.get(("next", *k)).dtype)

    def stored_shape(self, key, shape: tuple) -> tuple:
        """The per-frame shape the ring holds for ``key`` written with ``shape``."""
        if self.frames is not None and key in self.frames.sizes:
            return shape[1:]
        return shape

    def strip(self, td: TensorDict, idx: torch.Tensor, storage: TensorDict | None = None,
              size: int = 0) -> TensorDict:
        """``td`` (flat frames to be written at slots ``idx`` of ``storage``, which holds
        ``size`` frames) without its compacted next values; those that the following frame
        does not hold are kept apart. With frames, stacks keep only their newest frame."""
        self.find_keys(td)
        n = td.shape[0]
        apart = torch.zeros(n, dtype=torch.bool)
        apart[-1] = True  # the last frame's next is not written with it
        for key in self.keys:
            missing = ("next", *key) not in td.keys(include_nested=True, leaves_only=True)
            if missing:
                raise ValueError(
                    f"this buffer stores observations once (compact_obs=True) and rebuilds "
                    f"{('next', *key)!r} from them; a write without that entry cannot be "
                    "rebuilt at episode ends. Write full batches (collectors send them).")
            if n > 1:
                root, nxt = td.get(key)[1:], td.get(("next", *key))[:-1]
                same = (root == nxt).reshape(n - 1, -1).all(1)
                apart[:-1] |= ~same
        if self.frames is not None:
            self.frames.check(td, self.keys)  # before anything changes
        self.side.release(idx)
        if self.keys:
            self.side.put(idx[apart], {("next", *key): td.get(("next", *key))[apart]
                                       for key in self.keys})
        td = td.exclude(*[("next", *key) for key in self.keys])
        if self.frames is not None:
            td = self.frames.strip(td, idx, self.keys, storage, size)
        return td

    def touched(self, idx: torch.Tensor, size: int) -> torch.Tensor:
        """The live slots outside ``idx`` whose side entries a write at ``idx`` may change
        (readers of a shared ring must not trust them meanwhile)."""
        if self.frames is None:
            return idx[:0]
        return self.frames.after(idx, size)

    # -- samples -----------------------------------------------------------------------------
    def root(self, key, slots: torch.Tensor, storage: TensorDict, into=None) -> torch.Tensor:
        """The values of ``key`` at ``slots`` as written (a copy; into ``into`` if it fits)."""
        if self.frames is not None and key in self.frames.sizes:
            return self.frames.stacks(key, slots, storage, into)
        return rows(storage.get(key), slots, into)

    def rebuilt_keys(self) -> tuple:
        """The keys :meth:`rebuild` sets (as ``TensorDict.items`` names them): stacked roots
        need not be gathered before."""
        return tuple(flat_key(k) for k in (self.frames.sizes if self.frames is not None else ()))

    def rebuild(self, out, index: torch.Tensor, storage: TensorDict, into: dict | None = None):
        """Add to ``out`` (the frames of slots ``index``: a TensorDict, or ``{key: tensor}``
        keyed as ``TensorDict.items`` names them) their next values, read from ``storage`` (the
        following slots) or from the side store; with frames, whole stacks. ``into``: tensors
        (keyed as ``out``) the values go into where they fit."""
        into = into or {}
        side = self.side.slot[index]
        apart = side >= 0
        n, following = len(index), (index + 1) % self.capacity
        for key in self.keys or ():
            stacked = self.frames is not None and key in self.frames.sizes
            if stacked:  # this slot's and the next slot's stacks in one pass
                both = self.frames.stacks(key, torch.cat([index, following]), storage,
                                          _pair(into.get(flat_key(key)), into.get(("next", *key))))
                out[flat_key(key)] = both[:n]
                value = both[n:]
            else:
                value = self.root(key, following, storage, into.get(("next", *key)))
            if bool(apart.any()):
                at = apart.nonzero().squeeze(1)
                value.index_copy_(0, at, rows(self.side.values[("next", *key)], side[at]))
            out[("next", *key)] = value
        return out

    # -- state -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held apart (side rows in use and allocated) plus the per-slot indexes."""
        return self.side.nbytes() + (self.frames.side.nbytes() if self.frames is not None else 0)

    def tensors(self) -> dict:
        """Copies, as nested dicts of tensors (``{"side": {"next": {"observation": ...}}}``)."""
        out = self.side.tensors()
        if self.frames is not None:
            out["frames"] = self.frames.side.tensors()
        return out

    def meta(self) -> dict:
        out = {"keys": None if self.keys is None else [list(k) for k in self.keys]}
        if self.frames is not None:
            out["frames"] = [[list(k), s] for k, s in self.frames.sizes.items()]
        return out

    def load(self, meta: dict, tensors: dict) -> None:
        if ("frames" in meta) != (self.frames is not None):
            raise ValueError(
                f"the state was written by a buffer with compact_obs="
                f"{'frames' if 'frames' in meta else True!r}, this one has compact_obs="
                f"{'frames' if self.frames is not None else True!r}; open it with the same.")
        self.keys = None if meta.get("keys") is None else tuple(tuple(k) for k in meta["keys"])
        self.side.load(tensors, "compact")
        if self.frames is not None:
            self.frames.sizes = {tuple(k): int(s) for k, s in meta["frames"]}
            self.frames.side.load(tensors.get("frames") or {}, "frame-stack")

    def emptied(self) -> "CompactNext":
        """A fresh one for an emptied buffer: the same stored keys, nothing apart (this one's
        shared files are given back)."""
        fresh = CompactNext(self.capacity, frames=self.frames is not None, files=self.side.files)
        fresh.keys = self.keys
        if self.frames is not None:
            fresh.frames.sizes = dict(self.frames.sizes)
        for store in self._stores():
            store.unshare()
        return fresh

    # -- shared memory -----------------------------------------------------------------------
    def _stores(self) -> list:
        return [self.side] + ([self.frames.side] if self.frames is not None else [])

    def share(self, files) -> None:
        """Move the side stores into ``files`` (a compact ring's shared folder)."""
        for store in self._stores():
            store.share(files)

    def layout(self) -> dict:
        """What a same-node reader needs to rebuild samples (see ``compact_reader``)."""
        return {**self.meta(), "side": self.side.layout(),
                "frame_side": self.frames.side.layout() if self.frames is not None else None}


def _pair(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """One tensor over ``first`` then ``second`` when they lie back to back in one storage
    (a slot's root and next stacks), else ``None``."""
    if first is None or second is None or first.dtype != second.dtype \
            or first.shape != second.shape or not first.is_contiguous() \
            or not second.is_contiguous() \
            or second.data_ptr() != first.data_ptr() + first.numel() * first.element_size():
        return None
    return first.as_strided((2 * first.shape[0], *first.shape[1:]), first.stride(),
                            first.storage_offset())
