"""Building an env for an env actor: its factory and, for a TorchRL env, the transforms the
collector adds (a step counter, the policy's transforms), a started batched env instance turned
into a recipe, and which entries of an env vary in shape. Nothing here imports torchrl at module
level."""
from __future__ import annotations

import copy
import functools


def is_torchrl_env(env) -> bool:
    """True for a TorchRL ``EnvBase`` (checked without importing torchrl)."""
    return any(c.__name__ == "EnvBase" and c.__module__.startswith("torchrl")
               for c in type(env).__mro__)


def make_env_fn(create_env_fn, create_env_kwargs: dict | None):
    """A zero-argument factory from a gymnasium id, a callable, or a TorchRL env instance (each
    call gives a copy of it)."""
    kwargs = dict(create_env_kwargs or {})
    if is_torchrl_env(create_env_fn):
        if kwargs:
            raise TypeError("create_env_kwargs are for a factory; an env instance takes none.")
        return functools.partial(copy.deepcopy, create_env_fn)
    if isinstance(create_env_fn, str):
        env_id = create_env_fn

        def make():
            import gymnasium

            return gymnasium.make(env_id, **kwargs)

        return make
    return lambda: create_env_fn(**kwargs)


def with_step_counter(env, max_steps: int):
    """``env`` in a ``StepCounter(max_steps)``; ``ValueError`` if it counts steps already."""
    from torchrl.envs import StepCounter, TransformedEnv

    if any("step_count" in ((k,) if isinstance(k, str) else k)
           for k in env.output_spec.keys(True, True)):
        raise ValueError(
            f"max_frames_per_traj={max_steps}, but the env has a 'step_count' entry already (a "
            "StepCounter transform): the two would disagree. Pass max_frames_per_traj=None, or "
            "set the limit on the env's own StepCounter(max_steps=...).")
    return TransformedEnv(env, StepCounter(max_steps=max_steps))


def with_policy_transforms(env, policy):
    """``env`` with the transforms ``policy`` needs appended where missing (TorchRL's
    ``auto_register_policy_transforms=True``: ``InitTracker``, a recurrent module's primer)."""
    if policy is None or not hasattr(policy, "modules"):
        return env
    from torchrl.modules.utils.utils import _maybe_append_env_transforms_from_module

    return _maybe_append_env_transforms_from_module(env, policy)


def ragged_entries(env) -> list:
    """``[(key, shape)]`` of the env's entries whose shape varies (a ``-1`` in their spec:
    dynamic specs, heterogeneous lazily stacked envs)."""
    return [(k[1:], tuple(spec[k].shape)) for spec in (env.output_spec, env.input_spec)
            for k in spec.keys(True, True) if -1 in tuple(spec[k].shape)]


def shippable(create_env_fn):
    """``create_env_fn`` as it can go to the env actors: a started ``ParallelEnv`` instance
    (its worker processes and shared buffers do not pickle) becomes the recipe of a fresh one
    (:func:`batched_env_recipe`); a ``SerialEnv`` pickles, its envs' state (seeds) included."""
    if is_torchrl_env(create_env_fn) and not getattr(create_env_fn, "is_closed", True) \
            and any(c.__name__ == "ParallelEnv" for c in type(create_env_fn).__mro__):
        return batched_env_recipe(create_env_fn)
    return create_env_fn


def batched_env_recipe(env):
    """A factory of a fresh copy of a started batched env instance (the instance stays yours,
    open): the same class, sub-env factories and settings, seeded as the instance was."""
    kwargs = {"create_env_kwargs": env.create_env_kwargs, "device": env.device,
              "num_threads": env.num_threads, "num_sub_threads": env.num_sub_threads,
              "serial_for_single": env.serial_for_single}
    if getattr(env, "_mp_start_method", None) is not None:
        kwargs["mp_start_method"] = env._mp_start_method
    return functools.partial(_rebuilt, type(env), env.num_workers, env.create_env_fn, kwargs,
                             getattr(env, "_seeds", None))


def _rebuilt(cls, num_workers: int, fns, kwargs: dict, seeds):
    env = cls(num_workers, fns, **kwargs)
    if seeds:
        env.set_seed(seeds[0])
    return env
