"""The trainer's torch threads while a collector runs, as TorchRL's multi and async collectors
set them: torch's OpenMP threads spin between ops, and on the cores the env actors need they
starve them (a SAC trainer with 2 threads on 2 cores left its env actor 240 frames/s of 4,400).

- At construction: ``num_threads`` when given; otherwise, for multi and async collectors, the
  threads there were minus one per env actor on this node (at least 1).
- At shutdown of a multi or async collector: one thread per env actor back, up to the count
  torch had when :mod:`collectors` was imported (TorchRL's ``_THREAD_POOL_INIT``).

    >>> lent = lend(None, shares=True, workers_here=2)  # doctest: +SKIP
    >>> give_back(lent)  # doctest: +SKIP
"""
from __future__ import annotations

import torch

THREADS_AT_IMPORT = torch.get_num_threads()


def lend(num_threads: int | None, *, shares: bool, workers_here: int) -> int:
    """Set this process's torch threads; returns how many :func:`give_back` returns (0: none).
    ``shares``: a multi or async collector (TorchRL's single ``Collector`` leaves them)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    elif shares:
        torch.set_num_threads(max(1, torch.get_num_threads() - workers_here))
    return workers_here if shares else 0


def give_back(workers: int) -> None:
    """At shutdown: ``workers`` threads back, up to :data:`THREADS_AT_IMPORT`."""
    if workers:
        torch.set_num_threads(min(THREADS_AT_IMPORT, torch.get_num_threads() + workers))
