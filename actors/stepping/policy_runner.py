"""Run a user policy on a batch of observations held as numpy arrays.

Three kinds: ``"random"`` (uniform from the action space), ``"module"`` (an ``nn.Module``
mapping the observation tensor to the action) and ``"td"`` (a TensorDictModule or any callable
TensorDict -> TensorDict). Each step the policy runs once on all envs of a worker.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

from actors.errors import PolicyOutputError

ACTION_KEY = "action"


def policy_kind(policy) -> str:
    if policy is None:
        return "random"
    import torch

    try:
        from tensordict.nn import TensorDictModuleBase
    except ImportError:  # pragma: no cover - tensordict is a dependency
        TensorDictModuleBase = ()
    if isinstance(policy, TensorDictModuleBase):
        return "td"
    if isinstance(policy, torch.nn.Module):
        return "module"
    if callable(policy):
        return "td"
    raise TypeError(
        f"policy must be None, a torch.nn.Module, a TensorDictModule or a callable "
        f"TensorDict -> TensorDict; got {type(policy).__name__}."
    )


def module_device(policy) -> str | None:
    """The device of an ``nn.Module`` policy's first parameter or buffer when it is not the
    CPU (``"cuda:0"``), else ``None``. TorchRL runs a policy where it is unless told otherwise.

    Example:
        >>> import torch
        >>> module_device(torch.nn.Linear(2, 2)) is None
        True
    """
    import torch

    if not isinstance(policy, torch.nn.Module):
        return None
    for tensor in (*policy.parameters(), *policy.buffers()):
        return None if tensor.device.type == "cpu" else str(tensor.device)
    return None


def local_device(device: str | None) -> str | None:
    """``device`` as this process names it. Ray shows an actor that asked for GPUs only the
    GPUs it was given, renumbered from 0: ``"cuda:1"`` (the trainer's name) is ``"cuda:0"``
    there when Ray gave it GPU 1, and the first GPU it was given otherwise."""
    if device is None or not device.startswith("cuda"):
        return device
    import torch

    try:
        import ray

        given = [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - not inside a Ray worker: the name stands
        given = []
    if not given:
        return device
    index = torch.device(device).index
    return f"cuda:{given.index(str(index)) if str(index) in given else 0}"


class PolicyRunner:
    """Calls the policy on ``{key: array[num_envs, ...]}`` and returns ``{key: ndarray}``."""

    def __init__(self, policy, kind: str, obs_keys: tuple[str, ...], num_envs: int,
                 exploration_type: str = "random", device: str | None = None):
        self.policy = policy
        self.kind = kind
        self.obs_keys = obs_keys
        self.num_envs = num_envs
        self.exploration_type = exploration_type
        self.device = None if device in (None, "cpu") else device  # where the policy runs
        self.td_device = device  # a TensorDict policy's input: on "cpu" if asked, as TorchRL
        self.torch = None
        self._td_cls = None
        self._forward = policy
        if kind != "random":
            import torch

            self.torch = torch
        if kind == "td":
            from tensordict import TensorDict

            self._td_cls = TensorDict

    def context(self):
        """Entered once per batch around the policy calls: ``torch.inference_mode`` and the
        exploration (interaction) type, as TorchRL's collectors set them. The interaction type
        is set whenever tensordict is loaded (a policy that reads it has imported it)."""
        stack = contextlib.ExitStack()
        if self.torch is not None:
            stack.enter_context(self.torch.inference_mode())
        if self.kind == "td" or "tensordict" in sys.modules:
            from tensordict.nn import InteractionType, set_interaction_type

            stack.enter_context(set_interaction_type(InteractionType(self.exploration_type)))
        return stack

    def __call__(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, device = self.torch, self.device
        if self.kind == "module":
            x = torch.from_numpy(obs[self.obs_keys[0]])
            out = self._forward(x if device is None else x.to(device))
            if not isinstance(out, torch.Tensor):
                raise _not_a_tensor(out)
            return {ACTION_KEY: (out if device is None else out.cpu()).numpy()}
        td = self._td_cls(
            {k: torch.from_numpy(v) for k, v in obs.items()}, batch_size=[self.num_envs],
            device=self.td_device)
        out = self.policy(td)
        if out is None:
            out = td
        result = {}
        for key, value in out.items(include_nested=True, leaves_only=True):
            if key in self.obs_keys or not isinstance(value, torch.Tensor):
                continue
            name = key if isinstance(key, str) else key[-1] if len(key) == 1 else key
            if isinstance(name, str) and name.startswith("_"):
                continue
            result[name] = value.detach().cpu().numpy()
        if ACTION_KEY not in result:
            raise PolicyOutputError(
                f"the policy's output TensorDict has no {ACTION_KEY!r} entry (keys: "
                f"{sorted(map(str, result))}). Write the action to the key {ACTION_KEY!r}."
            )
        return result

    def prepare(self):
        """Pick how to call a module policy for the next batch (hooks may have changed).
        Returns ``(call, on_array)``: ``call(obs)`` maps ``{key: array}`` to ``{key: ndarray}``
        like ``self(obs)``; with ``on_array`` (a module on the CPU) it maps the first key's array
        to the action array, without the dicts."""
        if self.kind != "module":
            return self, False
        self._forward = forward = sequential_chain(self.policy) or self.policy
        if self.device is not None:
            return self, False
        from_numpy, tensor = self.torch.from_numpy, self.torch.Tensor

        def step(x):  # __call__'s module branch, its lookups done once per batch
            out = forward(from_numpy(x))
            if not isinstance(out, tensor):
                raise _not_a_tensor(out)
            return out.numpy()

        return step, True

    @property
    def module(self):
        """The policy whose weights are loaded and saved (a compiled module's original)."""
        return getattr(self.policy, "_orig_mod", self.policy)

    def load_weights(self, state_dict) -> None:
        if self.kind == "random":
            return
        if not hasattr(self.module, "load_state_dict"):
            raise TypeError(
                f"policy {type(self.policy).__name__} has no load_state_dict(); weights can only "
                "be updated for torch.nn.Module policies."
            )
        self.module.load_state_dict(state_dict)


def _not_a_tensor(out) -> PolicyOutputError:
    return PolicyOutputError(
        f"an nn.Module policy must return the action tensor; got {type(out).__name__}. "
        "Return a tensor, or wrap the module in a tensordict.nn.TensorDictModule.")


def _plain(module) -> bool:
    """True when ``module(x)`` is exactly ``module.forward(x)``: no hooks, not compiled."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or getattr(module, "_compiled_call_impl", None))


def sequential_chain(policy):
    """For an ``nn.Sequential`` (nested ones too) without hooks: one function calling each
    layer's ``forward`` in turn, which is what ``policy(x)`` does minus about 0.8 us of
    ``Module.__call__`` per layer and step. ``None`` when that would not be the same call."""
    import torch
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, name) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")) or torch._C._get_tracing_state():
        return None

    def layers(m):
        if not _plain(m):
            raise LookupError
        if type(m).forward is torch.nn.Sequential.forward:
            for child in m:
                yield from layers(child)
        else:
            yield m.forward

    if not isinstance(policy, torch.nn.Sequential):
        return None
    try:
        forwards = tuple(layers(policy))
    except LookupError:
        return None

    def chain(x):
        for forward in forwards:
            x = forward(x)
        return x

    return chain
