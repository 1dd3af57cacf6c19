"""TorchRL sampler objects accepted by ``RayReplayBuffer(sampler=...)``, mapped onto ours.

Recognised by class name (torchrl stays optional): ``RandomSampler``,
``SamplerWithoutReplacement``, ``PrioritizedSampler`` and ``SliceSampler``. Their settings
become ours; a setting that ours would not honour raises ``NotImplementedError`` naming it.
"""
from __future__ import annotations

TRAJ_KEY = ("collector", "traj_ids")
# SliceSampler settings we honour only at TorchRL's defaults (ours: strict, unpadded slices of
# one trajectory, found by trajectory id)
SLICE_DEFAULTS = {"end_key": (None, ("next", "done")), "end_keys": (None,),
                  "strict_length": (True,), "pad_output": (False,),
                  "span": (False, (False, False)), "fragmented": (False,), "use_gpu": (False,),
                  "compile": (False,)}


def _refuse(name: str, setting: str, value, why: str):
    raise NotImplementedError(f"{name}({setting}={value!r}): {why}. Use TorchRL's default, or "
                              "one of ours by name ('random', 'without_replacement', "
                              "'prioritized', 'slice').")


def from_torchrl(sampler, capacity: int) -> tuple[str, dict]:
    """``(our sampler name, its keyword arguments)`` for a TorchRL sampler object."""
    name = type(sampler).__name__
    if name == "RandomSampler":
        return "random", {}
    if name == "SamplerWithoutReplacement":
        if not getattr(sampler, "shuffle", True):
            _refuse(name, "shuffle", False, "epochs are always shuffled here")
        return "without_replacement", {"drop_last": bool(getattr(sampler, "drop_last", False))}
    if name == "PrioritizedSampler":
        if getattr(sampler, "reduction", "max") != "max":
            _refuse(name, "reduction", sampler.reduction, "priorities are per frame here")
        if getattr(sampler, "_max_priority_within_buffer", False):
            _refuse(name, "max_priority_within_buffer", True, "new frames get the highest "
                    "priority ever seen here")
        if getattr(sampler, "_max_capacity", capacity) != capacity:
            raise ValueError(f"PrioritizedSampler(max_capacity={sampler._max_capacity}) differs "
                             f"from the buffer's capacity {capacity}; make them equal.")
        return "prioritized", {"alpha": sampler._alpha, "beta": sampler._beta, "eps": sampler._eps}
    if name == "SliceSampler":
        for key, defaults in SLICE_DEFAULTS.items():
            value = getattr(sampler, key, defaults[0])
            if value not in defaults:
                _refuse(name, key, value, "not supported by our slice sampler")
        traj_key = getattr(sampler, "traj_key", None)
        if traj_key not in (None, TRAJ_KEY, "traj_ids") and not getattr(sampler, "_traj_key_auto", False):
            _refuse(name, "traj_key", traj_key, f"slices follow {TRAJ_KEY} here")
        return "slice", {"slice_len": sampler.slice_len, "num_slices": sampler.num_slices}
    raise TypeError(f"sampler {name} is not one we know: pass 'random', 'without_replacement', "
                    "'prioritized', 'slice', or TorchRL's RandomSampler, SamplerWithoutReplacement, "
                    "PrioritizedSampler or SliceSampler.")
