"""Whole trajectories out of frame batches: TorchRL's ``trajs_per_batch``.

Frames are grouped by ``("collector", "traj_ids")`` (unique across workers, so a trajectory never
mixes workers or envs) and kept in time order. A trajectory is complete once its last frame is
done (``("next", "done")``, ``terminated`` or ``truncated``); until then it is held back. Frames
never filled (traj id -1, a preempted batch's padding) are left out.

    >>> import torch
    >>> from tensordict import TensorDict
    >>> frames = TensorDict({("collector", "traj_ids"): torch.tensor([0, 0, 1]),
    ...                      ("next", "done"): torch.tensor([[False], [True], [False]])}, [3])
    >>> trajs = Trajectories()
    >>> trajs.ingest(frames)
    >>> len(trajs.complete), sorted(trajs.partial)
    (1, [1])
    >>> trajs.emit(1, "padded").batch_size
    torch.Size([1, 2])
"""
from __future__ import annotations

import torch
from tensordict import TensorDict, pad

TRAJ_KEY = ("collector", "traj_ids")
MASK_KEY = ("collector", "mask")
DONE_KEYS = (("next", "done"), ("next", "terminated"), ("next", "truncated"))


def ends_done(chunk: TensorDict) -> bool:
    """Whether the last frame of ``chunk`` ends its episode."""
    for key in DONE_KEYS:
        flag = chunk.get(key, None)
        if flag is not None and bool(flag[-1].any()):
            return True
    return False


class Trajectories:
    """``ingest(batch)`` frames; ``complete`` trajectories wait in order of completion;
    ``emit(n, traj_format)`` takes ``n`` of them as one batch."""

    def __init__(self):
        self.partial: dict[int, list[TensorDict]] = {}  # traj id -> its chunks so far
        self.complete: list[TensorDict] = []  # flat [T_i] trajectories, oldest first

    def ingest(self, batch: TensorDict) -> None:
        flat = batch.reshape(-1)
        ids = flat.get(TRAJ_KEY, None)
        if ids is None:
            raise KeyError("trajs_per_batch needs ('collector', 'traj_ids') in every batch; "
                           "keep track_traj_ids=True.")
        keep = ids >= 0
        if not bool(keep.all()):
            flat, ids = flat[keep], ids[keep]
        order = torch.argsort(ids, stable=True)  # by trajectory, each in time order
        flat, ids = flat[order], ids[order]
        uniq, counts = torch.unique_consecutive(ids, return_counts=True)
        start = 0
        for tid, count in zip(uniq.tolist(), counts.tolist()):
            chunk = flat[start:start + count]
            start += count
            self.partial.setdefault(tid, []).append(chunk)
            if ends_done(chunk):
                chunks = self.partial.pop(tid)
                self.complete.append(torch.cat(chunks, 0) if len(chunks) > 1 else chunks[0])

    def take(self, n: int | None = None) -> list[TensorDict]:
        """The ``n`` oldest complete trajectories (all when ``None``), removed from the queue."""
        n = len(self.complete) if n is None else n
        out, self.complete = self.complete[:n], self.complete[n:]
        return out

    def emit(self, n: int, traj_format: str) -> TensorDict:
        """``n`` trajectories: ``"padded"`` gives ``[n, max_len]`` zero-padded along time with
        ``("collector", "mask")``; ``"cat"`` gives them end to end, ``[sum T_i]``."""
        trajs = self.take(n)
        if traj_format == "cat":
            return torch.cat(trajs, 0) if len(trajs) > 1 else trajs[0]
        max_len = max(t.shape[0] for t in trajs)
        rows = []
        for traj in trajs:
            traj = traj.copy()
            traj.set(MASK_KEY, torch.ones(traj.shape[0], dtype=torch.bool))
            rows.append(pad(traj, [0, max_len - traj.shape[0]]) if traj.shape[0] < max_len else traj)
        out = torch.stack(rows, 0)
        out.names = [None, "time"]
        return out

    def clear(self, partial_only: bool = False) -> None:
        self.partial.clear()
        if not partial_only:
            self.complete.clear()


