"""Everything checked before any actor starts: env, spaces, policy outputs, options."""
from __future__ import annotations

import importlib
import math

import gymnasium
import numpy as np

from actors.stepping.env_building import make_env_fn
from actors.errors import EnvCreationError, PolicyOutputError
from actors.stepping.policy_runner import ACTION_KEY, PolicyRunner, module_device, policy_kind
from actors.stepping.spaces import leaf_spec, observation_spec
from actors.stepping.td_policy import prepare_td_policy
from actors.stepping.env_building import (is_torchrl_env, ragged_entries, with_policy_transforms,
                                          with_step_counter)

ANY = object()  # every value changes nothing here
# TorchRL 0.14.1 collector options that we know of but do not implement, with the values at
# which they change nothing here (accepted); any other value raises NotImplementedError.
NO_OP_VALUES = {
    "reset_when_done": (True,), "interruptor": (None,),
    "use_buffers": ANY,  # we always step into preallocated arrays
    "trust_policy": ANY,  # our policy check runs either way and changes no valid policy
    "cudagraph_policy": (None, False), "no_cuda_sync": ANY,
    "weight_updater": (None,), "weight_sync_schemes": (None,), "weight_recv_schemes": (None,),
    "mp_start_method": (None,), "collector_class": (None,), "local_init_rb": (None, False),
}
UNSUPPORTED = tuple(NO_OP_VALUES)
# values TorchRL 0.14.1 itself refuses, with the error it raises (the others: NotImplementedError)
TORCHRL_ERRORS = {
    ("reset_when_done", False): (ValueError, "is deprecated in TorchRL 0.14 (its Collector raises "
                                 "ValueError too); envs reset when an episode ends. Remove it."),
}


# TorchRL's same-node weight-sync schemes: what our own transport does (shared memory on the
# node, the object store beyond it), so ``{"policy": scheme}`` is taken as it
SAME_TRANSPORT = ("SharedMemWeightSyncScheme", "MultiProcessWeightSyncScheme")


def _maps_to_ours(key: str, value) -> bool:
    return key == "weight_sync_schemes" and isinstance(value, dict) and set(value) <= {"policy"} \
        and all(type(v).__name__ in SAME_TRANSPORT for v in value.values())


def _no_op(key: str, value) -> bool:
    """Whether TorchRL's option ``key`` at ``value`` changes nothing here."""
    if _maps_to_ours(key, value):
        return True
    accepted = NO_OP_VALUES[key]
    return accepted is ANY or any(value is v or (type(value) is type(v) and value == v)
                                  for v in accepted)


def split_torchrl_options(kwargs: dict, cls_name: str) -> dict:
    """Remove TorchRL's options we lack from ``kwargs``: at values that change nothing they
    are dropped, otherwise ``NotImplementedError`` names them (or the error TorchRL itself
    raises, where it refuses the value too). Returns the rest."""
    rest = {}
    for key, value in kwargs.items():
        if key not in NO_OP_VALUES:
            rest[key] = value
            continue
        error = next((e for (k, v), e in TORCHRL_ERRORS.items() if k == key and value is v), None)
        if error is not None:
            raise error[0](f"{cls_name}: {key}={value!r} {error[1]}")
        if not _no_op(key, value):
            raise NotImplementedError(
                f"{cls_name} does not support TorchRL's option {key}={value!r} (accepted only "
                f"at {'any value' if NO_OP_VALUES[key] is ANY else NO_OP_VALUES[key]}). Remove "
                "it; the README's 'Coming from TorchRL' table says what each option does here."
            )
    return rest


def one_per_worker(options, cls_name: str) -> None:
    """A ``policy_factory`` or ``create_env_kwargs`` list has one entry per worker."""
    factory = options.policy_factory
    if isinstance(factory, tuple) and len(factory) != options.num_workers:
        raise ValueError(f"{cls_name}: policy_factory is a list of {len(factory)} factories but "
                         f"num_workers={options.num_workers}; give one per worker or a single "
                         "factory.")
    if isinstance(options.create_env_kwargs, tuple) and \
            len(options.create_env_kwargs) != options.num_workers:
        raise ValueError(f"{cls_name}: create_env_kwargs is a list of "
                         f"{len(options.create_env_kwargs)} but num_workers="
                         f"{options.num_workers}; give one per worker or a single dict.")


