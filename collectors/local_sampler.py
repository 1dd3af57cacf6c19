"""Sampling a replay buffer in the trainer's process, from the actor's shared-memory storage.

Used by :class:`~collectors.replay_buffer.RayReplayBuffer` for the uniform sampler when the
trainer runs on the buffer actor's node (plain or compact storage: a compact ring's next values
and stacks are rebuilt here): ``sample()`` then costs a gather in this process, not
a call that waits for the buffer actor to be scheduled next to busy env workers. Everything
else (writes, priorities, rate limits, checkpoints) stays with the actor.
"""
from __future__ import annotations

import os
import time

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from tensordict import TensorDict

from actors.storage.compact_reader import CompactReader
from actors.storage.shared_ring import RingReader
from collectors.runtime import buffer_gone

CHECK_S = 0.5  # how often the actor is asked whether its storage moved (restart, restore)


class LocalSampler:
    """``sample(n, timeout)`` returns a TensorDict, or ``None`` when the caller must use the actor."""

    def __init__(self, actor, name: str, seed: int | None = None):
        self.actor = actor
        self.name = name
        self.seed = seed
        self.reader: RingReader | None = None
        self.min_size = 0
        self.unreported = 0  # frames sampled here and not yet counted by the actor
        self._probe = None  # a storage_location call in flight
        self._next_check = 0.0
        self.off = False  # the storage is not reachable from here (another pid namespace...)

    def _locate(self, loc: dict | None) -> None:
        self.reader = None
        if loc is None:  # no storage yet (nothing written): look again soon
            return
        if loc["node_id"] != ray.get_runtime_context().get_node_id() or not os.path.isdir(loc["dir"]):
            self.off = True  # another node (or another /dev/shm): calls from now on
            return
        try:
            kind = CompactReader if loc.get("side") else RingReader
            reader = kind(loc, self.seed)
        except FileNotFoundError:  # replaced meanwhile (a restore, side files that grew)
            return
        except OSError:  # not ours to map (see shared_ring): calls from now on
            self.off = True
            return
        if not reader.usable():  # same node, but its process is not visible from here
            self.off = True
            return
        self.reader, self.min_size = reader, loc["min_size"]

    def _refresh(self) -> None:
        """Keep ``reader`` on the live storage without ever waiting: a small call asks the
        actor where its storage is (often until mapped, every ``CHECK_S`` after) and is read
        on a later sample. Raises once the actor is gone for good."""
        if self.off:
            return
        now = time.monotonic()
        if self.reader is not None and not self.reader.usable():
            self.reader, self._next_check = None, 0.0
        if self._probe is None:
            if now >= self._next_check:
                self._probe = self.actor.storage_location.remote(self.unreported)
                self.unreported = 0
                self._next_check = now + (CHECK_S if self.reader is not None else 0.05)
            return
        if not ray.wait([self._probe], timeout=0)[0]:
            return
        probe, self._probe = self._probe, None
        try:
            loc = ray.get(probe)
        except ActorUnavailableError:
            self.reader = None  # restarting: the caller's call path waits for it
            return
        except RayActorError as exc:
            self.reader = None
            raise buffer_gone(self.name, exc) from None
        if self.reader is None or loc is None or loc["dir"] != self.reader.dir \
                or _side_gen(loc) != getattr(self.reader, "side_gen", None):
            self._locate(loc)

    def sample(self, n: int, timeout: float):
        self._refresh()
        if self.reader is None:
            return None
        deadline = time.monotonic() + timeout
        while self.reader.size() < max(1, self.min_size):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"replay buffer {self.name!r}: waited {timeout:g}s for {n} samples "
                    f"(size {self.reader.size()}, min_size={self.min_size}); nothing arrived.")
            if not self.reader.usable():
                return None
            time.sleep(0.002)
        got = self.reader.sample(n)
        if got is None:
            if self.reader.stale():  # side files moved: ask where, now
                self._next_check = 0.0
            return None
        flat, index = got
        flat["index"] = index
        self.unreported += n
        return TensorDict(flat, batch_size=[n])

    def close(self) -> None:
        self.reader = None
        self._probe = None


def _side_gen(loc: dict | None):
    side = (loc or {}).get("side")
    return None if side is None else side["gen"]
