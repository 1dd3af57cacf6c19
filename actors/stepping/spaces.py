"""Describe gymnasium spaces as plain specs: ``{key: (shape, dtype)}``, picklable and cheap."""
from __future__ import annotations

import numpy as np
from gymnasium import spaces

OBS_KEY = "observation"


class SpaceError(TypeError):
    """A gymnasium space this library cannot store."""


def leaf_spec(space: spaces.Space, where: str) -> tuple[tuple[int, ...], str]:
    """Shape and numpy dtype name of one stored entry of ``space``."""
    if isinstance(space, spaces.Discrete):
        return (), "int64"
    if isinstance(space, spaces.MultiDiscrete):
        return tuple(space.shape), "int64"
    if isinstance(space, spaces.MultiBinary):
        return tuple(space.shape), "int8"
    if isinstance(space, spaces.Box):
        return tuple(space.shape), np.dtype(space.dtype).name
    raise SpaceError(
        f"{where}: space {space!r} is not supported; expected Box, Discrete, MultiDiscrete, "
        "MultiBinary or a Dict of those. Wrap the env so it exposes one of them."
    )


def observation_spec(space: spaces.Space) -> dict[str, tuple[tuple[int, ...], str]]:
    """One key per entry for a ``Dict`` space, else the single key ``"observation"``."""
    if isinstance(space, spaces.Dict):
        return {str(k): leaf_spec(sub, f"observation[{k!r}]") for k, sub in space.spaces.items()}
    return {OBS_KEY: leaf_spec(space, "observation")}


def split_observation(obs, keys: tuple[str, ...], is_dict: bool) -> dict:
    """The gymnasium observation as ``{key: value}``."""
    return obs if is_dict else {keys[0]: obs}
