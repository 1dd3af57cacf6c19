"""``SideStore``: values kept apart from a ring, one row per slot that needs one.

Compact storages keep most of a value implicit (read back from neighbouring slots) and the rest
here: ``slot[s]`` is the row holding slot ``s``'s values, or -1. Rows are reused as the ring
overwrites their slots, and the store grows on demand.

Example:
    >>> import torch
    >>> side = SideStore(capacity=4)
    >>> side.put(torch.tensor([2]), {"x": torch.tensor([[7.0]])})
    >>> (side.slot >= 0).tolist(), side.values["x"][side.slot[2]].tolist()
    ([False, False, True, False], [7.0])
    >>> side.release(torch.tensor([2]))
    >>> side.slot.tolist()
    [-1, -1, -1, -1]
"""
from __future__ import annotations

import torch
from tensordict import TensorDict


class SideStore:
    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.slot = torch.full((self.capacity,), -1, dtype=torch.int64)  # -1: nothing apart
        self.values: dict = {}  # key -> tensor [rows, ...]
        self.free: list[int] = []  # unused rows

    def put(self, slots: torch.Tensor, items: dict) -> None:
        """Keep ``items[key][i]`` apart for ``slots[i]`` (slots that hold no row)."""
        if not len(slots):
            return
        for key, value in items.items():
            if key not in self.values:
                self.values[key] = value.new_zeros((self.rows(), *value.shape[1:]))
        rows = self._take(len(slots))
        self.slot[slots] = rows
        for key, value in items.items():
            self.values[key][rows] = value

    def release(self, slots: torch.Tensor) -> None:
        """Slots about to be overwritten give back their rows."""
        old = self.slot[slots]
        old = old[old >= 0]
        if len(old):
            self.free.extend(old.tolist())
            self.slot[slots] = -1

    def rows(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 0

    def _take(self, n: int) -> torch.Tensor:
        if len(self.free) < n:
            have = self.rows()
            rows = max(2 * have, have + n - len(self.free), 64)
            for key, value in self.values.items():
                self.values[key] = torch.cat([value, value.new_zeros((rows - have, *value.shape[1:]))])
            self.free.extend(range(have, rows))
        rows, self.free = self.free[-n:], self.free[:-n]
        return torch.tensor(rows, dtype=torch.int64)

    # -- state -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Rows allocated (in use or free) plus the per-slot index."""
        return self.slot.numel() * 8 + sum(v.numel() * v.element_size() for v in self.values.values())

    def tensors(self) -> dict:
        """Copies: ``{"side_slot": ..., "side": nested dict of the values}``."""
        out = {"side_slot": self.slot.clone()}
        if self.values:
            out["side"] = TensorDict({k: v.clone() for k, v in self.values.items()}, []).to_dict()
        return out

    def load(self, tensors: dict, what: str) -> None:
        slot = tensors.get("side_slot")
        if slot is None or slot.shape != (self.capacity,):
            raise ValueError(f"{what} state has no per-slot index of {self.capacity} slots.")
        self.slot = slot.long().clone()
        side = TensorDict(tensors.get("side") or {}, []).items(include_nested=True, leaves_only=True)
        self.values = {tuple(k) if isinstance(k, tuple) else (k,): v.clone() for k, v in side}
        used = set(self.slot[self.slot >= 0].tolist())
        if used and max(used) >= self.rows():
            raise ValueError(f"{what} state points past its side store.")
        self.free = [r for r in range(self.rows()) if r not in used]
