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

from actors.compact import compacted_keys


class CompactNext:
    """The per-slot bookkeeping of a compact ring of ``capacity`` slots."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.keys: tuple | None = None  # the root keys k whose ("next", k) is compacted
        self.side_slot = torch.full((self.capacity,), -1, dtype=torch.int64)  # -1: next slot
        self.side: dict = {}  # ("next", k) -> tensor [side capacity, ...]
        self.free: list[int] = []  # unused rows of the side store

    # -- writes ------------------------------------------------------------------------------
    def find_keys(self, td: TensorDict) -> None:
        """Pick, at the first write, the root keys whose next value has the same shape and dtype."""
        if self.keys is not None:
            return
        self.keys = tuple(k for k in compacted_keys(td.keys(include_nested=True, leaves_only=True))
                          if td.get(k).shape == td.get(("next", *k)).shape
                          and td.get(k).dtype == td.get(("next", *k)).dtype)

    def strip(self, td: TensorDict, idx: torch.Tensor) -> TensorDict:
        """``td`` (flat frames to be written at slots ``idx``) without its compacted next
        values; those that the following frame does not hold are kept apart."""
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
        if not self.side:  # empty side stores, grown on demand
            for key in self.keys:
                nxt = td.get(("next", *key))
                self.side[("next", *key)] = nxt.new_zeros((0, *nxt.shape[1:]))
        self._release(idx)
        rows = idx[apart]
        if len(rows) and self.keys:
            side = self._take(len(rows))
            self.side_slot[rows] = side
            for key in self.keys:
                self.side[("next", *key)][side] = td.get(("next", *key))[apart]
        return td.exclude(*[("next", *key) for key in self.keys])

    def _release(self, idx: torch.Tensor) -> None:
        """Slots about to be overwritten give back their side rows."""
        old = self.side_slot[idx]
        old = old[old >= 0]
        if len(old):
            self.free.extend(old.tolist())
            self.side_slot[idx] = -1

    def _rows(self) -> int:
        return next(iter(self.side.values())).shape[0] if self.side else 0

    def _take(self, n: int) -> torch.Tensor:
        if len(self.free) < n:
            have = self._rows()
            self._grow_to(max(2 * have, have + n - len(self.free), 64))
        rows, self.free = self.free[-n:], self.free[:-n]
        return torch.tensor(rows, dtype=torch.int64)

    def _grow_to(self, rows: int) -> None:
        have = self._rows()
        for key, value in self.side.items():
            if value.shape[0] < rows:
                self.side[key] = torch.cat([value, value.new_zeros((rows - value.shape[0], *value.shape[1:]))])
        if rows > have:
            self.free.extend(range(have, rows))

    # -- samples -----------------------------------------------------------------------------
    def rebuild(self, out: TensorDict, index: torch.Tensor, storage: TensorDict) -> TensorDict:
        """Add to ``out`` (the frames of slots ``index``) their next values, read from
        ``storage`` (the following slots) or from the side store."""
        side = self.side_slot[index]
        apart = side >= 0
        following = (index + 1) % self.capacity
        for key in self.keys or ():
            value = storage.get(key)[following].clone()
            if bool(apart.any()):
                value[apart] = self.side[("next", *key)][side[apart]]
            out.set(("next", *key), value)
        return out

    # -- state -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held apart (side rows in use and allocated) plus the per-slot index."""
        return self.side_slot.numel() * 8 + sum(v.numel() * v.element_size() for v in self.side.values())

    def tensors(self) -> dict:
        """Copies, as nested dicts of tensors (``{"side": {"next": {"observation": ...}}}``)."""
        out = {"side_slot": self.side_slot.clone()}
        if self.side:
            out["side"] = TensorDict({k: v.clone() for k, v in self.side.items()}, []).to_dict()
        return out

    def meta(self) -> dict:
        return {"keys": None if self.keys is None else [list(k) for k in self.keys]}

    def load(self, meta: dict, tensors: dict) -> None:
        self.keys = None if meta.get("keys") is None else tuple(tuple(k) for k in meta["keys"])
        slot = tensors.get("side_slot")
        if slot is None or slot.shape != (self.capacity,):
            raise ValueError(f"compact state has no per-slot index of {self.capacity} slots.")
        self.side_slot = slot.long().clone()
        side = TensorDict(tensors.get("side") or {}, []).items(include_nested=True, leaves_only=True)
        self.side = {tuple(k) if isinstance(k, tuple) else (k,): v.clone() for k, v in side}
        used = set(self.side_slot[self.side_slot >= 0].tolist())
        if used and max(used) >= self._rows():
            raise ValueError("compact state points past its side store.")
        self.free = [r for r in range(self._rows()) if r not in used]
