"""Which replay-buffer shard a batch goes to: the shard on the node of the env actor that made
it, or, when that node has none, one chosen by a stable hash of the collector and worker. A
shard that died for good is left out from then on (its node's batches go elsewhere)."""
from __future__ import annotations

import zlib


class ShardRoutes:
    """``route(meta)`` -> a shard index; ``targets[i]`` is shard ``i``'s actor handle.

    Example:
        >>> routes = ShardRoutes(["a", "b"], ["node-1", "node-2"], "dqn")
        >>> routes.route({"worker": 0, "node_id": "node-2"})
        1
    """

    def __init__(self, targets: list, nodes: list, name: str):
        if len(targets) != len(nodes) or not targets:
            raise ValueError(f"one node per shard: got {len(targets)} shards, {len(nodes)} nodes.")
        self.targets = list(targets)
        self.nodes = list(nodes)
        self.name = name
        self.dead: set[int] = set()

    def alive(self) -> list[int]:
        return [i for i in range(len(self.targets)) if i not in self.dead]

    def route(self, meta: dict) -> int:
        alive = self.alive()
        if not alive:
            raise RuntimeError("every replay-buffer shard is gone: nothing can be written.")
        worker = int(meta.get("worker", 0))
        local = [i for i in alive if self.nodes[i] is not None and self.nodes[i] == meta.get("node_id")]
        if local:
            return local[worker % len(local)]
        return alive[zlib.crc32(f"{self.name}/{worker}".encode()) % len(alive)]

    def mark_dead(self, shard: int) -> bool:
        """Leave ``shard`` out; ``False`` when it was the last one (the caller raises)."""
        self.dead.add(shard)
        return bool(self.alive())
