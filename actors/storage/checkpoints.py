"""Replay-buffer checkpoints on disk: atomic, durable, validated, and never unpickled.

Layout of a checkpoint directory::

    path/
        RAY_COLLECTORS_CHECKPOINT   marks the directory as ours (nothing else is overwritten)
        CURRENT                     the name of the current version, switched by one rename
        v000007/                    meta.json, storage/ and sampler/ (tensordict memmaps)
        v000006/                    the previous version, kept as a fallback

A version is written beside the others, every file and directory fsynced, then ``CURRENT`` is
switched with one atomic rename; older versions are removed only after the switch. A process
killed at any point leaves ``CURRENT`` naming a whole version. Reading validates the metadata
(capacity, size, cursor), every file's length, and shapes and dtypes against the metadata; a
damaged version falls back to the previous good one, and if none is good the error says why.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import torch
from tensordict import TensorDict

from actors.errors import RayCollectorsError

log = logging.getLogger("ray_collectors.checkpoints")

MARKER = "RAY_COLLECTORS_CHECKPOINT"
CURRENT = "CURRENT"
LEGACY_MARKER = "COMPLETE"  # the single-directory format of earlier versions (read only)
KEEP = 2


class CheckpointError(RayCollectorsError, ValueError):
    """A checkpoint directory is not ours, or holds no version that passes validation."""


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) or os.path.isfile(os.path.join(path, LEGACY_MARKER))


def check_claimable(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is ours, empty, or does not exist."""
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path):
            raise CheckpointError(f"checkpoint path {path!r} exists and is not a directory; "
                                  "choose another path.")
        if not is_checkpoint(path) and os.listdir(path):
            raise CheckpointError(
                f"{path!r} is a non-empty directory that is not a ray-collectors checkpoint "
                f"(no {MARKER} file); refusing to write into it. Choose a new or empty directory.")


def has_versions(path: str) -> bool:
    """Whether ``path`` holds anything to restore (a claimed directory may hold no version yet:
    the buffer died before its first checkpoint, and its writers resend what it had)."""
    if os.path.isfile(os.path.join(path, LEGACY_MARKER)):
        return True
    return os.path.isfile(os.path.join(path, MARKER)) and bool(_versions(path))


