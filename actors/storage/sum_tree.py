"""``SumTree``: priorities with O(log n) updates and proportional draws, as prioritized replay
needs (sums and minima over a binary tree stored in flat numpy arrays, vectorized per level).

Example:
    >>> import numpy as np
    >>> tree = SumTree(4)
    >>> tree.update(np.array([0, 1, 2]), np.array([1.0, 0.0, 3.0]))
    >>> tree.total, tree.min(3)
    (4.0, 0.0)
    >>> tree.find(np.array([0.5, 1.5, 3.9])).tolist()   # prefix sums 1 | 1 | 4
    [0, 2, 2]
"""
from __future__ import annotations

import numpy as np


class SumTree:
    """Leaf ``i`` holds a non-negative value; ``find`` maps prefix sums to leaves."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.leaves = 1 << max(0, (self.capacity - 1).bit_length())
        self.sums = np.zeros(2 * self.leaves, np.float64)
        self.mins = np.full(2 * self.leaves, np.inf, np.float64)

    @property
    def total(self) -> float:
        return float(self.sums[1])

    def min(self, size: int) -> float:
        """The smallest value among leaves ``[0, size)`` (all leaves set so far lie there)."""
        return float(self.mins[1]) if size > 0 else float("inf")

    def values(self, index: np.ndarray) -> np.ndarray:
        return self.sums[np.asarray(index) + self.leaves]

    def update(self, index: np.ndarray, value: np.ndarray) -> None:
        node = np.asarray(index, np.int64) + self.leaves
        value = np.broadcast_to(np.asarray(value, np.float64), node.shape)
        self.sums[node] = value  # with repeated indices the last value wins
        self.mins[node] = value
        node = np.unique(node >> 1)
        while node.size and node[0] >= 1:
            left = node << 1
            self.sums[node] = self.sums[left] + self.sums[left + 1]
            self.mins[node] = np.minimum(self.mins[left], self.mins[left + 1])
            if node[0] == 1:
                break
            node = np.unique(node >> 1)

    def find(self, prefix: np.ndarray) -> np.ndarray:
        """Leaf index for each prefix sum in ``[0, total)``; never a leaf of value 0."""
        prefix = np.array(prefix, np.float64)
        node = np.ones(prefix.shape, np.int64)
        while node[0] < self.leaves if node.size else False:
            left = node << 1
            left_sum = self.sums[left]
            right = (prefix >= left_sum) & (self.sums[left + 1] > 0)
            right |= left_sum <= 0  # nothing on the left: go right whatever rounding says
            prefix = np.where(right, prefix - left_sum, prefix)
            node = left + right
        return node - self.leaves

    def clear(self) -> None:
        self.sums.fill(0.0)
        self.mins.fill(np.inf)
