"""Which ``("next", ...)`` entries ``compact_obs`` leaves out, and compact worker batches.

Numpy only (env actors import it; torch and tensordict stay out of their start-up). The replay
buffer's compact storage is :mod:`actors.storage.compact_storage`.
"""
from __future__ import annotations

import numpy as np

NOT_OBSERVATIONS = ("reward", "done", "terminated", "truncated")  # never rebuilt from a slot


def compacted_keys(keys) -> tuple:
    """The root keys ``k`` (as tuples) whose ``("next", *k)`` is also among ``keys``: the
    observation and state keys TorchRL's ``compact_obs`` drops (reward and done flags stay)."""
    keys = {(k,) if isinstance(k, str) else tuple(k) for k in keys}
    return tuple(sorted(k for k in keys if k[0] != "next" and k[-1] not in NOT_OBSERVATIONS
                        and ("next", *k) in keys))


AT = ("_compact", "at")  # [m, 2] (env, step) of the next values shipped apart


def compact_arrays(arrays: dict) -> dict:
    """Worker arrays ``{key: [E, T, ...]}`` without the ``("next", obs)`` copies the following
    step holds: only the others (episode ends, each row's last step) are shipped, as
    ``("_compact", *key)`` values at the ``(env, step)`` positions of ``("_compact", "at")``.
    Halves what pixel batches put through the object store; :func:`expand_arrays` undoes it."""
    keys = [k for k in compacted_keys(arrays) if arrays[k if len(k) > 1 else k[0]].shape ==
            arrays[("next", *k)].shape]
    if not keys:
        return arrays
    steps = arrays[("next", *keys[0])].shape[1]
    apart = np.zeros(arrays[("next", *keys[0])].shape[:2], bool)
    apart[:, -1] = True
    for key in keys:
        root, nxt = arrays[key if len(key) > 1 else key[0]], arrays[("next", *key)]
        if steps > 1:
            same = (root[:, 1:] == nxt[:, :-1]).reshape(*root.shape[:1], steps - 1, -1).all(-1)
            apart[:, :-1] |= ~same
    out = {k: v for k, v in arrays.items() if not (isinstance(k, tuple) and k[0] == "next"
                                                   and k[1:] in keys)}
    out[AT] = np.argwhere(apart).astype(np.int64)
    for key in keys:
        out[("_compact", *key)] = arrays[("next", *key)][apart]
    return out


def expand_arrays(arrays: dict) -> dict:
    """The full arrays again from :func:`compact_arrays`' output (anything else unchanged)."""
    if AT not in arrays:
        return arrays
    at = arrays[AT]
    out = {k: v for k, v in arrays.items() if not (isinstance(k, tuple) and k[0] == "_compact")}
    for key, values in arrays.items():
        if not isinstance(key, tuple) or key[0] != "_compact" or key == AT:
            continue
        root = arrays[key[1:] if len(key) > 2 else key[1]]
        nxt = np.empty_like(root)
        nxt[:, :-1] = root[:, 1:]
        nxt[at[:, 0], at[:, 1]] = values
        out[("next", *key[1:])] = nxt
    return out
