"""Turn worker arrays into TorchRL-layout TensorDicts, once per batch."""
from __future__ import annotations

import numpy as np
import torch
from tensordict import LazyStackedTensorDict, NonTensorStack, TensorDict, TensorDictBase

from actors.stepping.compact import compacted_keys
from actors.stepping.td_rollout import LAZY_KEY

COLLECTOR = "collector"


def frames_tensordict(flat: dict, batch_size) -> TensorDict:
    """A TensorDict from ``{key or nested key tuple: array or tensor}`` (arrays are copied)."""
    return TensorDict({k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
                       for k, v in flat.items()}, batch_size=batch_size)


def assemble(parts: list[dict], worker_ids: list[int] | None, layout: str,
             compact_obs: bool = False, env_shape: tuple | None = None) -> TensorDict:
    """Build one batch from per-worker arrays shaped ``[num_envs, T, ...]``.

    ``layout``: ``"single"`` (one worker: ``[T]`` or ``[E, T]``), ``"stack"`` (``[W, T]`` or
    ``[W, E, T]``), ``"cat"`` (workers concatenated along time) or ``0`` (``[W * E, T]``). ``worker_ids`` adds
    ``("collector", "worker_id")``. ``compact_obs`` leaves out the ``("next", ...)`` copies of
    observation and state keys, as TorchRL's ``compact_obs=True`` does. ``env_shape``: the
    env's batch dims when it has several (workers step them as ``prod(env_shape)`` rows); the
    batch gets them back, ``[*env_shape, T]`` (TorchRL's layout).
    """
    if LAZY_KEY in parts[0]:  # a ragged env's batches: lazy stacks, joined as they are
        return lazy_batch(parts, worker_ids, layout)
    num_envs = parts[0][("collector", "traj_ids")].shape[0]
    keys = [k for k in parts[0] if not (isinstance(k, tuple) and k[0] == "_compact")]
    if compact_obs:
        dropped = {("next", *k) for k in compacted_keys(keys)}
        keys = [k for k in keys if ((k,) if isinstance(k, str) else tuple(k)) not in dropped]
    squeeze = num_envs == 1  # one env per worker: no env dimension, as TorchRL
    flat = {}
    for key in keys:
        if layout == "single":  # (a copy: out of the slot or the read-only object-store buffer)
            arr = np.array(parts[0][key][0] if squeeze else parts[0][key])
        elif layout == "stack":
            arr = np.stack([p[key][0] if squeeze else p[key] for p in parts])
        elif layout == 0:  # TorchRL's cat_results=0 with [E, T] worker batches: [W * E, T]
            arr = np.concatenate([p[key] for p in parts], axis=0)
        else:
            arr = np.concatenate([p[key] for p in parts], axis=1)
            arr = arr[0] if squeeze else arr
        if env_shape is not None:  # [.., E, ..T] -> [.., *env_shape, ..T], features kept
            features = parts[0][key].ndim - 2
            batch = arr.shape[:arr.ndim - features]
            arr = arr.reshape(*env_dims(batch, layout, env_shape), *arr.shape[len(batch):])
        # (objects, e.g. a TorchRL env's NonTensorData strings: a NonTensorStack)
        flat[key] = NonTensorStack.from_list(arr.tolist()) if arr.dtype.hasobject \
            else torch.from_numpy(arr)
    batch_shape = flat[("collector", "traj_ids")].shape
    if worker_ids is not None:
        flat[("collector", "worker_id")] = worker_column(parts, worker_ids, layout, batch_shape)
    names = [None] * (len(batch_shape) - 1) + ["time"]
    return nested_tensordict(flat, batch_shape, names)