def check_trajectory_options(options, cls_name: str) -> None:
    """``trajs_per_batch`` and its companions: what they need, refused where they would do
    nothing or could not work; TorchRL's ``FutureWarning`` when the format is left unset."""
    import warnings

    check_extend_buffer(options, cls_name)
    if options.trajs_per_batch is None:
        for name in ("traj_format", "trajs_per_write"):
            if getattr(options, name) is not None:
                raise ValueError(f"{cls_name}: {name}={getattr(options, name)!r} has no effect "
                                 "unless trajs_per_batch is set. Set trajs_per_batch or drop it.")
        return
    clash = [name for name, bad in (("split_trajs=True", options.split_trajs),
                                    ("track_traj_ids=False", not options.track_traj_ids))
             if bad]
    if clash:
        raise ValueError(f"{cls_name}: trajs_per_batch assembles trajectories from traj ids; "
                         f"{clash} cannot go with it. Drop one.")
    if hasattr(options.replay_buffer, "actor"):
        raise ValueError(f"{cls_name}: trajs_per_batch with a RayReplayBuffer is not supported "
                         "(batches go from the env actors to the buffer actor, unassembled). Use "
                         "a replay buffer in this process (e.g. TorchRL's), or drop "
                         "trajs_per_batch and sample slices.")
    if options.trajs_per_write is not None and options.replay_buffer is None:
        raise ValueError(f"{cls_name}: trajs_per_write={options.trajs_per_write} sizes replay "
                         "buffer writes, and there is no replay_buffer. Drop it.")
    if options.traj_format is None and options.replay_buffer is None:
        warnings.warn("trajs_per_batch is set but traj_format is not: the layout is 'padded', "
                      "TorchRL's current default, which will change to 'cat' in torchrl v0.16. "
                      "Pass traj_format='padded' or 'cat' to choose.", FutureWarning, stacklevel=4)


def check_extend_buffer(options, cls_name: str) -> None:
    """``extend_buffer=False`` (step-by-step writes) where it can work, as TorchRL checks it."""
    if options.extend_buffer or options.replay_buffer is None:
        return  # (without a buffer it changes nothing, as in TorchRL)
    if hasattr(options.replay_buffer, "actor"):
        raise NotImplementedError(
            f"{cls_name}: extend_buffer=False with a RayReplayBuffer is not supported (env actors "
            "write whole batches into the buffer actor). Drop extend_buffer, or use a replay "
            "buffer in this process (e.g. TorchRL's).")
    clash = [name for name in ("postproc", "split_trajs", "return_same_td") if getattr(options, name)]
    if clash:
        raise ValueError(f"{cls_name}: {clash} need the whole batch, and extend_buffer=False writes "
                         "the replay buffer step by step. Set extend_buffer=True or drop them.")
    for name in ("trajs_per_batch", "preemptive_threshold"):
        if getattr(options, name) is not None:
            raise NotImplementedError(f"{cls_name}: extend_buffer=False with {name} is not "
                                      f"supported. Drop one of them.")


def each_step(batch, layout: str, workers: int) -> list:
    """The time steps of ``batch`` in time order, one per worker each (``[]``, or ``[E]`` with
    several envs per worker): what TorchRL's ``extend_buffer=False`` adds one at a time."""
    if layout == "cat":  # workers concatenated along time (each its own number of steps)
        ids = batch.get(("collector", "worker_id")).reshape(-1, batch.shape[-1])[0]
        sizes = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
        starts = [sum(sizes[:w]) for w in range(len(sizes))]
        return [batch[..., starts[w] + t] for t in range(max(sizes))
                for w in range(len(sizes)) if t < sizes[w]]
    if layout == 0:  # [W * E, T]: worker w's envs are rows w * E ... (w + 1) * E - 1
        envs = batch.shape[0] // workers
        return [batch[w * envs:(w + 1) * envs, t] for t in range(batch.shape[-1])
                for w in range(workers)]
    if layout == "stack":
        return [batch[w, ..., t] for t in range(batch.shape[-1]) for w in range(batch.shape[0])]
    return [batch[..., t] for t in range(batch.shape[-1])]
