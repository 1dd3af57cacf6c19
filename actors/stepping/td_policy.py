"""A policy made ready for a TorchRL env, the way TorchRL's collectors prepare it.

- A ``RandomPolicy()`` built without a spec takes the env's ``full_action_spec``; exploration
  modules built with ``spec=None`` take the env's action spec.
- A plain ``nn.Module`` is wrapped in a ``TensorDictModule``: its ``forward`` arguments that name
  observation keys are its ``in_keys`` (a module of one argument on an env of one observation
  reads that observation), its ``out_keys`` are the env's ``action_keys``, and a module that
  returns a tuple writes the extra outputs to ``"output1"``, ``"output2"``... A module whose
  ``forward`` takes ``tensordict`` or ``td`` is called with the TensorDict, as it is.

    >>> from torch import nn
    >>> from torchrl.envs.libs.gym import GymEnv  # doctest: +SKIP
    >>> policy = prepare_td_policy(nn.LazyLinear(2), "module", GymEnv("CartPole-v1"))  # doctest: +SKIP
    >>> policy.in_keys, policy.out_keys  # doctest: +SKIP
    (['observation'], ['action'])
"""
from __future__ import annotations

import inspect

from actors.errors import PolicyWrapError


def prepare_td_policy(policy, kind: str, env):
    """``policy`` ready to be called on the env's TensorDicts (``None`` for random actions)."""
    if kind == "random":
        return None
    if hasattr(policy, "set_action_spec_from_env"):  # torchrl's RandomPolicy(): lazy spec
        policy.set_action_spec_from_env(env)
    try:
        from torchrl.modules import set_exploration_modules_spec_from_env
    except ImportError:  # pragma: no cover - older torchrl
        set_exploration_modules_spec_from_env = None
    import torch

    if set_exploration_modules_spec_from_env is not None and isinstance(policy, torch.nn.Module):
        set_exploration_modules_spec_from_env(policy, env)
    return wrap_module(policy, env) if kind == "module" else policy


def takes_tensordict(policy) -> bool:
    """Whether a module's ``forward`` takes the TensorDict itself."""
    from tensordict import is_tensor_collection

    params = inspect.signature(getattr(policy, "forward", policy)).parameters
    names = list(params)
    return set(names) in ({"tensordict"}, {"td"}) or (
        len(names) == 1 and isinstance(params[names[0]].annotation, type)
        and is_tensor_collection(params[names[0]].annotation))


def wrap_module(policy, env):
    """A ``TensorDictModule`` around a plain module, as TorchRL wraps it (see the module doc)."""
    from tensordict.nn import TensorDictModule

    if takes_tensordict(policy):
        return policy
    params = inspect.signature(policy.forward).parameters
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    names = [n for n, p in params.items() if p.kind in plain]
    required = {n for n in names if params[n].default is inspect.Parameter.empty}
    roots = [k for k in env.observation_spec.keys()]
    leaves = list(env.observation_spec.keys(True, True))
    if required and required <= set(roots):
        in_keys = [n for n in names if n in roots]
    elif len(leaves) == 1 and len(required) <= 1:
        in_keys = leaves
    else:
        raise PolicyWrapError(
            f"Arguments to policy.forward are incompatible with entries in the env's observation "
            f"keys: a plain nn.Module policy is wrapped by matching its forward arguments "
            f"{names} to the env's observation keys {roots}. Name the arguments after the "
            "observations, or wrap it in a TensorDictModule naming its in_keys.")
    out_keys = list(env.action_keys)
    probe = env.fake_tensordict()
    device = next((t.device for t in (*policy.parameters(), *policy.buffers())), None)
    inputs = [probe.get(k) if device is None else probe.get(k).to(device) for k in in_keys]
    import torch

    with torch.no_grad():
        out = policy(*inputs)
    if isinstance(out, tuple):
        out_keys += [f"output{i + 1}" for i in range(len(out) - 1)]
    return TensorDictModule(policy, in_keys=in_keys, out_keys=out_keys)
