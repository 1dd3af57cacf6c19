"""The rollout loop for envs with a native vectorized implementation.

Gymnasium registers some ids with a ``vector_entry_point`` (CartPole's ``CartPoleVectorEnv``):
``gymnasium.make_vec(id, N, vectorization_mode="vector_entry_point")`` steps all ``N`` envs in
one numpy call. This loop drives such an env: every step is one policy call and one env call on
``[N, ...]`` arrays, and the bookkeeping (returns, trajectory ids, episode ends) is numpy over
the envs, never a Python loop per env.

Such envs reset a finished env at its *next* step (gymnasium's ``NEXT_STEP`` autoreset): that
step returns the reset observation with reward 0 and is not a transition. It is left out, so an
env that finished falls one step behind the others; a batch still holds exactly ``T``
consecutive frames per env, and the frames an env collected beyond ``T`` wait for the next batch
(``carry``). The batch layout and keys are the gymnasium loop's (:mod:`actors.stepping.rollout`).

Example:
    >>> from actors.options import CollectorOptions
    >>> spec = {"obs": {"observation": ((4,), "float32")}, "obs_is_dict": False,
    ...         "outputs": {"action": ((), "int64")}}
    >>> r = VectorRollout("CartPole-v1", None, None, "random", spec, 10,
    ...                   CollectorOptions(frames_per_batch=40, num_envs=4, seed=0))
    >>> r.collect()["observation"].shape
    (4, 10, 4)
    >>> r.close()
"""
from __future__ import annotations

import time
import traceback

import numpy as np

from actors.errors import EnvRestartsExhausted, EnvSpecError, EnvStepError, PolicyError
from actors.options import CollectorOptions
from actors.stepping.policy_runner import ACTION_KEY, PolicyRunner
from actors.coordination.restarts import RestartBudget
from actors.stepping.batch_layout import (COLLECTOR, NEXT, account_returns, allocate,
                                          check_finite, check_policy_output, derive_seed)


# From this many envs per actor, the native vector env is what ``native_vector=None`` picks: it
# steps CartPole faster than one env object per env from 16 envs on (2-core machine, batched
# MLP, frames/s in-process: 8 envs 55,600 vs 68,000; 16: 107,900 vs 84,600; 128: 471,000 vs
# 107,000). Below that, the numpy overhead per call and the skipped autoreset steps cost more.
AUTO_MIN_ENVS = 16


def registered_id(env_id: str) -> str:
    """``"module:EnvId"`` -> ``"EnvId"``, after importing ``module`` (which registers it)."""
    if ":" not in env_id:
        return env_id
    import importlib

    module, _, name = env_id.partition(":")
    importlib.import_module(module)
    return name


def native_vector_problem(create_env_fn, options: CollectorOptions) -> str | None:
    """Why ``create_env_fn`` cannot run as a native vector env here (``None``: it can)."""
    if not isinstance(create_env_fn, str):
        return "the env is not given as a gymnasium id"
    import gymnasium

    try:
        spec = gymnasium.spec(registered_id(create_env_fn))
    except Exception as exc:  # noqa: BLE001 - not an id gymnasium knows
        return f"gymnasium has no spec for {create_env_fn!r} ({exc})"
    if not spec.vector_entry_point:
        return f"{create_env_fn!r} has no vector_entry_point in gymnasium's registry"
    if options.num_envs < 2:
        return "num_envs is 1"
    for name, value, plain in (("max_frames_per_traj", options.max_frames_per_traj, None),
                               ("check_obs_space", options.check_obs_space, False)):
        if value != plain:
            return f"{name}={value!r} needs the per-env loop (a native vector env cannot end " \
                   "one env's episode early)"
    if options.check_finite == "drop_episode":
        return "check_finite='drop_episode' needs the per-env loop"
    return None