def make_probe_env(create_env_fn, create_env_kwargs):
    """Build one env in this process to read its spaces; named errors on failure."""
    if isinstance(create_env_fn, str):
        module, _, env_id = create_env_fn.rpartition(":")
        if module:  # "package.module:EnvId": the module registers the id (here and in workers)
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise EnvCreationError(
                    f"env id {create_env_fn!r}: importing {module!r} (which should register "
                    f"{env_id!r}) failed: {exc}. Install it or fix the module name.") from None
        if env_id not in gymnasium.registry:
            base = env_id.split("-v")[0]
            close = gymnasium.envs.registration.find_highest_version(None, base)
            hint = f" Did you mean '{base}-v{close}'?" if close is not None else ""
            raise EnvCreationError(
                f"unknown gymnasium env id {create_env_fn!r}: {env_id!r} is not in "
                f"gymnasium.registry.{hint} Register it, name the module that registers it "
                "('module:EnvId', so the env actors import it too), or pass a callable."
            )
    elif not callable(create_env_fn):
        raise TypeError(
            f"create_env_fn must be a gymnasium id (str) or a callable returning a "
            f"gymnasium.Env; got {type(create_env_fn).__name__}."
        )
    try:
        env = make_env_fn(create_env_fn, create_env_kwargs)()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("torchrl", "tensordict"):
            raise EnvCreationError(
                f"creating the env from {create_env_fn!r} needs {exc.name}, which is not "
                "installed: pip install 'ray-collectors[torchrl]'.") from exc
        raise EnvCreationError(f"creating the env from {create_env_fn!r} raised {exc!r}") from exc
    except Exception as exc:
        raise EnvCreationError(f"creating the env from {create_env_fn!r} raised {exc!r}") from exc
    if is_torchrl_env(env):
        return env
    if isinstance(env, gymnasium.vector.VectorEnv) or not isinstance(env, gymnasium.Env):
        raise EnvCreationError(
            f"create_env_fn must return a single gymnasium.Env or a TorchRL EnvBase; got "
            f"{type(env).__name__}. Use num_envs=N instead of a vector env."
        )
    return env


def torchrl_spec(env, policy, exploration_type: str,
                 policy_device: str | None = None) -> tuple[dict, str]:
    """Check a TorchRL env (single or batched: ``batch_size`` [], [B] or [B1, B2, ...]; a batch
    has the env's dims before time) and the policy on one
    reset: the policy must write every one of the env's action keys, shaped as its spec."""
    kind = policy_kind(policy)
    shape = tuple(env.batch_size)
    if kind != "random":
        try:
            td_policy = prepare_td_policy(policy, kind, env)
            device = module_device(policy)
            td = env.reset()
            env_device = None if env.device is None else str(env.device)
            if device is not None:
                td = td.to(device)
            elif policy_device != env_device:  # TorchRL's device rules, as in the env actor
                td = td.to("cpu") if policy_device == "cpu" else td.clear_device_()
            with PolicyRunner(policy, kind, (), 1, exploration_type).context():
                out = td_policy(td)
            td = td if out is None else out
        except PolicyOutputError:
            raise
        except Exception as exc:  # the policy's own error, with what it was doing
            exc.add_note(f"(raised by the policy on the env's first observation, while the "
                         f"collector checked it; policy: {type(policy).__name__})")
            raise
        check_actions(env, td)
    return {"torchrl": True, "obs": {}, "obs_is_dict": False, "outputs": {},
            "env_batch": math.prod(shape) if shape else 0, "nested": nested_dims(env),
            "env_shape": shape if len(shape) > 1 else None}, kind


def nested_dims(env) -> dict:
    """``{key: dims}`` of the env's nested groups with batch dims of their own beyond the env's
    (per-agent entries, as TorchRL's multi-agent envs have): their sub-TensorDicts keep them."""
    from torchrl.data import Composite

    out, own = {}, len(env.batch_size)
    for spec in (env.full_observation_spec, env.full_state_spec, env.full_done_spec,
                 env.full_reward_spec, env.full_action_spec):
        for key, sub in spec.items(True):
            if isinstance(sub, Composite) and len(sub.shape) > own:
                out[key if isinstance(key, tuple) else (key,)] = tuple(sub.shape[own:])
    return out


def ragged_conflicts(options) -> list:
    """The options set that need one array per key, which a ragged env's batches (lazy stacks)
    do not have."""
    names = [n for n in ("compact_obs", "split_trajs", "trajs_per_batch") if getattr(options, n)]
    return names + (["a RayReplayBuffer"] if hasattr(options.replay_buffer, "actor") else [])


def refuse_ragged(env, conflicts: list) -> None:
    """``NotImplementedError`` for a TorchRL env with entries whose shape varies, given options
    that its batches (lazy stacks) cannot serve."""
    ragged = ragged_entries(env)
    if ragged and conflicts:
        listed = ", ".join(f"{k if len(k) > 1 else k[0]!r}: {s}" for k, s in ragged[:4])
        raise NotImplementedError(
            f"the TorchRL env {type(env).__name__} has entries whose shape varies from step to "
            f"step or between sub-envs (-1 in their specs: {listed}"
            f"{', ...' if len(ragged) > 4 else ''}); its batches are lazy stacks "
            f"(LazyStackedTensorDict), which {', '.join(conflicts)} cannot take here. Drop "
            f"{'it' if len(conflicts) == 1 else 'them'}, or pad those entries to a fixed shape "
            "(a transform).")


