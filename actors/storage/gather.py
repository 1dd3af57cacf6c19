"""Row gathers for sampling: ``torch.index_select`` along the first dimension.

For large rows (a uint8 ``[4, 84, 84]`` frame stack) it is about 15x faster than advanced
indexing (``t[index]``, TensorIterator's generic index kernel): 32 Pong stacks out of 20,000
take 0.02 ms instead of 0.30 ms on the 2-core VM.

Example:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> td = TensorDict({"x": torch.arange(6).view(3, 2)}, [3])
    >>> gather(td, torch.tensor([2, 0]))["x"].tolist()
    [[4, 5], [0, 1]]
"""
from __future__ import annotations

import torch
from tensordict import TensorDict


def rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]`` for a 1-D integer ``index`` (a new tensor)."""
    return torch.index_select(tensor, 0, index)


def gather(td: TensorDict, index: torch.Tensor) -> TensorDict:
    """``td[index].clone()`` for a 1-D integer ``index``, leaf by leaf."""
    return td.apply(lambda t: torch.index_select(t, 0, index), batch_size=[index.shape[0]])