class VectorRollout:
    """Owns one native vector env of ``num_envs`` envs, the policy runner and the storage."""

    def __init__(self, env_id: str, create_env_kwargs: dict | None, policy, policy_kind: str,
                 spec: dict, steps: int, options: CollectorOptions | None = None, *,
                 slot_offset: int = 0, id_stride: int = 1, id_offset: int = 0, id_counter: int = 0):
        options = options or CollectorOptions(frames_per_batch=steps)
        self.options = options
        self.env_id = env_id
        self.env_kwargs = dict(create_env_kwargs or {})
        self.num_envs = options.num_envs
        self.steps = int(steps)
        self.spec = spec
        self.obs_keys = tuple(spec["obs"])
        self._obs_dtype = np.dtype(spec["obs"][self.obs_keys[0]][1])  # what the policy is given
        if spec["obs_is_dict"]:
            raise EnvSpecError(f"{env_id!r}: dict observations are not supported by the native "
                               "vector loop; pass native_vector=False.")
        self.check_finite = options.check_finite
        self.on_env_error = options.on_worker_error
        self.budget = RestartBudget(options.max_restarts, options.restart_window_s,
                                    options.restart_backoff_s)
        self.env_errors: list[dict] = []  # reported and cleared by the worker each batch
        self.episode_returns: list[float] = []
        self.stop_requested = False
        self.last_valid_steps = self.steps
        self.last_env_time = 0.0
        self.dropped_frames = 0  # always 0 here (no dropped episodes in this loop)
        self.resyncs = 0  # times the envs drifted a batch apart and restarted together
        self.seed = options.seed
        self.slot_offset = slot_offset
        self.id_stride, self.id_offset, self.id_counter = id_stride, id_offset, id_counter
        self.policy_version = 0
        self.env_restarts = 0
        self.env = None
        self.runner = PolicyRunner(policy, policy_kind, self.obs_keys, self.num_envs,
                                   options.exploration_type, options.policy_device)
        self.buffers = allocate(spec, self.num_envs, self.steps, step_count=False)
        self._obs: np.ndarray | None = None  # [E, ...] observations the policy sees next
        self._traj = np.zeros(self.num_envs, np.int64)
        self._returns = np.zeros(self.num_envs, np.float64)
        self._gap = np.zeros(self.num_envs, bool)  # autoresets at its next step (not a frame)
        self._needs_reset = True
        self._seed_next = True  # the next reset seeds the env (after set_seed, a rebuild)
        self._carry: dict | None = None  # per-step arrays of frames beyond the last batch
        self._make_env()

    # -- env -----------------------------------------------------------------------------
    def _make_env(self) -> None:
        import gymnasium

        self.env = gymnasium.make_vec(registered_id(self.env_id), self.num_envs,
                                      vectorization_mode="vector_entry_point", **self.env_kwargs)
        space = self.env.single_observation_space
        shape, dtype = self.spec["obs"][self.obs_keys[0]]
        if tuple(space.shape) != tuple(shape) or np.dtype(space.dtype) != np.dtype(dtype):
            raise EnvSpecError(
                f"{self.env_id!r}'s vector env observes shape {space.shape} dtype {space.dtype}, "
                f"its single env shape {tuple(shape)} dtype {dtype}; pass native_vector=False.")
        seed = self._seed()
        if seed is not None:
            self.env.action_space.seed(seed)
        self._needs_reset = self._seed_next = True

    def _seed(self) -> int | None:
        return derive_seed(self.seed, self.slot_offset, self.env_restarts)

    def _reset(self) -> None:
        seed = self._seed() if self._seed_next else None
        try:
            obs, _ = self.env.reset(seed=seed)
        except Exception as exc:  # noqa: BLE001 - reported with context
            raise EnvStepError(0, seed, "reset", exc) from exc
        self._obs = np.asarray(obs, self._obs_dtype)
        self._traj = self._new_ids(self.num_envs)
        self._gap[:] = False
        self._needs_reset = self._seed_next = False

    def _new_ids(self, count: int) -> np.ndarray:
        ids = (self.id_counter + np.arange(count, dtype=np.int64)) * self.id_stride + self.id_offset
        self.id_counter += count
        return ids

    def set_seed(self, seed: int | None, static_seed: bool = False) -> None:
        """Reseed the vector env with ``seed + slot`` (one generator for all its envs) and the
        policy RNG; all envs start new episodes at the next step."""
        if static_seed:
            raise NotImplementedError(
                "set_seed(static_seed=True) gives every env the same seed, which a native vector "
                "env (one generator for all its envs) cannot do; pass native_vector=False.")
        self.seed = seed
        if seed is not None:
            self.env.action_space.seed(self._seed())
        self._needs_reset = self._seed_next = True
        self._carry, self._returns[:] = None, 0.0  # undelivered frames and episodes dropped
        if seed is not None and self.runner.kind != "random":
            self.runner.torch.manual_seed(int(seed) + self.slot_offset)

    def reset(self, env_indices=None) -> None:
        """New episodes in every env at the next step; a native vector env resets all or none."""
        if env_indices is not None and sorted(int(i) for i in env_indices) != list(range(self.num_envs)):
            raise NotImplementedError(
                f"a native vector env resets all its {self.num_envs} envs at once; got "
                f"env_indices={list(env_indices)}. Pass native_vector=False to reset some.")
        self._needs_reset = True
        self._carry, self._returns[:] = None, 0.0  # undelivered frames and episodes dropped

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            try:
                env.close()
            except Exception as exc:  # noqa: BLE001
                raise EnvStepError(0, self._seed(), "close", exc) from exc

    # -- the loop ------------------------------------------------------------------------
    def fake_arrays(self) -> dict:
        """Zeros laid out as :meth:`collect`'s result (keys, shapes, dtypes); steps nothing."""
        return {k: np.zeros_like(v) for k, v in self.buffers.items()}

    def collect(self, random_actions: bool = False) -> dict:
        """Step the vector env until every env has ``steps`` frames; return the buffers."""
        n, steps, key = self.num_envs, self.steps, self.obs_keys[0]
        random_actions = random_actions or self.runner.kind == "random"
        runner = self.runner
        act, on_array = runner.prepare()
        if self._needs_reset:
            self._safe_reset()
        carry = self._carry
        have = np.zeros(n, np.int64) if carry is None else carry["live"].sum(0)
        rows = {"obs": [], "next": [], "reward": [], "term": [], "trunc": [], "traj": [],
                "version": [], "live": []}
        outs: dict = {k: [] for k in self.spec["outputs"]}
        t_env, first = 0.0, True
        with runner.context():
            any_gap = bool(self._gap.any())
            while have.min() < steps and not (self.stop_requested and not first):
                obs = self._obs
                if random_actions:
                    action = np.asarray(self.env.action_space.sample())
                    outs[ACTION_KEY].append(action)
                else:
                    try:
                        out = {ACTION_KEY: act(obs)} if on_array else act({key: obs})
                    except Exception as exc:  # noqa: BLE001
                        raise PolicyError("the policy raised inside the env worker:\n"
                                          + "".join(traceback.format_exception(exc))) from exc
                    if first:
                        check_policy_output(out, self.spec, n, type(runner.policy).__name__,
                                            self.check_finite)
                    for k in outs:
                        outs[k].append(out[k])
                    action = out[ACTION_KEY]
                first = False
                live = ~self._gap
                t0 = time.perf_counter()
                try:
                    nxt, reward, term, trunc, _ = self.env.step(action)
                except Exception as exc:  # noqa: BLE001 - every env's episode is cut
                    self._env_failed(EnvStepError(0, self._seed(), "step", exc))
                    nxt, reward = obs, np.zeros(n, np.float32)
                    term, trunc = np.zeros(n, bool), np.ones(n, bool)
                    self._needs_reset = True
                t_env += time.perf_counter() - t0
                nxt = np.array(nxt, self._obs_dtype)  # a copy: a vector env may reuse its output
                reward = np.asarray(reward, np.float32) * live  # 0 on autoreset steps
                term, trunc = np.asarray(term, bool) & live, np.asarray(trunc, bool) & live
                rows["obs"].append(obs)
                rows["next"].append(nxt)
                rows["reward"].append(reward)
                rows["term"].append(term)
                rows["trunc"].append(trunc)
                rows["traj"].append(self._traj)
                rows["live"].append(live)
                rows["version"].append(self.policy_version)
                have += live
                done = term | trunc
                if self._needs_reset:  # the env was rebuilt: all envs start over now
                    self._safe_reset()
                    any_gap = False
                    continue
                if any_gap:  # the envs that finished last step returned their reset observation
                    self._traj = self._traj.copy()
                    self._traj[self._gap] = self._new_ids(int(self._gap.sum()))
                self._gap = done
                any_gap = bool(done.any())
                self._obs = nxt
        self.last_env_time = t_env
        return self._write(carry, rows, outs)

    def _write(self, carry: dict | None, rows: dict, outs: dict) -> dict:
        """Frames in per-step rows (carried ones first) -> ``[E, T]`` buffers; an env's frames
        beyond ``T`` become the next batch's carry."""
        n, steps, key = self.num_envs, self.steps, self.obs_keys[0]
        if not rows["live"]:  # stopped before the first step
            data = carry
        else:
            data = {
                key: np.stack(rows["obs"]), (NEXT, key): np.stack(rows["next"]),
                (NEXT, "reward"): np.stack(rows["reward"])[..., None],
                (NEXT, "terminated"): np.stack(rows["term"])[..., None],
                (NEXT, "truncated"): np.stack(rows["trunc"])[..., None],
                (COLLECTOR, "traj_ids"): np.stack(rows["traj"]),
                (COLLECTOR, "policy_version"): np.repeat(
                    np.array(rows["version"], np.int64)[:, None], n, axis=1),
                "live": np.stack(rows["live"]),
            }
            for k, values in outs.items():
                data[k] = np.stack(values) if values else np.zeros(
                    (len(rows["live"]), n, *self.spec["outputs"][k][0]), self.spec["outputs"][k][1])
            if carry is not None:
                data = {k: np.concatenate([carry[k], v]) for k, v in data.items()}
        buf = self.buffers
        live = data["live"] if data is not None else np.zeros((0, n), bool)
        count = live.sum(0)
        valid = int(min(steps, count.min())) if len(live) else 0
        self.last_valid_steps = valid
        rank = np.cumsum(live, axis=0) - 1
        order = np.argsort(~live, axis=0, kind="stable")[:valid]  # each env's first frames
        cols = np.arange(n)[None, :]
        for k, value in (data or {}).items():
            if k == "live":
                continue
            buf[k][:, :valid] = np.swapaxes(value[order, cols], 0, 1)
        left = live & (rank >= valid)
        if valid and int(left.sum(0).max()) > steps:
            # Drift bound: envs that finish fewer episodes run ahead of the others, and their
            # extra frames would pile up. Past one batch of them, every episode is truncated at
            # its last delivered frame, the frames beyond are dropped (never delivered, never
            # counted) and all envs restart together.
            done = buf[(NEXT, "terminated")][:, valid - 1, 0]
            buf[(NEXT, "truncated")][:, valid - 1, 0] |= ~done
            left[:] = False
            self._needs_reset = True
            self.resyncs += 1
        if valid:  # episodes are counted when their last frame is delivered
            done = buf[(NEXT, "terminated")][:, :valid, 0] | buf[(NEXT, "truncated")][:, :valid, 0]
            buf[(NEXT, "done")][:, :valid, 0] = done
            finished, self._returns = account_returns(
                self._returns, buf[(NEXT, "reward")][:, :valid, 0].T, np.argwhere(done.T))
            self.episode_returns += finished
        for k in ("done", "terminated", "truncated"):
            buf[k][:, :valid] = False
        if valid < steps:  # stopped early: blank the rest, traj id -1 marks unfilled frames
            for value in buf.values():
                value[:, valid:] = 0
            buf[(COLLECTOR, "traj_ids")][:, valid:] = -1
        keep = left.any(1)
        self._carry = None if not keep.any() else dict(
            {k: v[keep] for k, v in data.items() if k != "live"}, live=left[keep])
        if self.check_finite == "raise":
            check_finite(buf)
        return buf

    def _env_failed(self, err: EnvStepError) -> None:
        if self.on_env_error == "raise":
            raise err
        self.env_errors.append({"env": "all", "seed": err.seed, "phase": err.phase,
                                "error": str(err), "traceback": err.tb})
        wait = self.budget.failed()
        if wait is None:
            raise EnvRestartsExhausted(
                f"the vector env failed {self.budget.recent()} times within "
                f"{self.budget.window_s:g}s (max_restarts={self.budget.max_restarts}); last error "
                f"in {err.phase} with seed {err.seed}:\n{err.tb}") from err.__cause__
        if wait:
            time.sleep(wait)
        self.env_restarts += 1
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - already broken
            pass
        self._make_env()

    def _safe_reset(self) -> None:
        while True:
            try:
                self._reset()
                return
            except EnvStepError as err:
                self._env_failed(err)
