"""Samplers for the replay-buffer actor. Each returns ``(index, weight_or_None)``."""
from __future__ import annotations

import numpy as np
import torch

from actors.storage.sum_tree import SumTree

TRAJ_KEY = ("collector", "traj_ids")


class Sampler:
    def __init__(self, capacity: int, seed: int | None = None):
        self.capacity = capacity
        self.gen = torch.Generator()
        self.gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))

    def on_write(self, idx, storage, size) -> None:
        pass

    def sample(self, n, storage, size):
        raise NotImplementedError

    def update_priority(self, index, priority) -> None:
        raise TypeError(f"{type(self).__name__} has no priorities; use sampler='prioritized'.")

    def reset(self) -> None:
        pass

    def state(self) -> dict:
        return {}

    def tensors(self) -> dict:
        return {"rng": self.gen.get_state()}

    def load(self, state: dict, tensors: dict, storage, size) -> None:
        if "rng" in tensors:
            self.gen.set_state(tensors["rng"].to(torch.uint8))


class RandomSampler(Sampler):
    """Uniform, with replacement."""

    def sample(self, n, storage, size):
        return torch.randint(0, size, (n,), generator=self.gen), None


class WithoutReplacementSampler(Sampler):
    """Every stored frame once per epoch, in a fresh random order each epoch.

    A batch that an epoch cannot fill is completed from the next epoch, or, with
    ``drop_last=True``, the epoch's remaining frames are skipped and the batch comes whole from
    the next epoch (TorchRL's ``SamplerWithoutReplacement(drop_last=True)``).
    """

    def __init__(self, capacity, seed=None, drop_last: bool = False):
        super().__init__(capacity, seed)
        self.drop_last = bool(drop_last)
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = 0
        self.epoch = 0

    def reset(self):
        self.perm, self.pos = torch.empty(0, dtype=torch.int64), 0

    def sample(self, n, storage, size):
        if self.drop_last and n > size:
            raise ValueError(f"drop_last=True and a batch of {n} is larger than the {size} stored "
                             "frames: no full batch exists. Sample fewer or wait for more data.")
        if self.drop_last and len(self.perm) - self.pos < n:
            self.pos = len(self.perm)  # the short rest of this epoch is dropped
        out = []
        while n > 0:
            if self.pos >= len(self.perm):
                self.perm = torch.randperm(size, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            take = self.perm[self.pos:self.pos + n]
            self.pos += len(take)
            n -= len(take)
            out.append(take)
        return torch.cat(out), None

    def state(self):
        return {"pos": self.pos, "epoch": self.epoch}

    def tensors(self):
        return {**super().tensors(), "perm": self.perm}

    def load(self, state, tensors, storage, size):
        super().load(state, tensors, storage, size)
        self.pos, self.epoch = state["pos"], state["epoch"]
        self.perm = tensors.get("perm", torch.empty(0, dtype=torch.int64)).long()


class PrioritizedSampler(Sampler):
    """Proportional prioritization: P(i) ~ (p_i + eps)^alpha, weights (N P(i))^-beta / max
    weight. A sum tree keeps draws and updates at O(log n) whatever the capacity."""

    def __init__(self, capacity, seed=None, alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-8):
        super().__init__(capacity, seed)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0; got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.priority = np.zeros(capacity, np.float64)  # raw priorities, for state and checks
        self.tree = SumTree(capacity)
        self.max_priority = 1.0

    def _set(self, index: np.ndarray, priority: np.ndarray) -> None:
        self.priority[index] = priority
        self.tree.update(index, (self.priority[index] + self.eps) ** self.alpha)

    def on_write(self, idx, storage, size):
        self._set(idx.numpy(), np.full(len(idx), self.max_priority))

    def reset(self):
        self.priority.fill(0.0)
        self.tree.clear()
        self.max_priority = 1.0

    def sample(self, n, storage, size):
        total = self.tree.total
        prefix = torch.rand(n, generator=self.gen, dtype=torch.float64).numpy() * total
        index = np.minimum(self.tree.find(prefix), size - 1)
        probs = self.tree.values(index) / total
        weight = (size * probs) ** (-self.beta)
        weight = weight / (size * self.tree.min(size) / total) ** (-self.beta)
        return torch.from_numpy(index), torch.from_numpy(weight).float()

    def update_priority(self, index, priority):
        if index.shape != priority.shape and priority.numel() != 1:
            raise ValueError(f"index shape {tuple(index.shape)} and priority shape "
                             f"{tuple(priority.shape)} differ.")
        if (priority < 0).any() or not torch.isfinite(priority).all():
            raise ValueError("priorities must be finite and >= 0.")
        index = index.long().reshape(-1).numpy()
        if index.size and (index.min() < 0 or index.max() >= self.capacity):
            raise ValueError(f"priority index out of range [0, {self.capacity}).")
        value = np.broadcast_to(priority.double().reshape(-1).numpy(), index.shape)
        self._set(index, value)
        self.max_priority = max(self.max_priority, float(priority.max()))

    def state(self):
        return {"max_priority": self.max_priority, "alpha": self.alpha, "beta": self.beta}

    def tensors(self):
        return {**super().tensors(), "priority": torch.from_numpy(self.priority.copy())}

    def load(self, state, tensors, storage, size):
        super().load(state, tensors, storage, size)
        self.max_priority = state["max_priority"]
        if "priority" in tensors:
            self.priority = tensors["priority"].double().numpy().copy()
            self.tree.clear()
            if size:
                self._set(np.arange(size), self.priority[:size])


class SliceSampler(Sampler):
    """Contiguous slices of one trajectory: never across a trajectory or a worker boundary.

    Trajectory ids are unique across workers, and a slice must also be contiguous in storage
    (the same trajectory written in two batches with other data between is two runs).
    """

    def __init__(self, capacity, seed=None, slice_len: int | None = None,
                 num_slices: int | None = None, traj_key=TRAJ_KEY):
        super().__init__(capacity, seed)
        if (slice_len is None) == (num_slices is None):
            raise ValueError("SliceSampler needs exactly one of slice_len or num_slices.")
        self.slice_len, self.num_slices = slice_len, num_slices
        self.traj_key = tuple(traj_key) if isinstance(traj_key, (list, tuple)) else traj_key
        self.cursor = 0  # the ring's next write position (the oldest frame once it wrapped)
        self._starts = None
        self._cache_key = None

    def on_write(self, idx, storage, size):
        self._starts = None
        self.cursor = (int(idx[-1]) + 1) % self.capacity if len(idx) else self.cursor

    def reset(self):
        self.cursor, self._starts = 0, None

    def state(self):
        return {"cursor": self.cursor}

    def load(self, state, tensors, storage, size):
        super().load(state, tensors, storage, size)
        self.cursor, self._starts = int(state.get("cursor", 0)), None

    def _valid_starts(self, storage, size, length):
        if self._starts is not None and self._cache_key == (size, length):
            return self._starts
        traj = storage.get(self.traj_key)[:size]
        same = traj[1:] == traj[:-1]
        if size == self.capacity and 0 < self.cursor < size:
            same[self.cursor - 1] = False  # newest | oldest: never one slice, even if ids match
        # run_end[i]: last index of the run of equal consecutive traj ids containing i
        idx = torch.arange(size)
        breaks = torch.cat([idx[:-1][~same], torch.tensor([size - 1])])
        run_end = breaks[torch.searchsorted(breaks, idx)]
        starts = idx[(run_end - idx + 1) >= length]
        self._starts, self._cache_key = starts, (size, length)
        return starts

    def sample(self, n, storage, size):
        if self.slice_len is not None:
            length = self.slice_len
            if n % length:
                raise ValueError(f"batch size {n} is not a multiple of slice_len={length}.")
            count = n // length
        else:
            count = self.num_slices
            if n % count:
                raise ValueError(f"batch size {n} is not a multiple of num_slices={count}.")
            length = n // count
        starts = self._valid_starts(storage, size, length)
        if len(starts) == 0:
            raise ValueError(f"no trajectory run of {length} stored frames yet; lower the slice "
                             "length or wait for more data.")
        pick = starts[torch.randint(0, len(starts), (count,), generator=self.gen)]
        return (pick[:, None] + torch.arange(length)).reshape(-1), None


SAMPLERS = {"random": RandomSampler, "without_replacement": WithoutReplacementSampler,
            "prioritized": PrioritizedSampler, "slice": SliceSampler}


def make_sampler(name: str, capacity: int, seed=None, **kwargs) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}; got {name!r}.")
    return SAMPLERS[name](capacity, seed, **kwargs)