def claim(path: str) -> None:
    """Make ``path`` a checkpoint directory, or refuse: an existing non-empty directory (or a
    file) that is not one of ours is never written into."""
    check_claimable(path)
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path):
            raise CheckpointError(f"checkpoint path {path!r} exists and is not a directory; "
                                  "choose another path.")
        if is_checkpoint(path):
            return
        if os.listdir(path):
            raise CheckpointError(
                f"{path!r} is a non-empty directory that is not a ray-collectors checkpoint "
                f"(no {MARKER} file); refusing to write into it. Choose a new or empty directory.")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), "w") as fh:
        fh.write(json.dumps({"format": 2}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _versions(path: str) -> list[str]:
    names = [n for n in os.listdir(path) if n.startswith("v") and n[1:].isdigit()]
    return sorted(names, key=lambda n: int(n[1:]), reverse=True)


def write(path: str, storage, sampler_tensors: dict, meta: dict) -> str:
    """Write a new version and switch ``CURRENT`` to it; returns the version's directory."""
    claim(path)
    versions = _versions(path)
    name = f"v{(int(versions[0][1:]) + 1) if versions else 1:06d}"
    tmp = os.path.join(path, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        if storage is not None:
            storage.memmap(os.path.join(tmp, "storage"))
        if sampler_tensors:
            TensorDict(sampler_tensors, batch_size=[]).memmap(os.path.join(tmp, "sampler"))
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh)
        _fsync_tree(tmp)
        os.rename(tmp, os.path.join(path, name))
        _fsync(path)
        pointer = os.path.join(path, f".{CURRENT}.tmp-{uuid.uuid4().hex[:8]}")
        with open(pointer, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(pointer, os.path.join(path, CURRENT))  # the switch
        _fsync(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _versions(path)[KEEP:]:  # only after the switch
        shutil.rmtree(os.path.join(path, old), ignore_errors=True)
    for leftover in os.listdir(path):
        if leftover.startswith(".") and ".tmp-" in leftover:
            shutil.rmtree(os.path.join(path, leftover), ignore_errors=True)
    return os.path.join(path, name)


def read(path: str, capacity: int) -> tuple[dict, object, dict, str]:
    """``(meta, storage, sampler tensors, version dir)`` of the newest valid version."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory; nothing to restore.")
    if os.path.isfile(os.path.join(path, LEGACY_MARKER)) and not os.path.isfile(os.path.join(path, MARKER)):
        return (*_read_version(path, capacity), path)
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"{path!r} is not a ray-collectors checkpoint (no {MARKER} file).")
    candidates = _versions(path)
    try:
        with open(os.path.join(path, CURRENT)) as fh:
            current = fh.read().strip()
        if current in candidates:
            candidates.remove(current)
            candidates.insert(0, current)
    except OSError:
        pass
    problems = []
    for name in candidates:
        try:
            meta, storage, tensors = _read_version(os.path.join(path, name), capacity)
        except CheckpointError as exc:
            problems.append(f"{name}: {exc}")
            log.warning("checkpoint version %s of %s is damaged (%s); trying an older one",
                        name, path, exc)
            continue
        return meta, storage, tensors, os.path.join(path, name)
    raise CheckpointError(f"no valid checkpoint in {path!r}: " + ("; ".join(problems) or
                                                                  "it holds no version"))


def current_meta(path: str) -> dict:
    """The metadata of the version ``CURRENT`` names (to size a buffer before restoring)."""
    if os.path.isfile(os.path.join(path, LEGACY_MARKER)):
        folder = path
    else:
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise CheckpointError(f"{path!r} is not a ray-collectors checkpoint (no {MARKER} file).")
        try:
            with open(os.path.join(path, CURRENT)) as fh:
                folder = os.path.join(path, fh.read().strip())
        except OSError as exc:
            raise CheckpointError(f"{path!r} has no {CURRENT} version: {exc!r}") from None
    try:
        with open(os.path.join(folder, "meta.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"meta.json of {folder!r} unreadable: {exc!r}") from None


def _check_files(root: str) -> None:
    """Every ``<key>.memmap`` file has the length its ``meta.json`` declares. Checked before
    loading, since mapping a short file would extend it with zeros."""
    for folder, _, files in os.walk(root):
        if "meta.json" not in files:
            continue
        try:
            with open(os.path.join(folder, "meta.json")) as fh:
                entries = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}/meta.json unreadable: {exc!r}") from None
        for key, entry in entries.items():
            if not isinstance(entry, dict) or "dtype" not in entry:
                continue
            dtype = getattr(torch, str(entry["dtype"]).removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"entry {key!r} has an unknown dtype {entry['dtype']!r}")
            numel = 1
            for dim in entry.get("shape", []):
                numel *= int(dim)
            want = numel * torch.empty((), dtype=dtype).element_size()
            file = os.path.join(folder, f"{key}.memmap")
            have = os.path.getsize(file) if os.path.isfile(file) else None
            if have != want:
                raise CheckpointError(f"file of {key!r} holds {have} bytes, expected {want}")


def _load(root: str):
    """A tensordict memmap loaded without pickle, each file's length checked first."""
    _check_files(root)
    try:
        td = TensorDict.load_memmap(root, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable layout is a damaged checkpoint
        raise CheckpointError(f"cannot read {root!r}: {exc!r}") from None
    return td.clone()


def _read_version(root: str, capacity: int) -> tuple[dict, object, dict]:
    try:
        with open(os.path.join(root, "meta.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"meta.json unreadable: {exc!r}") from None
    size, cursor = meta.get("size"), meta.get("cursor")
    if meta.get("capacity") != capacity:
        raise CheckpointError(f"capacity {meta.get('capacity')!r}, this buffer's is {capacity}")
    if not (isinstance(size, int) and 0 <= size <= capacity and isinstance(cursor, int)
            and 0 <= cursor < capacity and (size == capacity or cursor == size)):
        raise CheckpointError(f"size {size!r} / cursor {cursor!r} out of range for capacity {capacity}")
    storage = None
    if os.path.isdir(os.path.join(root, "storage")):
        storage = _load(os.path.join(root, "storage"))
        if storage.batch_size != torch.Size([capacity]):
            raise CheckpointError(f"storage has batch size {tuple(storage.batch_size)}, expected "
                                  f"({capacity},)")
    elif size:
        raise CheckpointError(f"meta.json says {size} frames but the storage is missing")
    tensors = {}
    if os.path.isdir(os.path.join(root, "sampler")):
        tensors = _load(os.path.join(root, "sampler")).to_dict()
    return meta, storage, tensors
