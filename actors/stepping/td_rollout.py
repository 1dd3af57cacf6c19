"""The rollout loop for TorchRL envs (``EnvBase``, transforms included), inside the env actor.

TorchRL envs speak TensorDicts, so this loop carries one TensorDict from step to step as
TorchRL's ``Collector`` does: the policy reads the carrier (observations, done flags,
``is_init``, ``step_count``, recurrent states from primers...) and writes its outputs into it,
``env.step_and_maybe_reset`` fills ``"next"`` and resets finished envs, and the step's snapshot
is kept. A batch is the time-stack of the snapshots, handed on as the same flat
``{key: ndarray[num_envs, T, ...]}`` dict as the gymnasium loop (:mod:`actors.stepping.rollout`), so
everything downstream (assembly, buffers, accounting) is shared. ``num_envs > 1`` steps a
``SerialEnv`` of the factory, like TorchRL's ``Collector`` over ``SerialEnv(N, fn)``.
"""
from __future__ import annotations

import math
import time
import traceback

import numpy as np

from actors.errors import EnvRestartsExhausted, EnvStepError, PolicyError
from actors.options import CollectorOptions
from actors.stepping.policy_runner import PolicyRunner
from actors.stepping.td_policy import prepare_td_policy
from actors.coordination.restarts import RestartBudget
from actors.stepping.env_building import ragged_entries, with_policy_transforms, with_step_counter

TRAJ_KEY = ("collector", "traj_ids")
VERSION_KEY = ("collector", "policy_version")


LAZY_KEY = "_lazy"  # a ragged batch itself (a lazy stack), in a 0-d object array