def fits(shape: tuple, spec_shape: tuple) -> bool:
    """An action of ``shape`` fits a spec of ``spec_shape``: the same shape, or the same values
    with size-1 dims added or dropped (``()`` for ``(1,)``, ``(B,)`` for ``(B, 1)``, which
    TorchRL's envs take). An index for a one-hot spec does not fit: it has fewer values."""
    return shape == spec_shape or (math.prod(shape) == math.prod(spec_shape) and
                                   [d for d in shape if d != 1] == [d for d in spec_shape if d != 1])


def check_actions(env, td) -> None:
    """Every action key of ``env`` is in ``td``, shaped as its spec (or as many values
    broadcast to it). Dtypes and values are the env's business (it casts, clips or projects
    them, as with TorchRL's collectors)."""
    for key in env.action_keys:
        spec = env.full_action_spec[key]
        if -1 in tuple(spec.shape):  # ragged (a lazy stack of actions): present is enough
            action = td if key in td.keys(True, True) else None
        else:
            action = td.get(key, None)
        if action is None:
            raise PolicyOutputError(
                f"the policy's output has no {key!r} entry, one of the env's action keys "
                f"{list(env.action_keys)} (keys written: {sorted(map(str, td.keys(True, True)))}). "
                "Write the action where the env reads it (a TensorDictModule's out_keys).")
        if action is not td and not fits(tuple(action.shape), tuple(spec.shape)):
            hint = ""
            if "OneHot" in type(spec).__name__:
                hint = (" The env's actions are one-hot: return a one-hot vector (or build the "
                        "env with categorical_action_encoding=True for indices).")
            raise PolicyOutputError(
                f"policy output {key!r} has shape {tuple(action.shape)}, but the env's action "
                f"spec {type(spec).__name__} has shape {tuple(spec.shape)}.{hint}")


def build_spec(create_env_fn, create_env_kwargs, policy, num_envs: int,
               exploration_type: str = "random", max_frames_per_traj: int | None = None,
               register_transforms: bool = False,
               policy_device: str | None = None, ragged_conflicts: tuple = ()) -> tuple[dict, str]:
    """The worker storage spec and the policy kind, after running the policy once here."""
    env = make_probe_env(create_env_fn, create_env_kwargs)
    if register_transforms and not is_torchrl_env(env):
        env.close()
        raise ValueError("auto_register_policy_transforms=True appends TorchRL transforms to a "
                         "TorchRL env; this env is a gymnasium env. Drop it.")
    if is_torchrl_env(env):
        try:
            refuse_ragged(env, list(ragged_conflicts))
            if max_frames_per_traj:
                env = with_step_counter(env, max_frames_per_traj)
            if register_transforms:
                env = with_policy_transforms(env, policy)
            spec, kind = torchrl_spec(env, policy, exploration_type, policy_device)
            return dict(spec, ragged=bool(ragged_entries(env))), kind
        finally:
            if not env.is_closed:  # (a batched env that never started is closed already)
                env.close()
    try:
        obs_space, act_space = env.observation_space, env.action_space
        obs = observation_spec(obs_space)
        action = leaf_spec(act_space, "action")
        kind = policy_kind(policy)
        is_dict = isinstance(obs_space, gymnasium.spaces.Dict)
        if kind == "module" and is_dict:
            raise TypeError(
                "a plain nn.Module policy takes one observation tensor, but the env has a Dict "
                f"observation space with keys {sorted(obs)}. Wrap it in a "
                "tensordict.nn.TensorDictModule with in_keys naming those entries."
            )
        outputs = {ACTION_KEY: action}
        if kind != "random":
            first, _ = env.reset(seed=0)
            samples = [first, first]
            batch = {k: np.stack([np.asarray(s[k] if is_dict else s, dtype=obs[k][1]) for s in samples])
                     for k in obs}
            runner = PolicyRunner(policy, kind, tuple(obs), len(samples), exploration_type,
                                  module_device(policy))
            try:
                with runner.context():
                    out = runner(batch)
            except PolicyOutputError:
                raise
            except Exception as exc:
                raise PolicyOutputError(
                    f"the policy raised on a batch of observations {{key: shape, dtype}} = "
                    f"{ {k: (v.shape, v.dtype.name) for k, v in batch.items()} }: {exc!r}"
                ) from exc
            got = out[ACTION_KEY]
            want = (len(samples), *action[0])
            if tuple(got.shape) != want or got.dtype.name != action[1]:
                hint = ""
                if isinstance(act_space, gymnasium.spaces.Discrete):
                    hint = (" Discrete actions are int64 indices: end the policy with an argmax "
                            "(e.g. collectors.policies.ArgmaxLayer) for logits.")
                raise PolicyOutputError(
                    f"policy output 'action' does not fit the action space {act_space}: expected "
                    f"shape {want[1:]} per env (dtype {action[1]}), got shape "
                    f"{tuple(got.shape[1:])} (dtype {got.dtype.name}) for a batch of "
                    f"{len(samples)} envs.{hint}"
                )
            for key, value in out.items():
                if key != ACTION_KEY:
                    outputs[key] = (tuple(value.shape[1:]), value.dtype.name)
        return {"obs": obs, "obs_is_dict": is_dict, "outputs": outputs}, kind
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001
            pass
