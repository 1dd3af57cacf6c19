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
    def __init__(self, capacity: int, files=None):
        self.capacity = int(capacity)
        self.files = files  # SideFiles: the tensors live in a shared ring's folder, else private
        self.slot = self._new((self.capacity,), torch.int64).fill_(-1)  # -1: nothing apart
        self.values: dict = {}  # key -> tensor [rows, ...]
        self.free: list[int] = []  # unused rows

    def put(self, slots: torch.Tensor, items: dict) -> None:
        """Keep ``items[key][i]`` apart for ``slots[i]`` (slots that hold no row)."""
        if not len(slots):
            return
        for key, value in items.items():
            if key not in self.values:
                self.values[key] = self._new((self.rows(), *value.shape[1:]), value.dtype)
        rows = self._take(len(slots))
        for key, value in items.items():
            self.values[key][rows] = value
        # (the rows are filled before slots name them: a reader of a shared store that sees a
        # slot's new row reads that row's new values, see actors.storage.compact_reader)
        self.slot[slots] = rows

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
                grown = self._new((rows, *value.shape[1:]), value.dtype)
                grown[:have] = value
                self.values[key] = grown
                self._drop(value)
            self.free.extend(range(have, rows))
        rows, self.free = self.free[-n:], self.free[:-n]
        return torch.tensor(rows, dtype=torch.int64)

    # -- where the tensors live ----------------------------------------------------------------
    def _new(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if self.files is not None:
            return self.files.new(shape, dtype)
        return torch.zeros(shape, dtype=dtype)

    def _drop(self, tensor: torch.Tensor) -> None:
        if self.files is not None:
            self.files.drop(tensor)

    def share(self, files) -> None:
        """Move the tensors into ``files`` (a :class:`~actors.storage.side_files.SideFiles`;
        ``None``: private memory)."""
        old, old_files = [self.slot, *self.values.values()], self.files
        self.files = files
        self.slot = self._copy(self.slot)
        self.values = {k: self._copy(v) for k, v in self.values.items()}
        for tensor in old if old_files is not None else ():
            old_files.drop(tensor)

    def unshare(self) -> None:
        """Give back the shared files (the store is no longer used)."""
        for tensor in [self.slot, *self.values.values()]:
            self._drop(tensor)

    def layout(self) -> dict:
        """Where a reader maps the tensors (see :mod:`actors.storage.compact_reader`)."""
        return {"slot": self.files.where(self.slot),
                "values": [[list(k), self.files.where(v)] for k, v in self.values.items()]}

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        new = self._new(tuple(tensor.shape), tensor.dtype)
        new.copy_(tensor)
        return new

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
        self.unshare()
        self.slot = self._copy(slot.long())
        side = TensorDict(tensors.get("side") or {}, []).items(include_nested=True, leaves_only=True)
        self.values = {tuple(k) if isinstance(k, tuple) else (k,): self._copy(v) for k, v in side}
        used = set(self.slot[self.slot >= 0].tolist())
        if used and max(used) >= self.rows():
            raise ValueError(f"{what} state points past its side store.")
        self.free = [r for r in range(self.rows()) if r not in used]
