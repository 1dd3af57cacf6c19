"""Starting or reusing Ray."""
from __future__ import annotations

import logging
import multiprocessing
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.errors import CollectorError, RayCollectorsError, ReplayBufferUnavailable, unwrap


def ensure_ray(address: str | None = None, num_cpus: float | None = None,
               runtime_env: dict | None = None, dashboard_port: int | None = None,
               dashboard_host: str = "127.0.0.1") -> bool:
    """Connect to Ray, starting a local instance (dashboard on ``dashboard_host``, 127.0.0.1
    unless the config opted in to another) if none runs.

    Returns ``True`` when this call started Ray. An existing session is reused and never shut
    down by the collectors.
    """
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": True, "log_to_driver": True}
    if address in (None, "", "local"):
        kwargs["dashboard_host"] = dashboard_host
        if dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            logging.getLogger("ray_collectors").warning(
                "the Ray dashboard listens on %s: reachable beyond this machine (token "
                "authentication stays on)", dashboard_host)
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if dashboard_port is not None:
            kwargs["dashboard_port"] = dashboard_port
        address = None
    else:
        kwargs.pop("include_dashboard")
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    ray.init(address=address, **kwargs)
    return True


def plan_with_key(plan_ref) -> list:
    """``[plan_ref, authkey]`` for the driver: the env actors take this process's
    ``multiprocessing`` authkey before unpickling the plan, so ``multiprocessing.Manager``
    objects in envs and policy factories work there as in TorchRL's worker processes."""
    return [plan_ref, bytes(multiprocessing.current_process().authkey)]


def near_caller(options: dict) -> dict:
    """``options`` plus a soft preference for this process's node, unless they already place
    the actor (a node pin or custom resources). The driver then shares the trainer's fate
    instead of dying with some other node, and the replay buffer can be sampled locally."""
    if "scheduling_strategy" in options or options.get("resources"):
        return options
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - e.g. a Ray client: let Ray choose
        return options
    if not node:
        return options
    return {**options, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}


def dashboard_url() -> str | None:
    """The dashboard's address of the connected Ray, ``http://host:port``, or ``None``."""
    try:
        ctx = ray.get_runtime_context()
        url = getattr(ctx, "dashboard_url", None)
        if not url:
            url = ray._private.worker.global_worker.node.address_info.get("webui_url")
    except Exception:  # noqa: BLE001 - best effort for a printed hint
        return None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def kill_quietly(handle) -> None:
    try:
        if ray.is_initialized():
            ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001
        pass


def wait_dead(handles, deadline: float) -> None:
    """Block until each actor answers as dead (``ray.kill`` is asynchronous), or the deadline."""
    for h in handles:
        while time.monotonic() < deadline:
            try:
                ray.get(h.__ray_ready__.remote(), timeout=max(0.05, deadline - time.monotonic()))
            except (RayActorError, GetTimeoutError):
                break
            except Exception:  # noqa: BLE001
                break
            time.sleep(0.05)


def buffer_gone(name: str, exc: BaseException) -> ReplayBufferUnavailable:
    """The one translation of "the buffer actor died" into the public error."""
    return ReplayBufferUnavailable(
        f"replay buffer {name!r} is gone ({type(exc).__name__}); give it a checkpoint_dir so it "
        "restarts from its last checkpoint.")


def driver_get(ref, timeout=None):
    """``ray.get`` that re-raises our own errors from inside the actors as themselves."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as exc:
        cause = unwrap(exc)
        original = getattr(cause, "original", None)
        if isinstance(cause, CollectorError) and original is not None:
            # the policy's own exception, as TorchRL raises it; what happened is in its note
            original.add_note(f"(raised by the policy in an env actor: {cause.args[0]})"[:4000])
            raise original from cause
        if isinstance(cause, RayCollectorsError):
            raise cause from None
        raise
    except RayActorError as exc:  # the driver itself is gone: nothing left to coordinate
        raise CollectorError(
            f"the collector's driver actor died ({exc}); its node was lost or it was killed. "
            "This collector cannot go on: create a new one (pin the driver with "
            "resources.driver.node to keep it on a node that stays).") from exc
