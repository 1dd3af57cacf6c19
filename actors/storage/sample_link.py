"""Samples from the buffer actor to a trainer on its node, through a shared-memory slot.

A Ray call returns a sample through the object store: about 4.5 ms for 32 Pong frames (1.8 MB
with next observations) on the 2-core VM, most of it the round trip and the copies. A trainer
on the buffer's node instead opens a link: the actor listens on a Unix socket in the trainer's
private folder (see :mod:`actors.shm.handoff`), and for each request (``n``, timeout) draws the
sample exactly as ``sample()`` does (sampler, rate limiter, compact rebuild), writes it into the
slot file the request names (one the trainer no longer reads) and replies with the slot's
layout; the trainer hands out views of that slot. Both sides block in the kernel while they
wait. Used for what the trainer cannot sample itself (compact and frame storage, prioritized,
slices, rate limits).
"""
from __future__ import annotations

import os
import struct

import ray

from actors.shm.handoff import HandoffServer

MAX_LINKS = 2  # each link holds one of the actor's threads while it is open
REQUEST = struct.Struct("<qdq")  # batch size, timeout (s), slot (one the trainer does not read)


def encode(n: int, timeout: float, slot: int) -> bytes:
    return b"n" + REQUEST.pack(int(n), float(timeout), int(slot))


def slot_of(request: bytes) -> int:
    return REQUEST.unpack(request[1:])[2]


class SampleLinkMixin:
    """``open_sample_link`` then ``serve_samples`` (a long call, one thread) per trainer. The
    actor declares ``_link_servers`` (address -> server not yet serving) and ``_link_count``."""

    def open_sample_link(self, folder: str, node_id: str | None) -> str | None:
        """Listen in ``folder`` (the trainer's, on this node) for sample requests; the address,
        or ``None`` when the trainer is on another node or enough links are open already."""
        here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        if node_id != here or not os.path.isdir(folder):
            return None
        with self.cond:
            if self._link_count >= MAX_LINKS:
                return None
            self._link_count += 1
        server = HandoffServer(folder, "samples")
        self._link_servers[server.address] = server
        return server.address

    def serve_samples(self, address: str) -> str:
        """Answer the trainer at ``address`` until it stops or goes away; returns why it ended."""
        server = self._link_servers.pop(address, None)
        if server is None:
            return "no link opened there"
        try:
            return server.serve(self._link_sample, raw=True, slot_of=slot_of)
        finally:
            with self.cond:
                self._link_count -= 1

    def _link_sample(self, request: bytes, into: dict) -> tuple[dict, dict]:
        """One sample, gathered straight into the slot where the same keys and shapes fit
        (``into``: the slot's last layout), so the slot write has nothing left to copy."""
        n, timeout, _ = REQUEST.unpack(request[1:])
        return {k: v.numpy() for k, v in self._sample(n, timeout, 1, into)[0].items()}, {}
