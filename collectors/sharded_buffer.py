"""``RayReplayBuffer(capacity, num_shards=N)``: N buffer actors, each with its own ring, sampler
and checkpoint, behind the same handle. Collectors write each batch into the shard on the node
of the env actor that made it (see :mod:`actors.coordination.shard_routes`); ``sample`` draws
from the shards in proportion to their sizes (prioritized: to their total priority), so samples
are uniform (or prioritized) over every stored frame, as one buffer's would be."""
from __future__ import annotations

import json
import os
import time
import uuid
import zlib

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from collectors.errors import ReplayBufferUnavailable
from collectors.replay_buffer import RayReplayBuffer, _to_tensordict
from collectors.runtime import ensure_ray, near_caller

MANIFEST = "shards.json"  # a sharded checkpoint: one folder per shard, this file written last


def shard_folder(path: str, i: int) -> str:
    return os.path.join(path, f"shard-{i}")


def split(capacity: int, n: int) -> list[int]:
    """``capacity`` frames over ``n`` shards, the first ones taking the remainder."""
    return [capacity // n + (1 if i < capacity % n else 0) for i in range(n)]


def placements(cfg, n: int) -> list[dict]:
    """Actor options per shard: a pinned node (``resources.replay_buffer.node``) holds them
    all; ``placement.shards: per_node`` (the default on a cluster of several nodes that can
    hold a shard) spreads them one per node; ``local`` (the default on one machine) keeps them
    on the caller's node."""
    options = cfg.resources.replay_buffer.options()
    if "scheduling_strategy" in options or options.get("resources"):
        return [options] * n
    mode = cfg.placement.shards
    need = options.get("num_cpus", 0)
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive")
                   and node.get("Resources", {}).get("CPU", 0) >= max(need, 1e-9))
    if mode is None:
        mode = "per_node" if len(nodes) > 1 else "local"
    if mode == "local" or not nodes:
        return [near_caller(options)] * n
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # pinned (a soft preference let Ray put two shards on one node): a shard dies with its
    # node, and only its frames are lost; a crashed shard process restarts on its node
    return [{**options, "scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)}
            for i in range(n)]


class ShardedReplayBuffer(RayReplayBuffer):
    """What ``RayReplayBuffer(capacity, num_shards=N)`` returns for ``N > 1`` (see there).

    Indices in samples are global: ``shard * stride + slot`` (``stride`` is the largest shard's
    capacity), so ``update_priority`` reaches the right shard. A shard that dies for good is
    left out: its frames are lost, the others keep sampling and taking writes.

    Example:
        >>> rb = RayReplayBuffer(30_000, num_shards=3, batch_size=256)
        >>> len(rb.info()["shards"])
        3
    """

    def __init__(self, capacity: int, *, num_shards: int = 2, batch_size: int | None = None,
                 sampler="random", min_size: int = 0, prefetch: bool | int = False,
                 samples_per_insert: float | None = None, checkpoint_dir: str | None = None,
                 seed: int | None = None, name: str | None = None, timeout_s: float = 30.0,
                 config=None, _shards: list | None = None, **kwargs):
        self.name = name or f"ReplayBuffer-{uuid.uuid4().hex[:6]}"
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.min_size = int(min_size)
        self.actor = None  # no single actor: collectors write through write_target()
        self.compact_obs = kwargs.get("compact_obs", False)
        self.dead: set[int] = set()  # shards gone for good
        self.gen = torch.Generator()
        self.gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
        if _shards is not None:
            self.shards = _shards
            self._finish(capacity)
            return
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < num_shards:
            raise ValueError(f"capacity must be an int of at least num_shards={num_shards} (one "
                             f"frame per shard); got {capacity!r}.")
        given = sampler
        if not isinstance(sampler, str):  # a TorchRL sampler object: its settings, for each shard
            from collectors.torchrl_samplers import from_torchrl

            sampler, settings = from_torchrl(sampler, capacity)
            kwargs.update(settings)
        refused = {"prefetch": prefetch if prefetch else None,
                   "samples_per_insert": samples_per_insert,
                   "sampler": given if sampler == "without_replacement" else None}
        for key, value in refused.items():
            if value is not None:
                raise NotImplementedError(
                    f"{key}={value!r} with num_shards={num_shards} is not supported yet (each "
                    "shard would apply it alone, not the buffer as a whole). Use num_shards=1, "
                    f"or drop {key}.")
        from collectors.config import load_config

        cfg = load_config(config)
        ensure_ray(**cfg.ray_init_kwargs())
        where = placements(cfg, num_shards)
        self.shards = []
        try:
            for i, cap in enumerate(split(capacity, num_shards)):
                self.shards.append(RayReplayBuffer(
                    cap, batch_size=batch_size, sampler=sampler, timeout_s=timeout_s,
                    checkpoint_dir=None if checkpoint_dir is None else shard_folder(checkpoint_dir, i),
                    seed=None if seed is None else seed + i, name=f"{self.name}/shard-{i}",
                    config=cfg, _options=where[i], **kwargs))
        except BaseException:
            for shard in self.shards:
                shard.shutdown()
            raise
        self._finish(capacity)

    def _finish(self, capacity: int) -> None:
        self.capacity = capacity
        self.sampler = self.shards[0].sampler_name
        self.stride = max(s.capacity for s in self.shards)
        self.num_shards = len(self.shards)
        self.nodes = [i.get("node_id") for i in ray.get([s.actor.info.remote() for s in self.shards],
                                                         timeout=self.timeout_s + 5)]

    @classmethod
    def from_checkpoint(cls, path: str, capacity: int | None = None, **kwargs) -> "ShardedReplayBuffer":
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
        name = kwargs.pop("name", None) or f"ReplayBuffer-{uuid.uuid4().hex[:6]}"
        seed = kwargs.pop("seed", None)
        kwargs.pop("num_shards", None)
        checkpoint_dir = kwargs.pop("checkpoint_dir", None)
        shards = []
        try:
            sizes = split(manifest["capacity"], manifest["num_shards"])
            for i in range(manifest["num_shards"]):
                args = dict(name=f"{name}/shard-{i}", seed=None if seed is None else seed + i,
                            checkpoint_dir=None if checkpoint_dir is None else shard_folder(checkpoint_dir, i),
                            **kwargs)
                if i in manifest.get("dead", ()):  # it was gone when checkpointed: empty again
                    shards.append(RayReplayBuffer(sizes[i], sampler=manifest["sampler"], **args))
                else:
                    shards.append(RayReplayBuffer.from_checkpoint(shard_folder(path, i), **args))
        except BaseException:
            for shard in shards:
                shard.shutdown()
            raise
        return cls(capacity or manifest["capacity"], num_shards=len(shards), name=name, seed=seed,
                   batch_size=kwargs.get("batch_size"), sampler=manifest["sampler"],
                   min_size=kwargs.get("min_size", 0), timeout_s=kwargs.get("timeout_s", 30.0),
                   compact_obs=shards[0].compact_obs, _shards=shards)

    def __reduce__(self):
        return (_rebuild, (self.shards, self.name, self.capacity, self.batch_size, self.sampler,
                           self.min_size, self.timeout_s))

    def write_target(self) -> list:
        """The shards' actors, in order: collectors route each batch to one of them."""
        return [s.actor for s in self.shards]

    # -- calls to every shard ----------------------------------------------------------------
    def _alive(self) -> list[int]:
        return [i for i in range(self.num_shards) if i not in self.dead]

    def _each(self, method: str, *args, shards=None, timeout=None, wait: bool = True) -> dict:
        """``{shard: result}`` of one call per live shard, made at once; a shard that died for
        good is left out from now on. One that is unreachable for now (restarting) is asked
        again until the timeout (``wait``), or left out of this answer at once."""
        shards = self._alive() if shards is None else shards
        refs = {i: getattr(self.shards[i].actor, method).remote(*args) for i in shards}
        out = {}
        deadline = time.monotonic() + (timeout or self.timeout_s + 5)
        while refs:
            i, ref = refs.popitem()
            try:
                out[i] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except (ActorUnavailableError, GetTimeoutError):
                if wait and time.monotonic() < deadline:
                    time.sleep(0.2)
                    refs[i] = getattr(self.shards[i].actor, method).remote(*args)
            except RayActorError:  # (ActorDiedError): gone for good
                self.dead.add(i)
        if not self._alive():
            raise ReplayBufferUnavailable(f"replay buffer {self.name!r}: every shard is gone.")
        return out

    # -- data --------------------------------------------------------------------------------
    def extend(self, td, batch_id=None) -> int:
        """Write frames into the shard on this node (else one chosen by the batch id)."""
        batch_id = batch_id or (self.name, "extend", uuid.uuid4().hex)
        here = ray.get_runtime_context().get_node_id()
        while True:
            alive = self._alive()
            if not alive:
                raise ReplayBufferUnavailable(f"replay buffer {self.name!r}: every shard is gone.")
            pick = [i for i in alive if self.nodes[i] == here] or alive
            shard = pick[zlib.crc32(repr(batch_id).encode()) % len(pick)]
            try:
                return self.shards[shard].extend(td, batch_id)
            except ReplayBufferUnavailable:
                self._each("length", shards=[shard])  # marks it dead if it is gone for good
                if shard not in self.dead:
                    raise  # (restarting, and not back within the timeout)

    def _weights(self, timeout: float) -> tuple[dict, dict]:
        """Each live shard's weight (its size, or its total priority) and state."""
        states = {}
        remote = []
        for i in self._alive():
            reader = self._reader(i)
            if reader is not None and self.sampler == "random":
                states[i] = {"size": reader.size()}
            else:
                remote.append(i)
        if remote:
            states.update(self._each("shard_state", shards=remote, timeout=timeout, wait=False))
        key = "total_priority" if self.sampler == "prioritized" else "size"
        return {i: (s[key] if s["size"] else 0.0) for i, s in states.items()}, states

    def _reader(self, i: int):
        """Shard ``i``'s shared-memory reader on this node, or ``None`` (calls then)."""
        local = self.shards[i]._local
        if local is None or local.off:
            return None
        try:
            local._refresh()
        except ReplayBufferUnavailable:  # gone for good: its frames are lost
            self.dead.add(i)
            return None
        return local.reader

    def sample(self, batch_size: int | None = None, timeout: float | None = None):
        """``batch_size`` frames from every shard's stored frames: uniform (or prioritized)
        over all of them, as one buffer would draw; ``index`` is global."""
        n = batch_size or self.batch_size
        timeout = self.timeout_s if timeout is None else timeout
        if not n:
            raise ValueError("sample() needs a batch_size (here or at construction).")
        deadline = time.monotonic() + timeout
        while True:
            weights, states = self._weights(timeout)
            size = sum(s["size"] for s in states.values())
            if size >= max(1, self.min_size) and sum(weights.values()) > 0:
                counts, unit = self._counts(n, weights)
                parts = self._draw(counts, unit, timeout)
                if parts is not None:  # (None: a shard went away meanwhile: drawn again)
                    return self._merge(parts, states, n)
            if time.monotonic() > deadline:
                raise TimeoutError(f"replay buffer {self.name!r}: waited {timeout:g}s for {n} "
                                   f"samples (size {size}, min_size={self.min_size}).")
            time.sleep(0.01)

    def _counts(self, n: int, weights: dict) -> tuple[dict, int]:
        """How many draws each shard makes: a multinomial draw over the weights; the slice
        sampler draws slices (``unit`` frames each), so a slice never spans shards."""
        unit = 1
        if self.sampler == "slice":
            unit, n = self._slice_spec(n)
        shards = [i for i in weights if weights[i] > 0]
        p = torch.tensor([weights[i] for i in shards], dtype=torch.float64)
        draws = torch.multinomial(p / p.sum(), n, replacement=True, generator=self.gen)
        counts = torch.bincount(draws, minlength=len(shards)).tolist()
        return {i: c for i, c in zip(shards, counts) if c}, unit

    def _slice_spec(self, n: int) -> tuple[int, int]:
        """(frames per slice, slices) of a batch of ``n``."""
        length, count = self.shards[0].slice_spec
        if length is not None:
            if n % length:
                raise ValueError(f"batch size {n} is not a multiple of slice_len={length}.")
            return length, n // length
        if n % count:
            raise ValueError(f"batch size {n} is not a multiple of num_slices={count}.")
        return n // count, count

    def _draw(self, counts: dict, unit: int, timeout: float) -> dict | None:
        """``{shard: arrays}``: shards on this node read in this process, the others asked at
        once; ``None`` if a shard went away meanwhile."""
        parts, refs = {}, {}
        for i, k in counts.items():
            reader = self._reader(i) if self.sampler == "random" else None
            got = self.shards[i]._local.sample(k, timeout) if reader is not None else None
            if got is not None:
                parts[i] = {key: v.numpy() for key, v in got.items(include_nested=True, leaves_only=True)}
            else:
                refs[i] = self.shards[i].actor.sample_arrays.remote(k * unit, timeout)
        gone = False
        for i, ref in refs.items():
            try:
                parts[i] = ray.get(ref, timeout=timeout + 5)[0]
            except ActorUnavailableError:  # restarting: drawn again without it
                gone = True
            except RayActorError:
                self.dead.add(i)
                gone = True
        return None if gone else parts

    def _merge(self, parts: dict, states: dict, n: int):
        arrays = {}
        order = sorted(parts)
        for key in parts[order[0]]:
            arrays[key] = np.concatenate([parts[i][key] for i in order])
        arrays["index"] = np.concatenate(
            [np.asarray(parts[i]["index"], dtype=np.int64) + i * self.stride for i in order])
        if self.sampler == "prioritized":  # each shard scaled by its own smallest priority
            low = min(states[i]["min_priority"] for i in states if states[i]["size"])
            beta = self.shards[0].beta
            arrays["priority_weight"] = np.concatenate(
                [parts[i]["priority_weight"] * (states[i]["min_priority"] / low) ** (-beta)
                 for i in order]).astype(np.float32)
        return _to_tensordict(arrays, n)

    def update_priority(self, index, priority) -> None:
        index = torch.as_tensor(index).long().reshape(-1)
        priority = torch.as_tensor(priority, dtype=torch.float64).reshape(-1).expand(index.shape)
        shard = index // self.stride
        bad = (shard < 0) | (shard >= self.num_shards)
        if bad.any():
            raise ValueError(f"priority index out of range [0, {self.num_shards * self.stride}).")
        refs = []
        for i in shard.unique().tolist():
            if i in self.dead:
                continue  # its frames are gone
            mask = shard == i
            refs.append(self.shards[i].actor.update_priority.remote(index[mask] % self.stride, priority[mask]))
        ray.get(refs, timeout=self.timeout_s + 5)

    def __len__(self) -> int:
        return sum(self._each("length").values())

    def info(self) -> dict:
        """Sums over the live shards, with each shard's own ``info()`` under ``"shards"``."""
        per = {}
        for i in self._alive():
            local, sampled = self.shards[i]._local, 0
            if local is not None:  # frames drawn here: counted by the shard now
                sampled, local.unreported = local.unreported, 0
            per.update(self._each("info", sampled, shards=[i]))
        total = {key: sum(p[key] for p in per.values()) for key in
                 ("size", "write_count", "batches", "inserts", "samples", "insert_time",
                  "sample_time", "checkpointed_batches", "storage_bytes")}
        total.update(capacity=self.capacity, num_shards=self.num_shards)
        total["shards"] = [dict(per[i], shard=i, alive=True) if i in per else
                           {"shard": i, "alive": False, "dead": i in self.dead}
                           for i in range(self.num_shards)]
        return total

    def stats(self) -> dict:
        return self.info()

    def batch_ids(self) -> list:
        return [bid for ids in self._each("batch_ids").values() for bid in ids]

    def empty(self) -> None:
        self._each("empty")

    def state_dict(self) -> dict:
        return {"num_shards": self.num_shards, "shards": [s.state_dict() for s in self.shards]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_shards") != self.num_shards:
            raise ValueError(f"the state holds {state.get('num_shards')} shards, this buffer "
                             f"{self.num_shards}; load it into a buffer of as many shards.")
        for shard, s in zip(self.shards, state["shards"]):
            shard.load_state_dict(s)

    def checkpoint(self, path: str) -> str:
        """Every shard into ``path/shard-<i>`` (each atomically), then ``path/shards.json``:
        :meth:`RayReplayBuffer.from_checkpoint` restores all of them."""
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        refs = [self.shards[i].actor.checkpoint.remote(shard_folder(path, i)) for i in self._alive()]
        ray.get(refs, timeout=600)
        manifest = {"num_shards": self.num_shards, "capacity": self.capacity,
                    "sampler": self.sampler, "dead": sorted(self.dead)}
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(path, MANIFEST))
        return path

    def shutdown(self) -> None:
        """Stop every shard (idempotent)."""
        for shard in self.shards:
            shard.shutdown()

    def __repr__(self) -> str:
        return f"RayReplayBuffer(name={self.name!r}, num_shards={self.num_shards})"


def _rebuild(shards, name, capacity, batch_size, sampler, min_size, timeout_s):
    return ShardedReplayBuffer(capacity, num_shards=len(shards), name=name, batch_size=batch_size,
                               sampler=sampler, min_size=min_size, timeout_s=timeout_s,
                               _shards=shards)
