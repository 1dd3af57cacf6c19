"""The one rollout loop: step ``num_envs`` gymnasium envs for ``T`` steps into preallocated arrays.

A batch is a flat dict ``{key: ndarray[num_envs, T, ...]}`` whose keys are TorchRL's
(``"observation"``, ``("next", "reward")``, ``("collector", "traj_ids")``, ...). The trainer side
turns it into a TensorDict once per batch. Episode boundaries are handled here and only here:
after a terminal or truncated step the env is reset by us, so ``("next", obs)`` is always the
real final observation and the next frame starts the new episode with a new trajectory id.
"""
from __future__ import annotations

import time
import traceback

import numpy as np

from actors.errors import EnvRestartsExhausted, EnvSpecError, EnvStepError, PolicyError
from actors.options import CollectorOptions
from actors.stepping.policy_runner import ACTION_KEY, PolicyRunner
from actors.coordination.restarts import RestartBudget
from actors.stepping.batch_layout import (COLLECTOR, ENV_TIME_EVERY_MASK, NEXT, account_returns,
                                          allocate, check_finite, check_policy_output,
                                          derive_seed)
from actors.stepping.spaces import split_observation

class Rollout:
    """Owns the envs, the policy runner and the storage of one worker.

    ``spec`` is ``{"obs": {key: (shape, dtype)}, "obs_is_dict": bool,
    "outputs": {key: (shape, dtype)}}`` where ``outputs`` holds ``"action"`` and any extra
    policy outputs. Trajectory ids are ``counter * id_stride + id_offset`` so that ids of
    different workers never collide and each worker's ids increase.
    """

    def __init__(self, env_fns, policy, policy_kind: str, spec: dict, steps: int,
                 options: CollectorOptions | None = None, *, slot_offset: int = 0,
                 id_stride: int = 1, id_offset: int = 0, id_counter: int = 0):
        options = options or CollectorOptions(frames_per_batch=steps * len(env_fns))
        self.options = options
        self.env_fns = list(env_fns)
        self.num_envs = len(self.env_fns)
        self.steps = int(steps)
        self.spec = spec
        self.obs_keys = tuple(spec["obs"])
        self.obs_is_dict = bool(spec["obs_is_dict"])
        self.max_frames_per_traj = options.max_frames_per_traj
        self.check_finite = options.check_finite
        self.check_obs_space = options.check_obs_space
        self.drop_bad_episodes = options.check_finite == "drop_episode"
        self.dropped_frames = 0  # frames of dropped episodes in the last batch
        self.on_env_error = options.on_worker_error
        self.budget = RestartBudget(options.max_restarts, options.restart_window_s,
                                    options.restart_backoff_s)
        self.env_errors: list[dict] = []  # reported and cleared by the worker each batch
        self.stop_requested = False  # set from another thread to cut the batch short
        self.last_valid_steps = steps
        self.seed = options.seed
        self.static_seed = False  # set_seed(static_seed=True): every env gets the same seed
        self.slot_offset = slot_offset
        self.id_stride = id_stride
        self.id_offset = id_offset
        self.id_counter = id_counter
        self.policy_version = 0
        self.env_restarts = [0] * self.num_envs
        self.envs = [None] * self.num_envs
        self.runner = PolicyRunner(policy, policy_kind, self.obs_keys, self.num_envs,
                                   options.exploration_type, options.policy_device)
        # per-env state carried across batches
        self._obs = {k: [np.zeros(s, d)] * self.num_envs for k, (s, d) in spec["obs"].items()}
        self._traj = np.zeros(self.num_envs, np.int64)  # trajectory id of each env's episode
        self._step_count = np.zeros(self.num_envs, np.int64)  # steps into it (max_frames_per_traj)
        self._returns = np.zeros(self.num_envs, np.float64)  # its return up to this batch
        self._needs_reset = [True] * self.num_envs
        self._next_seed = [self._seed_for(i, 0) for i in range(self.num_envs)]
        self.buffers = allocate(spec, self.num_envs, self.steps, bool(self.max_frames_per_traj))
        # step t's observations go straight into the batch: views [num_envs, ...] made once
        self._obs_rows = {k: [self.buffers[k][:, t] for t in range(self.steps)] for k in self.obs_keys}
        self.episode_returns: list[float] = []
        self.last_env_time = 0.0
        for i in range(self.num_envs):
            self._make_env(i)

    # -- envs ----------------------------------------------------------------------------
    def _make_env(self, i: int) -> None:
        env = self.env_fns[i]()
        self.envs[i] = env
        seed = self._next_seed[i]
        if seed is not None:
            env.action_space.seed(seed)

    def _new_traj_id(self) -> int:
        tid = self.id_counter * self.id_stride + self.id_offset
        self.id_counter += 1
        return tid

    def _reset_env(self, i: int) -> None:
        seed, self._next_seed[i] = self._next_seed[i], None
        try:
            obs, _ = self.envs[i].reset(seed=seed)
        except Exception as exc:  # noqa: BLE001 - reported with context
            raise EnvStepError(i, self._seed_of(i), "reset", exc) from exc  # the env's seed
        obs = split_observation(obs, self.obs_keys, self.obs_is_dict)
        for k in self.obs_keys:  # checked here as after each step: the batch row must fit
            if getattr(obs[k], "shape", ()) != tuple(self.spec["obs"][k][0]):
                self._bad_obs(i, k, obs[k])
            self._obs[k][i] = obs[k]
        self._traj[i] = self._new_traj_id()
        self._step_count[i] = 0
        self._returns[i] = 0.0
        self._needs_reset[i] = False

    def _seed_for(self, i: int, restarts: int) -> int | None:
        if self.static_seed and self.seed is not None:
            return int(self.seed) + 1_000_003 * restarts
        return derive_seed(self.seed, self.slot_offset + i, restarts)

    def set_seed(self, seed: int | None, static_seed: bool = False) -> None:
        """Reseed every env (``seed + slot``, or ``seed`` for all with ``static_seed``) and the
        policy RNG; every env starts a new episode from it at the next step."""
        self.seed = seed
        self.static_seed = bool(static_seed)
        for i in range(self.num_envs):
            self._next_seed[i] = self._seed_for(i, self.env_restarts[i])
            if self._next_seed[i] is not None:
                self.envs[i].action_space.seed(self._next_seed[i])
            self._needs_reset[i] = True
        if seed is not None and self.runner.kind != "random":
            self.runner.torch.manual_seed(int(seed) + self.slot_offset)

    def reset(self, env_indices=None) -> None:
        """Start a fresh episode (and trajectory id) at the next step, in every env or in those
        of ``env_indices``."""
        for i in range(self.num_envs) if env_indices is None else env_indices:
            if not 0 <= int(i) < self.num_envs:
                raise IndexError(f"env index {i} is out of range for {self.num_envs} envs.")
            self._needs_reset[int(i)] = True

    def rebuild_env(self, i: int) -> int | None:
        """Replace a failed env with a new one seeded from (base seed, slot, restart count)."""
        self.env_restarts[i] += 1
        try:
            self.envs[i].close()
        except Exception:  # noqa: BLE001 - the env is already broken
            pass
        self._next_seed[i] = self._seed_for(i, self.env_restarts[i])
        self._make_env(i)
        self._needs_reset[i] = True
        return self._next_seed[i]

    def close(self) -> None:
        """Close every env (all of them, even if one raises); then raise the first error."""
        errors = []
        for i, env in enumerate(self.envs):
            if env is not None:
                self.envs[i] = None
                try:
                    env.close()
                except Exception as exc:  # noqa: BLE001 - raised below, after the others
                    errors.append(EnvStepError(i, self._seed_of(i), "close", exc))
        if errors:
            raise errors[0]

    def fake_arrays(self) -> dict:
        """Zeros laid out as :meth:`collect`'s result (keys, shapes, dtypes); steps nothing."""
        return {k: np.zeros_like(v) for k, v in self.buffers.items()}

    # -- the loop ------------------------------------------------------------------------
    def collect(self, random_actions: bool = False) -> dict:
        """Step every env ``steps`` times and return the filled buffers (reused next call).

        The hot loop only appends references to Python lists; arrays are written once per
        batch. ``("next", obs)`` equals the following frame's observation except at episode
        ends (and the last step), whose real final observations are kept aside.
        """
        envs, n, steps = self.envs, self.num_envs, self.steps
        keys, is_dict, key0 = self.obs_keys, self.obs_is_dict, self.obs_keys[0]
        single = len(keys) == 1  # one observation array per env: no per-step dicts
        cur, step_count = self._obs, self._step_count
        cur0 = cur[key0]
        out_keys = tuple(self.spec["outputs"])
        max_steps = self.max_frames_per_traj or 0
        random_actions = random_actions or self.runner.kind == "random"
        runner = self.runner
        act, on_array = runner.prepare()
        shapes = {k: tuple(s) for k, (s, _) in self.spec["obs"].items()}
        shape0 = shapes[key0]
        act_shape, act_dtype = self.spec["outputs"][ACTION_KEY]
        int_action = act_shape == () and np.dtype(act_dtype).kind == "i"
        for i in range(n):
            if self._needs_reset[i]:
                self._safe_reset(i)
        rows = self._obs_rows  # rows[k][t]: where step t's observations are written
        rows0 = rows[key0]
        out_steps = {k: [] for k in out_keys}
        actions = out_steps[ACTION_KEY]
        extra_outs = tuple((k, v) for k, v in out_steps.items() if k != ACTION_KEY)
        finals = []  # (t, i, final observation) at episode ends
        new_ids = []  # (t, i, trajectory id from step t + 1) at those ends
        traj_start = self._traj.copy()  # each env's trajectory id at the batch start
        returns = self._returns.copy()  # running returns at the batch start, after those resets
        rewards, terms, truncs, counts = [], [], [], []
        checking = self.check_obs_space or self.drop_bad_episodes
        ep_start = [0] * n  # step of this batch where each env's current episode began
        drops: list = []
        valid = steps
        t_env = 0.0
        perf = time.perf_counter
        with runner.context():
            for t in range(steps):
                if self.stop_requested and t:  # a cut batch keeps at least one step
                    valid = t
                    break
                if single:  # written into the batch, then given to the policy from there
                    x = rows0[t]
                    if n == 1:
                        x[0] = cur0[0]
                    else:
                        x[:] = cur0
                    obs_t = None if on_array else {key0: x}
                else:
                    obs_t = {k: rows[k][t] for k in keys}
                    for k in keys:
                        obs_t[k][:] = cur[k]
                    x = obs_t[key0]
                if max_steps:
                    counts.append(step_count.copy())
                    step_count += 1
                    hit = step_count >= max_steps
                if random_actions:
                    action = np.stack([np.asarray(env.action_space.sample()) for env in envs])
                    actions.append(action)
                else:
                    try:
                        out = act(x) if on_array else act(obs_t)
                    except Exception as exc:  # noqa: BLE001
                        raise PolicyError(
                            "the policy raised inside the env worker:\n"
                            + "".join(traceback.format_exception(exc))
                        ) from exc
                    if on_array:  # a module: its output is the action
                        action = out
                    else:
                        action = out[ACTION_KEY]
                        for key, values in extra_outs:
                            values.append(out[key])
                    if t == 0:  # once per batch: a wrong output is the policy's error
                        check_policy_output({ACTION_KEY: action} if on_array else out, self.spec,
                                            n, type(runner.policy).__name__, self.check_finite)
                    actions.append(action)
                if int_action:  # Python ints: gymnasium's Discrete checks them fastest
                    action = action.tolist()
                timed = not t & ENV_TIME_EVERY_MASK  # a clock read costs ~0.5 us here: sample
                if timed:
                    t0 = perf()
                for i in range(n):
                    try:
                        o, r, term, trunc, _ = envs[i].step(action[i])
                    except Exception as exc:  # noqa: BLE001
                        # cut the episode: a truncated frame ending where the env last was
                        self._env_failed(i, EnvStepError(i, self._seed_of(i), "step", exc))
                        o = {k: cur[k][i] for k in keys} if is_dict else cur0[i]
                        r, term, trunc = 0.0, False, True
                    if is_dict:
                        for k in keys:
                            if getattr(o[k], "shape", ()) != shapes[k]:
                                self._bad_obs(i, k, o[k])
                    elif getattr(o, "shape", ()) != shape0:
                        self._bad_obs(i, key0, o)
                    if checking and self._bad_output(i, o, r):
                        drops.append((i, ep_start[i], t))  # blank this episode's frames
                        r, term, trunc = 0.0, False, True
                        o = {k: cur[k][i] for k in keys} if is_dict else cur0[i]
                    if max_steps and hit[i] and not term:
                        trunc = True
                    rewards.append(r)
                    terms.append(term)
                    truncs.append(trunc)
                    if term or trunc:
                        ep_start[i] = t + 1
                        finals.append((t, i, {k: np.array(o[k]) for k in keys} if is_dict
                                       else {key0: np.array(o)}))
                        self._safe_reset(i)
                        new_ids.append((t, i, self._traj[i]))
                    elif is_dict:
                        for k in keys:
                            cur[k][i] = o[k]
                    else:
                        cur0[i] = o
                if timed:
                    t_env += perf() - t0
        self.last_valid_steps = valid
        sampled = -(-valid // (ENV_TIME_EVERY_MASK + 1))  # steps whose env calls were timed
        self.last_env_time = t_env * valid / sampled if sampled else 0.0
        self._account_returns(returns, rewards, [(t, i) for t, i, _ in finals], valid)
        trajs = np.repeat(traj_start[:, None], valid, axis=1)  # [E, T]: ids change at ends only
        for t, i, tid in new_ids:
            trajs[i, t + 1:] = tid
        buf = self._write(valid, out_steps, finals, rewards, terms, truncs, trajs,
                          counts, random_actions)
        self.dropped_frames = 0
        for i, start, end in drops:  # malformed episodes: blanked, traj id -1, counted
            for value in buf.values():
                value[i, start:end + 1] = 0
            buf[(COLLECTOR, "traj_ids")][i, start:end + 1] = -1
            self.dropped_frames += end + 1 - start
        return buf

    def _account_returns(self, start: np.ndarray, rewards: list, ends: list, valid: int) -> None:
        if valid:
            done, self._returns = account_returns(
                start, np.array(rewards, np.float64).reshape(valid, self.num_envs), ends)
            self.episode_returns += done

    def _write(self, valid, out_steps, finals, rewards, terms, truncs, trajs, counts,
               random_actions) -> dict:
        """Copy one batch of per-step lists into the preallocated ``[E, T, ...]`` buffers."""
        buf, n, v = self.buffers, self.num_envs, valid
        if v:
            for k in self.obs_keys:
                obs, nxt = buf[k], buf[(NEXT, k)]  # obs[:, :v] was written step by step
                nxt[:, : v - 1] = obs[:, 1:v]
                nxt[:, v - 1] = np.stack(self._obs[k])  # next obs of the last step (non-ended envs)
            for t, i, final in finals:
                for k, value in final.items():
                    buf[(NEXT, k)][i, t] = value
            for key in self.spec["outputs"]:
                if out_steps[key]:
                    buf[key][:, :v] = np.stack(out_steps[key], axis=1)
                elif random_actions:
                    buf[key][:, :v] = 0  # policy outputs are zero-filled for random steps
            shape = (v, n)
            term = np.array(terms, bool).reshape(shape).T
            trunc = np.array(truncs, bool).reshape(shape).T
            buf[(NEXT, "reward")][:, :v, 0] = np.array(rewards, np.float32).reshape(shape).T
            buf[(NEXT, "terminated")][:, :v, 0] = term
            buf[(NEXT, "truncated")][:, :v, 0] = trunc
            buf[(NEXT, "done")][:, :v, 0] = term | trunc
            buf[(COLLECTOR, "traj_ids")][:, :v] = trajs
            buf[(COLLECTOR, "policy_version")][:, :v] = self.policy_version
            if self.max_frames_per_traj:
                sc = np.stack(counts, axis=1)
                buf["step_count"][:, :v, 0] = sc
                buf[(NEXT, "step_count")][:, :v, 0] = sc + 1
        if v < self.steps:  # preempted: blank the rest, traj id -1 marks unfilled frames
            for value in buf.values():
                value[:, v:] = 0
            buf[(COLLECTOR, "traj_ids")][:, v:] = -1
        if self.check_finite == "raise":
            check_finite(buf)
        return buf

    def _bad_output(self, i: int, obs, reward) -> bool:
        """Per-step checks that are on only when asked for; True means drop the episode."""
        if self.check_obs_space:
            space = self.envs[i].observation_space
            if not space.contains(obs):
                raise EnvSpecError(
                    f"env {i} (worker slot {self.slot_offset + i}) returned an observation "
                    f"outside its space: expected a member of {space}, got {obs!r}.")
        if self.drop_bad_episodes:
            values = obs.values() if isinstance(obs, dict) else (obs,)
            if not np.isfinite(reward) or any(
                    np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all() for v in values):
                self.env_errors.append({"env": i, "seed": self._seed_of(i), "phase": "output",
                                        "error": "non-finite observation or reward; episode dropped",
                                        "traceback": ""})
                return True
        return False

    def _bad_obs(self, i: int, key: str, value) -> None:
        shape, dtype = self.spec["obs"][key]
        got = np.asarray(value)
        raise EnvSpecError(
            f"env {i} (worker slot {self.slot_offset + i}) returned observation {key!r} with "
            f"shape {got.shape} and dtype {got.dtype}; its observation space says shape "
            f"{tuple(shape)} and dtype {dtype}. Fix the env or its observation_space.")

    def _env_failed(self, i: int, err: EnvStepError) -> None:
        """Record a failed env, enforce the restart budget, and rebuild it (with backoff)."""
        if self.on_env_error == "raise":
            raise err
        self.env_errors.append(
            {"env": i, "seed": err.seed, "phase": err.phase, "error": str(err), "traceback": err.tb}
        )
        wait = self.budget.failed()
        if wait is None:
            raise EnvRestartsExhausted(
                f"env {i} failed {self.budget.recent()} times within {self.budget.window_s:g}s "
                f"(max_restarts={self.budget.max_restarts}); last error in {err.phase} with seed "
                f"{err.seed}:\n{err.tb}"
            ) from err.__cause__
        if wait:
            time.sleep(wait)
        try:
            self.rebuild_env(i)
        except Exception as exc:  # noqa: BLE001
            self._env_failed(i, EnvStepError(i, self._seed_of(i), "init", exc))

    def _safe_reset(self, i: int) -> None:
        while True:
            try:
                self._reset_env(i)
                return
            except EnvStepError as err:
                self._env_failed(i, err)

    def _seed_of(self, i: int):
        return self._seed_for(i, self.env_restarts[i])