def worker_column(parts: list, worker_ids: list, layout, batch_shape) -> torch.Tensor:
    """``("collector", "worker_id")`` for a batch of ``batch_shape`` joined by ``layout``."""
    if len(worker_ids) == 1:  # (an async batch: one worker's)
        return torch.full(tuple(batch_shape), int(worker_ids[0]), dtype=torch.int64)
    ids, ones = torch.tensor(worker_ids, dtype=torch.int64), [1] * (len(batch_shape) - 1)
    if layout == "stack":
        w = ids.view(-1, *ones)
    elif layout == 0:
        w = ids.repeat_interleave(batch_shape[0] // len(worker_ids)).view(-1, *ones)
    else:
        lengths = torch.tensor([p[("collector", "traj_ids")].shape[1] for p in parts])
        w = ids.repeat_interleave(lengths).view(*ones, -1)
    return w.expand(batch_shape).contiguous()


def lazy_batch(parts: list, worker_ids, layout) -> TensorDictBase:
    """:func:`assemble` for a ragged env: each part holds its batch (``[*env dims, T]``) as a
    lazy stack (``LAZY_KEY``); they are stacked or concatenated as they are, as TorchRL does."""
    tds = [p[LAZY_KEY][()] for p in parts]
    if tds[0].batch_size[0] == 1:  # one env per worker: no env dimension, as TorchRL
        tds = [td[0] for td in tds]
    if layout == "single":
        batch = tds[0]
    elif layout == "stack":
        batch = LazyStackedTensorDict.maybe_dense_stack(tds, dim=0)
    else:
        batch = torch.cat(tds, dim=0 if layout == 0 else -1)
    if worker_ids is not None:
        batch.set(("collector", "worker_id"),
                  worker_column(parts, worker_ids, layout, batch.batch_size))
    batch.names = [None] * (batch.batch_dims - 1) + ["time"]
    return batch


def env_dims(batch: tuple, layout, env_shape: tuple) -> tuple:
    """The batch shape with the env rows of ``batch`` (see :func:`assemble`) as ``env_shape``."""
    if layout == "stack":
        return (batch[0], *env_shape, batch[-1])
    if layout == 0:  # workers' env rows end to end along the first env dim
        return (batch[0] // int(np.prod(env_shape)) * env_shape[0], *env_shape[1:], batch[-1])
    return (*env_shape, batch[-1])


def nested_tensordict(flat: dict, batch_size, names: list) -> TensorDict:
    """``TensorDict(flat, batch_size, names=names)`` for tensors already checked to have that
    batch shape (built level by level without re-validating each entry: a fifth of the cost)."""
    root: dict = {}
    for key, value in flat.items():
        node = root
        if isinstance(key, tuple):
            for part in key[:-1]:
                node = node.setdefault(part, {})
            key = key[-1]
        node[key] = value
    batch_size = torch.Size(batch_size)

    def build(node: dict) -> TensorDict:
        source = {k: build(v) if isinstance(v, dict) else v for k, v in node.items()}
        return TensorDict._new_unsafe(source, batch_size=batch_size, names=names)

    return build(root)


def split_trajectories(batch: TensorDict) -> TensorDict:
    """``[n_traj, max_len]``, zero-padded, with ``("collector", "mask")``; rows by traj id."""
    flat = batch.reshape(-1)
    ids = flat.get(("collector", "traj_ids"))
    keep = ids >= 0
    if not bool(keep.all()):
        flat, ids = flat[keep], ids[keep]
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    order = torch.sort(inverse, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    row = inverse[order]
    pos = torch.arange(order.numel()) - starts[row]
    n, max_len = uniq.numel(), int(counts.max()) if counts.numel() else 0
    out = flat[:1].expand(n * max_len).clone() if n else flat[:0]
    out.apply_(lambda t: t.zero_())
    flat_index = row * max_len + pos
    out[flat_index] = flat[order]
    out = out.reshape(n, max_len)
    mask = torch.zeros(n * max_len, dtype=torch.bool)
    mask[flat_index] = True
    out.set(("collector", "mask"), mask.view(n, max_len))
    out.names = [None, "time"]
    return out


def real_frames(batch: TensorDict, storage=None) -> TensorDict:
    """``batch`` flat, without the frames its ``("collector", "mask")`` marks as padding (a
    preempted worker's, a dropped episode's, ``split_trajs``' rows): what a buffer should get.
    A ``storage`` of two dims (TorchRL's ``ndim=2``) gets one row per env, ``[envs, T]``."""
    if getattr(storage, "ndim", 1) == 2 and batch.batch_dims >= 2 and ("collector", "mask") not in batch.keys(True):
        return batch.reshape(-1, batch.shape[-1])
    flat = batch.reshape(-1)
    mask = flat.get(("collector", "mask"), None)
    return flat if mask is None else flat[mask]


def on_storage_device(td, buffer):
    """A batch without a device, written into a TorchRL buffer whose storage has one, takes
    that device when its tensors are there already (as TorchRL's collectors write)."""
    device = getattr(getattr(buffer, "storage", None), "device", None)
    if device in (None, "auto") or not isinstance(td, TensorDict) or td.device is not None:
        return td
    device = torch.device(device)
    if any(v.device != device for v in td.values(True, True) if isinstance(v, torch.Tensor)):
        return td
    return td.to(device)


def mark_truncated(batch: TensorDict) -> None:
    """TorchRL's ``set_truncated``: the last step of each row ends: its ``truncated`` and
    ``done`` flags, nested ones (per agent) included, are set."""
    last = (slice(None),) * (batch.batch_dims - 1) + (-1,)  # the time dim is the batch's last
    for key in batch.get("next").keys(True, True):
        if (key if isinstance(key, str) else key[-1]) in ("truncated", "done"):
            batch.get(("next", *((key,) if isinstance(key, str) else key)))[last] = True


def finish(batch: TensorDict, options, postproc, masked: bool, nested=None) -> TensorDict:
    """The batch as the user gets it: masks, TorchRL's extra entries, postproc, device
    (``options``: the collector's; ``masked``: dropped episodes leave masked frames; ``nested``:
    the env's groups with dims of their own, ``{key: dims}``, given back to their TensorDicts)."""
    for key, dims in (nested or {}).items():
        for path in (key, ("next", *key)):
            sub = batch.get(path, None)
            if isinstance(sub, TensorDict):
                sub.batch_size = (*batch.batch_size, *dims)
    if options.preemptive_threshold is not None or masked:
        mask = batch.get(("collector", "traj_ids")) >= 0
        if batch.batch_dims == 1 and options.preemptive_threshold is not None:
            batch = batch[mask]  # workers end to end (cat_results=-1): the real frames only
        else:
            batch.set(("collector", "mask"), mask)
    if options.track_policy_version:  # TorchRL's PolicyVersion entries
        version = batch.get(("collector", "policy_version"))
        batch.set("policy_version", version.clone())
        batch.set(("next", "policy_version"), version.clone())
    if options.set_truncated:
        mark_truncated(batch)
    if options.split_trajs:
        batch = split_trajectories(batch)
    if postproc is not None:
        batch = postproc(batch)
    if not options.track_traj_ids:  # no bookkeeping entries: no "collector" one, as TorchRL
        batch = batch.exclude(*((COLLECTOR, k) for k in ("traj_ids", "policy_version", "worker_id")))
        if not batch.get(COLLECTOR).keys():
            batch = batch.exclude(COLLECTOR)
    if options.storing_device is not None:  # ("cpu": the batch's device says so, as TorchRL)
        batch = batch.to(options.storing_device)
    return batch
