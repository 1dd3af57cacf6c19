"""The batch layout every rollout loop fills, and its helpers.

A batch is a flat dict ``{key: ndarray[num_envs, T, ...]}`` whose keys are TorchRL's
(``"observation"``, ``("next", "reward")``, ``("collector", "traj_ids")``, ...); the trainer side
turns it into a TensorDict once per batch.
"""
from __future__ import annotations

import numpy as np

from actors.errors import EnvSpecError, PolicyOutputError

NEXT = "next"
COLLECTOR = "collector"
ENV_TIME_EVERY_MASK = 7  # env time (a metric) is measured on every 8th step and scaled


def derive_seed(base: int | None, slot: int, restarts: int) -> int | None:
    """The seed of env ``slot`` of a run after ``restarts`` rebuilds (``None`` if unseeded)."""
    if base is None:
        return None
    return int(base) + slot + 1_000_003 * restarts


def allocate(spec: dict, num_envs: int, steps: int, step_count: bool) -> dict:
    """Zeroed ``{key: [num_envs, steps, ...]}`` arrays of one batch, TorchRL's keys."""
    e, t = num_envs, steps
    buf = {}
    for key, (shape, dtype) in spec["obs"].items():
        buf[key] = np.zeros((e, t, *shape), dtype)
        buf[(NEXT, key)] = np.zeros((e, t, *shape), dtype)
    for key, (shape, dtype) in spec["outputs"].items():
        buf[key] = np.zeros((e, t, *shape), dtype)
    for key in ("done", "terminated", "truncated"):
        buf[key] = np.zeros((e, t, 1), bool)
        buf[(NEXT, key)] = np.zeros((e, t, 1), bool)
    buf[(NEXT, "reward")] = np.zeros((e, t, 1), np.float32)
    if step_count:
        buf["step_count"] = np.zeros((e, t, 1), np.int64)
        buf[(NEXT, "step_count")] = np.zeros((e, t, 1), np.int64)
    buf[(COLLECTOR, "traj_ids")] = np.zeros((e, t), np.int64)
    buf[(COLLECTOR, "policy_version")] = np.zeros((e, t), np.int64)
    return buf


def account_returns(start: np.ndarray, rewards: np.ndarray, ends) -> tuple[list, np.ndarray]:
    """Episode returns from a batch's ``[T, E]`` rewards, per episode rather than per step.

    ``start``: each env's running return at the batch start; ``ends``: the ``(t, env)`` of the
    episode ends, in the order they happened. Returns the finished episodes' returns in that
    order, and each env's running return after the batch."""
    total = np.cumsum(rewards, axis=0, dtype=np.float64)
    before = np.zeros(len(start))  # cumulative reward before each env's current episode
    carry = np.array(start, np.float64)  # return carried in from earlier batches
    finished = []
    for t, i in ends:
        finished.append(float(carry[i] + total[t, i] - before[i]))
        before[i], carry[i] = total[t, i], 0.0
    return finished, carry + total[-1] - before


def check_policy_output(out: dict, spec: dict, num_envs: int, name: str, check_finite: str) -> None:
    """The policy's outputs fit the spec found at construction (shape, dtype; finite when
    ``check_finite`` is on); else :class:`PolicyOutputError` naming the policy."""
    for key, (shape, dtype) in spec["outputs"].items():
        value = out.get(key)
        want = (num_envs, *shape)
        if value is None or tuple(value.shape) != want or value.dtype.name != dtype:
            got = "nothing" if value is None else f"shape {tuple(value.shape)} dtype {value.dtype.name}"
            raise PolicyOutputError(
                f"policy {name} returned {got} for {key!r} on a batch of {num_envs} envs; "
                f"expected shape {want} and dtype {dtype} (as at construction). Fix the "
                "policy's output shape or dtype.")
        if check_finite != "off" and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise PolicyOutputError(f"policy {name} returned non-finite values for {key!r}.")


def check_finite(buf: dict) -> None:
    """Raise :class:`EnvSpecError` at the first NaN or inf in a batch."""
    for key, value in buf.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            where = np.argwhere(~np.isfinite(value))[0].tolist()
            raise EnvSpecError(
                f"non-finite value (NaN or inf) in {key!r} at [env, step, ...] = {where}: "
                f"expected finite numbers, got {value[tuple(where)]!r}.")
