"""What each env actor asks Ray for (GPUs, CPUs, custom resources), checked before anything
starts, and the CPU copy of a policy the actors receive."""
from __future__ import annotations

import math

import ray
import torch


def worker_gpus(options, config) -> float | None:
    """GPUs each env actor asks Ray for (``None``: the deployment config's): ``num_gpus`` when
    given; else the config's ``resources.env_worker.num_gpus`` when it sets one; else, for a
    policy on CUDA, a share of the cluster's GPUs (``gpu_share``)."""
    if options.num_gpus is not None:
        return options.num_gpus
    if config.resources.env_worker.num_gpus or not (options.policy_device or "cpu").startswith("cuda"):
        return None
    return gpu_share(options.num_workers)


def gpu_share(num_workers: int) -> float:
    """GPUs each env actor asks for when its policy runs on CUDA and ``num_gpus`` is unset: the
    cluster's GPUs shared out, one at most (2 workers on a 1-GPU machine: 0.5 each, as TorchRL's
    workers all use the one GPU). With no GPU in the cluster, 1: ``check_feasible`` says so."""
    total = ray.cluster_resources().get("GPU", 0)
    if not total:
        return 1.0
    return min(1.0, math.floor(total / num_workers * 10_000) / 10_000)


def on_cpu(policy):
    """The policy as the env actors receive it: a CPU copy of one whose weights live on a GPU
    (the trainer's policy stays where it is). Each actor moves it to ``policy_device``; an
    actor without a GPU could not even unpickle CUDA tensors."""
    if not isinstance(policy, torch.nn.Module) or all(
            t.device.type == "cpu" for t in (*policy.parameters(), *policy.buffers())):
        return policy
    import copy

    return copy.deepcopy(policy).to("cpu")


def check_feasible(options: dict, num_workers: int, who: str) -> None:
    """Reject at once a worker request that no node, or the whole cluster, can hold.

    (A request that fits the totals but cannot be placed still fails, after
    ``startup_timeout_s`` or the placement timeout, instead of pending forever.)
    """
    need = {"CPU": float(options.get("num_cpus", 0) or 0), "GPU": float(options.get("num_gpus", 0) or 0)}
    need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    need = {k: v for k, v in need.items() if v > 0}
    if not need:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        raise ValueError(
            f"{who}: each env worker asks for {need}, but no node has that much "
            f"(nodes: {[{k: node.get(k, 0) for k in need} for node in nodes]}). Lower "
            "num_cpus/num_gpus/resources (or resources.env_worker in the config).")
    total = {k: sum(node.get(k, 0) for node in nodes) for k in need}
    short = {k: v * num_workers for k, v in need.items() if v * num_workers > total[k] + 1e-9}
    if short:
        raise ValueError(
            f"{who}: {num_workers} env workers need {short} in all, but the cluster has "
            f"{ {k: total[k] for k in short} }. Use fewer workers or smaller requests.")
