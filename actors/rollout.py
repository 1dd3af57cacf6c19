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

from actors.policy import ACTION_KEY, PolicyRunner
from actors.spaces import split_observation

NEXT = "next"
COLLECTOR = "collector"


class EnvStepError(RuntimeError):
    """``env.step`` or ``env.reset`` raised; carries which env and its seed."""

    def __init__(self, env_index: int, seed, phase: str, cause: BaseException):
        self.env_index = env_index
        self.seed = seed
        self.phase = phase
        self.tb = "".join(traceback.format_exception(cause))
        super().__init__(f"env {env_index} (seed {seed}) raised in {phase}: {cause!r}")

    def __reduce__(self):
        return (_rebuild_env_error, (self.args[0], self.env_index, self.seed, self.phase, self.tb))


def _rebuild_env_error(message, env_index, seed, phase, tb):
    err = RuntimeError.__new__(EnvStepError)
    RuntimeError.__init__(err, message)
    err.env_index, err.seed, err.phase, err.tb = env_index, seed, phase, tb
    return err


class EnvRestartsExhausted(RuntimeError):
    """An env kept failing: more restarts than allowed within the window."""


class PolicyError(RuntimeError):
    """The user's policy raised inside the worker: a bug to report, not a crash to retry."""


def _derive_seed(base: int | None, slot: int, restarts: int) -> int | None:
    if base is None:
        return None
    return int(base) + slot + 1_000_003 * restarts