class TensorDictRollout:
    """Owns one (possibly serial-batched) TorchRL env and the policy of one worker."""

    def __init__(self, env_fn, policy, policy_kind: str, steps: int,
                 options: CollectorOptions | None = None, *, slot_offset: int = 0,
                 id_stride: int = 1, id_offset: int = 0, id_counter: int = 0):
        import torch

        options = options or CollectorOptions(frames_per_batch=steps)
        self.torch = torch
        self.options = options
        self.env_fn = env_fn
        self.num_envs = options.num_envs  # envs stepped here (a batched env's batch size)
        self.batched = False
        self.steps = int(steps)
        self.seed = options.seed
        self.static_seed = False
        self.slot_offset = slot_offset
        self.id_stride, self.id_offset, self.id_counter = id_stride, id_offset, id_counter
        self.policy_version = 0
        self.episode_returns: list[float] = []
        self.env_errors: list[dict] = []
        self.stop_requested = False
        self.last_valid_steps = steps
        self.last_env_time = 0.0
        self.dropped_frames = 0
        self.env_restarts = 0
        self.on_env_error = options.on_worker_error
        self.budget = RestartBudget(options.max_restarts, options.restart_window_s,
                                    options.restart_backoff_s)
        self.runner = PolicyRunner(policy, policy_kind, (), self.num_envs,
                                   options.exploration_type, options.policy_device)
        self._raw_policy = policy  # (its transforms go on every env built)
        self.env = None
        self.carrier = None
        self.traj_ids = None  # [E]: the trajectory id of each env's ongoing episode
        self.returns = [0.0] * self.num_envs  # each env's return so far in that episode
        self._build()
        self.policy = prepare_td_policy(policy, policy_kind, self.env)
        # the policy's other outputs, zero-filled while actions are random (as TorchRL), so
        # every batch has one key set
        self._zero_outputs = self._output_template() if options.init_random_frames > 0 else None

    # -- env ---------------------------------------------------------------------------------
    def _build(self, fresh_ids: bool = True) -> None:
        if self.options.num_envs == 1:
            env = self.env_fn()
        else:
            from torchrl.envs import SerialEnv

            env = SerialEnv(self.options.num_envs, self.env_fn)
        if self.options.max_frames_per_traj:  # as TorchRL: a StepCounter truncates episodes
            env = with_step_counter(env, self.options.max_frames_per_traj)
        if self.options.auto_register_policy_transforms:
            env = with_policy_transforms(env, self._raw_policy)
        shape = tuple(env.batch_size)
        if self.options.num_envs > 1 and shape != (self.options.num_envs,):
            if not env.is_closed:
                env.close()
            raise EnvStepError(0, self.seed, "init", ValueError(
                f"the TorchRL env has batch_size {shape}; with num_envs="
                f"{self.options.num_envs} give a factory of a single env (batch_size [])"))
        self._set_devices(env)
        self.batched = len(shape) >= 1  # the env's own batch dims are the env dimension
        self.ragged = bool(ragged_entries(env))  # batches go as lazy stacks, not arrays
        # [2, 3] envs are stepped as 6 rows, reshaped by the trainer (a lazy stack keeps its dims)
        self.flat = len(shape) > 1 and not self.ragged
        self.num_envs = math.prod(shape)
        self.env = env
        seed = self._seed()
        if seed is not None:
            env.set_seed(seed, static_seed=self.static_seed)
        self._reset_all(fresh_ids)

    def _set_devices(self, env) -> None:
        """TorchRL's device rules: the policy's input is moved to ``policy_device`` when the
        env's device differs, the env's input back to the env's device, and the carrier has
        no device when the two differ (or the env has none)."""
        policy_dev = self.options.policy_device
        env_dev = None if env.device is None else str(env.device)
        differ = policy_dev != env_dev
        self._carrier_device_free = differ or env_dev is None
        self._policy_input_cpu = differ and policy_dev == "cpu"  # (CUDA: the runner's device)
        self._env_input_device = env.device if differ else None
        self._env_cpu = env_dev == "cpu"

    def _to_env_device(self, carrier):
        """The carrier on the env's device; a CPU carrier of a CPU env is relabelled in place
        (no copy, ~20 us a step): the env's ``step`` would copy a device-less one."""
        if self._env_cpu and all(v.device.type == "cpu" for v in carrier.values(True, True)):
            return carrier._set_device(self._env_input_device)
        return carrier.to(self._env_input_device)

    def _seed(self) -> int | None:
        if self.seed is None:
            return None
        base = int(self.seed) + (0 if self.static_seed else self.slot_offset)
        return base + 1_000_003 * self.env_restarts

    def _new_ids(self, count: int):
        ids = [(self.id_counter + k) * self.id_stride + self.id_offset for k in range(count)]
        self.id_counter += count
        return self.torch.tensor(ids, dtype=self.torch.int64)

    def _reset_all(self, fresh_ids: bool = True) -> None:
        """Reset every env; their next frames start new trajectories (new ids unless the
        batch in progress marks the cut itself, see ``_env_failed``)."""
        self.carrier = self.env.reset()
        if self._carrier_device_free:
            self.carrier.clear_device_()
        if fresh_ids or self.traj_ids is None:
            self.traj_ids = self._new_ids(self.num_envs)
            self.returns = [0.0] * self.num_envs

    def _output_template(self):
        """Zeros shaped like what the policy adds to the carrier besides the action (``None``
        when it adds nothing): the policy is run once on a copy of the first carrier."""
        if self.runner.kind == "random":
            return None
        carrier = self.carrier.clone()
        before = set(carrier.keys(True, True))
        with self.runner.context():
            out = self.policy(carrier if self.runner.device is None else carrier.to(self.runner.device))
        out = (carrier if out is None else out).cpu()
        action_keys = set(self.env.action_keys)
        added = [k for k in out.keys(True, True) if k not in before and k not in action_keys
                 and isinstance(out.get(k), self.torch.Tensor)]
        return out.select(*added).apply(self.torch.zeros_like) if added else None

    def set_seed(self, seed, static_seed: bool = False) -> None:
        self.seed, self.static_seed = seed, bool(static_seed)
        if seed is not None:
            self.env.set_seed(self._seed(), static_seed=self.static_seed)
            if self.runner.kind != "random":
                self.torch.manual_seed(int(seed) + self.slot_offset)
        self._reset_all()

    def reset(self, env_indices=None) -> None:
        """Fresh episodes (and trajectory ids) in every env, or in those of ``env_indices``."""
        if env_indices is None or not self.batched:
            self._reset_all()
            return
        mask = self.torch.zeros(self.num_envs, dtype=self.torch.bool)
        for i in env_indices:
            if not 0 <= int(i) < self.num_envs:
                raise IndexError(f"env index {i} is out of range for {self.num_envs} envs.")
            mask[int(i)] = True
        request = self.carrier.empty()
        request.set("_reset", mask.reshape(*self.env.batch_size, 1))
        fresh = self.env.reset(request)
        self.traj_ids[mask] = self._new_ids(int(mask.sum()))
        self.carrier.update(fresh.exclude(*[k for k in fresh.keys() if k.startswith("_")]))
        for i in mask.nonzero().flatten().tolist():
            self.returns[i] = 0.0

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None and not env.is_closed:
            try:
                env.close()
            except Exception as exc:  # noqa: BLE001 - reported to shutdown(raise_on_error)
                raise EnvStepError(0, self._seed(), "close", exc) from exc

    # -- the loop ----------------------------------------------------------------------------
    def collect(self, random_actions: bool = False) -> dict:
        """Step ``steps`` times; returns ``{key: ndarray[num_envs, T, ...]}`` (TorchRL's keys).

        The per-step work is the policy, the env step and keeping the step's TensorDict; the
        bookkeeping (trajectory ids, episode returns, policy version, private keys) is done once
        per batch on the stacked result, vectorized over envs and steps.
        """
        random_actions = random_actions or self.runner.kind == "random"
        frames, t_env = [], 0.0
        env, policy, clock = self.env, self.policy, time.perf_counter
        device = self.runner.device  # None: the policy runs on the env's (CPU) data
        with self.runner.context():
            while len(frames) < self.steps:  # a failed step adds no frame: the batch stays full
                if self.stop_requested and frames:  # a cut batch keeps at least one step
                    break
                carrier = self.carrier
                if random_actions:
                    env.rand_action(carrier)
                    if self._zero_outputs is not None:
                        carrier.update(self._zero_outputs.clone())
                else:
                    try:
                        if device is None and self._policy_input_cpu:
                            moved = carrier.to("cpu")
                            out = policy(moved)
                            out = moved if out is None else out
                        elif device is None:
                            out = policy(carrier)
                        else:  # the policy's device and back: the env keeps its CPU data
                            moved = carrier.to(device)
                            out = policy(moved)
                            out = (moved if out is None else out).cpu()
                    except Exception as exc:  # noqa: BLE001
                        raise PolicyError("the policy raised inside the env worker:\n"
                                          + "".join(traceback.format_exception(exc))) from exc
                    if out is not None and out is not carrier:
                        carrier.update(out)
                t0 = clock()
                try:
                    if self._env_input_device is not None:
                        carrier = self._to_env_device(carrier)
                    step, self.carrier = env.step_and_maybe_reset(carrier)
                    if self._carrier_device_free:
                        self.carrier.clear_device_()
                except Exception as exc:  # noqa: BLE001 - the episode is cut, the env rebuilt
                    t_env += clock() - t0
                    self._env_failed(exc, frames)
                    env = self.env
                    continue
                t_env += clock() - t0
                frames.append(step.reshape(-1) if self.flat else step)
        self.last_valid_steps = len(frames)
        self.last_env_time = t_env
        return self._arrays(frames)

    def _stamp(self, done, reward):
        """Trajectory ids ``[E, T]`` and episode returns of a batch, from its done flags.

        A trajectory continues from the previous batch until its env's first done; each done
        starts a new id, handed out in step order then env order (as TorchRL's id pool does).
        """
        torch = self.torch
        done = done.reshape(self.num_envs, -1)
        reward = reward.reshape(self.num_envs, -1).double()
        order = done.T.reshape(-1)  # step-major: the order in which ids are handed out
        count = int(order.sum())
        rank = torch.zeros_like(order, dtype=torch.int64)
        rank[order] = torch.arange(count)
        rank = rank.reshape(done.shape[1], self.num_envs).T  # [E, T]
        first = self.id_counter
        self.id_counter += count
        ids = torch.empty(done.shape, dtype=torch.int64)
        for e in range(self.num_envs):
            ends = done[e].nonzero().flatten().tolist()
            start, current = 0, int(self.traj_ids[e])
            sums = reward[e]
            for t in ends:
                ids[e, start:t + 1] = current
                self.episode_returns.append(float(self.returns[e] + sums[start:t + 1].sum()))
                self.returns[e] = 0.0
                current = (first + int(rank[e, t])) * self.id_stride + self.id_offset
                start = t + 1
            ids[e, start:] = current
            self.returns[e] += float(sums[start:].sum())
            self.traj_ids[e] = current
        return ids

    def _episode_signals(self, batch):
        """``[E, T]`` done flags and rewards: the env's root ``done`` and ``reward`` keys, or
        its first ones (nested, e.g. per agent: any agent done ends the frame's episode, and
        the rewards are summed)."""
        env = self.env
        done_key = "done" if "done" in env.done_keys else env.done_keys[0]
        reward_key = "reward" if "reward" in env.reward_keys else env.reward_keys[0]
        shape = (self.num_envs, batch.batch_size[-1])  # (a ragged batch keeps the env's dims)
        done = batch.get(("next", *((done_key,) if isinstance(done_key, str) else done_key)))
        reward = batch.get(("next", *((reward_key,) if isinstance(reward_key, str) else reward_key)))
        return done.reshape(*shape, -1).any(-1), reward.reshape(*shape, -1).sum(-1)

    def _arrays(self, frames: list) -> dict:
        """Time-stacked frames as ``{key: ndarray[E, T, ...]}``; a preempted batch is padded with
        zeros and traj id -1, as the gymnasium loop does."""
        torch = self.torch
        valid = len(frames)
        if not frames:
            raise EnvStepError(0, self._seed(), "step", RuntimeError("no step of this batch "
                                                                     "succeeded"))
        if valid < self.steps:
            frames = frames + [frames[-1].clone().zero_()] * (self.steps - valid)
        batch = self._stacked(frames)
        ids = torch.full((self.num_envs, self.steps), -1, dtype=torch.int64)  # -1: never filled
        done, reward = self._episode_signals(batch)
        ids[:, :valid] = self._stamp(done[:, :valid], reward[:, :valid])
        batch.set(TRAJ_KEY, ids.reshape(batch.batch_size))
        batch.set(VERSION_KEY, torch.full(batch.batch_size, self.policy_version, dtype=torch.int64))
        return self._ship(batch)

    def _stacked(self, frames: list):
        """``[E, T]`` from T frames, private (``_``) keys left out (a lazy stack where the
        frames' shapes differ)."""
        if self.ragged:
            from tensordict import LazyStackedTensorDict

            batch = LazyStackedTensorDict.maybe_dense_stack(frames, dim=-1)
        else:
            batch = self.torch.stack(frames, dim=-1)
        if not self.batched:
            batch = batch.unsqueeze(0)
        private = [k for k in batch.keys() if isinstance(k, str) and k.startswith("_")]
        return batch.exclude(*private) if private else batch

    def fake_arrays(self) -> dict:
        """Zeros laid out as :meth:`collect`'s result, from the env's specs and the policy's
        output template; steps nothing."""
        frame = self.env.fake_tensordict()
        frame = frame.reshape(-1) if self.flat else frame
        outputs = self._zero_outputs if self._zero_outputs is not None else self._output_template()
        if outputs is not None:
            frame.update(outputs.clone())
        batch = self._stacked([frame] * self.steps).apply(self.torch.zeros_like)
        zeros = self.torch.zeros(batch.batch_size, dtype=self.torch.int64)
        batch.set(TRAJ_KEY, zeros)
        batch.set(VERSION_KEY, zeros.clone())
        return self._ship(batch)

    def _ship(self, batch) -> dict:
        """The batch as it leaves the actor: ``{key: ndarray}``, or for a ragged env the lazy
        stack itself under ``LAZY_KEY`` (with its ids as arrays, for the bookkeeping)."""
        if not self.ragged:
            return self._numpy(batch)
        holder = np.empty((), dtype=object)
        holder[()] = batch
        rows = (self.num_envs, batch.batch_size[-1])  # (the batch keeps the env's own dims)
        return {TRAJ_KEY: batch.get(TRAJ_KEY).reshape(rows).numpy(),
                VERSION_KEY: batch.get(VERSION_KEY).reshape(rows).numpy(), LAZY_KEY: holder}

    def _numpy(self, batch) -> dict:
        """``{key: ndarray}``; non-tensor entries as object arrays."""
        torch = self.torch
        from tensordict.base import _is_leaf_nontensor  # non-tensor entries are leaves too

        out = {}
        for key, value in batch.items(include_nested=True, leaves_only=True,
                                      is_leaf=_is_leaf_nontensor):
            if isinstance(value, torch.Tensor):
                out[key] = value.detach().cpu().numpy()
            elif hasattr(value, "tolist"):  # NonTensorData / NonTensorStack: [E, T] objects
                objects = np.empty(tuple(batch.batch_size), dtype=object)
                for index in np.ndindex(objects.shape):
                    objects[index] = value[index].data if hasattr(value[index], "data") \
                        else value[index]
                out[key] = objects
        return out

    def _env_failed(self, exc: BaseException, frames: list) -> None:
        """Record the failure, spend the budget, rebuild the env and start new episodes; the
        last stored frame of each env is marked truncated (its episode ends there)."""
        err = EnvStepError(0, self._seed(), "step", exc)
        if self.on_env_error == "raise":
            raise err from exc
        self.env_errors.append({"env": 0, "seed": err.seed, "phase": "step", "error": str(err),
                                "traceback": err.tb})
        wait = self.budget.failed()
        if wait is None:
            raise EnvRestartsExhausted(
                f"the TorchRL env failed {self.budget.recent()} times within "
                f"{self.budget.window_s:g}s (max_restarts={self.budget.max_restarts}); last "
                f"error:\n{err.tb}") from exc
        if frames:  # the cut: the last stored frame ends every env's episode (new ids follow)
            for key in (("next", "truncated"), ("next", "done")):
                flag = frames[-1].get(key, None)
                if flag is not None:
                    flag.fill_(True)
        if wait:
            time.sleep(wait)
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass
        self.env_restarts += 1
        self._build(fresh_ids=not frames)