class Rollout:
    """Owns the envs, the policy runner and the storage of one worker.

    ``spec`` is ``{"obs": {key: (shape, dtype)}, "obs_is_dict": bool,
    "outputs": {key: (shape, dtype)}}`` where ``outputs`` holds ``"action"`` and any extra
    policy outputs. Trajectory ids are ``counter * id_stride + id_offset`` so that ids of
    different workers never collide and each worker's ids increase.
    """

    def __init__(self, env_fns, policy, policy_kind: str, spec: dict, steps: int, *,
                 seed: int | None = None, slot_offset: int = 0, id_stride: int = 1,
                 id_offset: int = 0, id_counter: int = 0, max_frames_per_traj: int | None = None,
                 check_finite: bool = False, on_env_error: str = "restart",
                 max_env_restarts: int = 3, restart_window_s: float = 60.0,
                 restart_backoff_s: float = 0.0):
        self.env_fns = list(env_fns)
        self.num_envs = len(self.env_fns)
        self.steps = int(steps)
        self.spec = spec
        self.obs_keys = tuple(spec["obs"])
        self.obs_is_dict = bool(spec["obs_is_dict"])
        self.max_frames_per_traj = max_frames_per_traj
        self.check_finite = check_finite
        self.on_env_error = on_env_error
        self.max_env_restarts = max_env_restarts
        self.restart_window_s = restart_window_s
        self.restart_backoff_s = restart_backoff_s
        self.env_errors: list[dict] = []  # reported and cleared by the worker each batch
        self._error_times: list[float] = []
        self.stop_requested = False  # set from another thread to cut the batch short
        self.last_valid_steps = steps
        self.seed = seed
        self.slot_offset = slot_offset
        self.id_stride = id_stride
        self.id_offset = id_offset
        self.id_counter = id_counter
        self.policy_version = 0
        self.env_restarts = [0] * self.num_envs
        self.envs = [None] * self.num_envs
        self.runner = PolicyRunner(policy, policy_kind, self.obs_keys, self.num_envs)
        # per-env state carried across batches
        self._obs = {k: np.zeros((self.num_envs, *s), d) for k, (s, d) in spec["obs"].items()}
        self._traj = np.zeros(self.num_envs, np.int64)
        self._step_count = np.zeros(self.num_envs, np.int64)
        self._returns = np.zeros(self.num_envs, np.float64)
        self._needs_reset = [True] * self.num_envs
        self._next_seed = [_derive_seed(seed, slot_offset + i, 0) for i in range(self.num_envs)]
        self.buffers = self._allocate(self.steps)
        self.episode_returns: list[float] = []
        for i in range(self.num_envs):
            self._make_env(i)

    # -- storage -------------------------------------------------------------------------
    def _allocate(self, steps: int) -> dict:
        e, t = self.num_envs, steps
        buf = {}
        for key, (shape, dtype) in self.spec["obs"].items():
            buf[key] = np.zeros((e, t, *shape), dtype)
            buf[(NEXT, key)] = np.zeros((e, t, *shape), dtype)
        for key, (shape, dtype) in self.spec["outputs"].items():
            buf[key] = np.zeros((e, t, *shape), dtype)
        for key in ("done", "terminated", "truncated"):
            buf[key] = np.zeros((e, t, 1), bool)
            buf[(NEXT, key)] = np.zeros((e, t, 1), bool)
        buf[(NEXT, "reward")] = np.zeros((e, t, 1), np.float32)
        if self.max_frames_per_traj:
            buf["step_count"] = np.zeros((e, t, 1), np.int64)
            buf[(NEXT, "step_count")] = np.zeros((e, t, 1), np.int64)
        buf[(COLLECTOR, "traj_ids")] = np.zeros((e, t), np.int64)
        buf[(COLLECTOR, "policy_version")] = np.zeros((e, t), np.int64)
        return buf

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
            raise EnvStepError(i, seed, "reset", exc) from exc
        for k, v in split_observation(obs, self.obs_keys, self.obs_is_dict).items():
            self._obs[k][i] = v
        self._traj[i] = self._new_traj_id()
        self._step_count[i] = 0
        self._returns[i] = 0.0
        self._needs_reset[i] = False

    def set_seed(self, seed: int | None) -> None:
        """Reseed every env (applied at its next reset, which happens now) and the policy RNG."""
        self.seed = seed
        for i in range(self.num_envs):
            self._next_seed[i] = _derive_seed(seed, self.slot_offset + i, self.env_restarts[i])
            if self._next_seed[i] is not None:
                self.envs[i].action_space.seed(self._next_seed[i])
            self._needs_reset[i] = True
        if seed is not None and self.runner.kind != "random":
            self.runner._torch.manual_seed(int(seed) + self.slot_offset)

    def reset(self) -> None:
        """Start a fresh episode (and trajectory id) in every env at the next step."""
        self._needs_reset = [True] * self.num_envs

    def rebuild_env(self, i: int) -> int | None:
        """Replace a failed env with a new one seeded from (base seed, slot, restart count)."""
        self.env_restarts[i] += 1
        try:
            self.envs[i].close()
        except Exception:  # noqa: BLE001 - the env is already broken
            pass
        self._next_seed[i] = _derive_seed(self.seed, self.slot_offset + i, self.env_restarts[i])
        self._make_env(i)
        self._needs_reset[i] = True
        return self._next_seed[i]

    def close(self) -> None:
        for i, env in enumerate(self.envs):
            if env is not None:
                try:
                    env.close()
                except Exception:  # noqa: BLE001
                    pass
                self.envs[i] = None

    # -- the loop ------------------------------------------------------------------------
    def collect(self, random_actions: bool = False) -> dict:
        """Fill the buffers with ``steps`` steps of every env and return them (not copied)."""
        buf, envs, n = self.buffers, self.envs, self.num_envs
        obs_keys, is_dict = self.obs_keys, self.obs_is_dict
        cur_obs, traj, step_count, returns = self._obs, self._traj, self._step_count, self._returns
        out_keys = tuple(self.spec["outputs"])
        reward, n_term = buf[(NEXT, "reward")], buf[(NEXT, "terminated")]
        n_trunc, n_done = buf[(NEXT, "truncated")], buf[(NEXT, "done")]
        traj_buf = buf[(COLLECTOR, "traj_ids")]
        next_obs = {k: buf[(NEXT, k)] for k in obs_keys}
        max_steps = self.max_frames_per_traj or 0
        buf[(COLLECTOR, "policy_version")][:] = self.policy_version
        random_actions = random_actions or self.runner.kind == "random"
        if random_actions:
            for key in out_keys:
                buf[key][:] = 0
        grad_ctx = _no_grad(self.runner)
        for i in range(n):
            if self._needs_reset[i]:
                self._safe_reset(i)
        t_env = 0.0
        valid = self.steps
        with grad_ctx:
            for t in range(self.steps):
                if self.stop_requested:
                    valid = t
                    break
                for k in obs_keys:
                    buf[k][:, t] = cur_obs[k]
                traj_buf[:, t] = traj
                if max_steps:
                    buf["step_count"][:, t, 0] = step_count
                if random_actions:
                    action = np.stack([np.asarray(env.action_space.sample()) for env in envs])
                    buf[ACTION_KEY][:, t] = action
                else:
                    try:
                        out = self.runner(cur_obs)
                    except Exception as exc:  # noqa: BLE001
                        raise PolicyError(
                            "the policy raised inside the env worker:\n"
                            + "".join(traceback.format_exception(exc))
                        ) from exc
                    for key in out_keys:
                        buf[key][:, t] = out[key]
                    action = out[ACTION_KEY]
                t0 = time.perf_counter()
                for i in range(n):
                    try:
                        o, r, term, trunc, _ = envs[i].step(action[i])
                    except Exception as exc:  # noqa: BLE001
                        # cut the episode: a truncated frame ending where the env last was
                        self._env_failed(i, EnvStepError(i, self._seed_of(i), "step", exc))
                        o = {k: cur_obs[k][i] for k in obs_keys} if is_dict else cur_obs[obs_keys[0]][i]
                        r, term, trunc = 0.0, False, True
                    step_count[i] += 1
                    returns[i] += r
                    if max_steps and step_count[i] >= max_steps and not term:
                        trunc = True
                    if is_dict:
                        for k in obs_keys:
                            next_obs[k][i, t] = o[k]
                    else:
                        next_obs[obs_keys[0]][i, t] = o
                    reward[i, t, 0] = r
                    n_term[i, t, 0] = term
                    n_trunc[i, t, 0] = trunc
                    if term or trunc:
                        n_done[i, t, 0] = True
                        self.episode_returns.append(float(returns[i]))
                        self._safe_reset(i)
                    else:
                        n_done[i, t, 0] = False
                        for k in obs_keys:
                            cur_obs[k][i] = next_obs[k][i, t]
                t_env += time.perf_counter() - t0
        if max_steps:
            buf[(NEXT, "step_count")][..., 0] = buf["step_count"][..., 0] + 1
        if valid < self.steps:  # preempted: blank the rest, traj id -1 marks unfilled frames
            for value in buf.values():
                value[:, valid:] = 0
            traj_buf[:, valid:] = -1
        self.last_valid_steps = valid
        if self.check_finite:
            _check_finite(buf)
        self.last_env_time = t_env
        return buf

    def _env_failed(self, i: int, err: EnvStepError) -> None:
        """Record a failed env, enforce the restart budget, and rebuild it (with backoff)."""
        if self.on_env_error == "raise":
            raise err
        now = time.monotonic()
        self._error_times = [x for x in self._error_times if now - x < self.restart_window_s]
        self._error_times.append(now)
        self.env_errors.append(
            {"env": i, "seed": err.seed, "phase": err.phase, "error": repr(err.__cause__),
             "traceback": err.tb}
        )
        if len(self._error_times) > self.max_env_restarts:
            raise EnvRestartsExhausted(
                f"env {i} failed {len(self._error_times)} times within {self.restart_window_s:g}s "
                f"(max_restarts={self.max_env_restarts}); last error in {err.phase} with seed "
                f"{err.seed}:\n{err.tb}"
            ) from err.__cause__
        if self.restart_backoff_s:
            time.sleep(min(self.restart_backoff_s * 2 ** (len(self._error_times) - 1), 30.0))
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
        return _derive_seed(self.seed, self.slot_offset + i, self.env_restarts[i])


class _no_grad:
    """``torch.inference_mode()`` when the policy is a torch one, else nothing."""

    def __init__(self, runner: PolicyRunner):
        self.ctx = runner._torch.inference_mode() if runner._torch is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _check_finite(buf: dict) -> None:
    for key, value in buf.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"non-finite values (NaN or inf) in {key!r}")
