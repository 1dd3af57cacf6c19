"""Command line: ``python -m collectors run CONFIG`` (the benchmark is ``scripts/bench.py`` in a
checkout; it is not part of the installed package)."""
from __future__ import annotations

import argparse
import math
import sys
import time

from collectors.errors import ConfigError, RayCollectorsError

KINDS = {
    "sync": "SyncDataCollector",
    "multisync": "MultiSyncDataCollector",
    "multiasync": "MultiaSyncDataCollector",
    "async": "aSyncDataCollector",
}


def _policy(name: str, env_id, hidden: int = 64):
    """``random`` or ``mlp`` (a fixed random MLP, for throughput runs)."""
    if name in (None, "random"):
        return None
    if name != "mlp":
        raise ConfigError(f"job.policy must be 'random' or 'mlp'; got {name!r}.")
    import gymnasium as gym
    import torch
    from torch import nn

    from collectors.policies import ArgmaxLayer, Scale, mlp

    env = gym.make(env_id) if isinstance(env_id, str) else env_id()
    obs_dim = int(gym.spaces.flatdim(env.observation_space))
    space = env.action_space
    env.close()
    torch.manual_seed(0)
    if isinstance(space, gym.spaces.Discrete):
        return nn.Sequential(mlp(obs_dim, int(space.n), hidden), ArgmaxLayer())
    act_dim = int(gym.spaces.flatdim(space))
    high = float(abs(space.high).max())
    return nn.Sequential(mlp(obs_dim, act_dim, hidden), nn.Tanh(), Scale(high))


def build_collector(config, total_frames: int | None = None):
    """The collector that a job config describes."""
    import collectors

    job = dict(config.job or {})
    if "env" not in job:
        raise ConfigError("the config has no job.env: name a gymnasium id, e.g. job: {env: CartPole-v1}.")
    kind = job.get("collector", "sync")
    if kind not in KINDS:
        raise ConfigError(f"job.collector must be one of {sorted(KINDS)}; got {kind!r}.")
    cls = getattr(collectors, KINDS[kind])
    kwargs = dict(frames_per_batch=job.get("frames_per_batch", 1000),
                  total_frames=total_frames or job.get("total_frames", 10_000),
                  num_envs=job.get("num_envs", 1), seed=job.get("seed"), config=config,
                  create_env_kwargs=job.get("env_kwargs"), name=job.get("name"))
    if kind in ("multisync", "multiasync"):
        kwargs["num_workers"] = job.get("num_workers", 2)
    buffer = job.get("replay_buffer")
    if buffer is not None:  # batches go to a buffer actor: {capacity: N, ...RayReplayBuffer args}
        if not isinstance(buffer, dict) or "capacity" not in buffer:
            raise ConfigError("job.replay_buffer must be a mapping of RayReplayBuffer arguments "
                              f"with a capacity, e.g. {{capacity: 100000}}; got {buffer!r}.")
        kwargs["replay_buffer"] = collectors.RayReplayBuffer(**buffer, config=config)
    policy = _policy(job.get("policy", "random"), job["env"], job.get("hidden", 64))
    try:
        return cls(job["env"], policy, **kwargs)
    except BaseException:
        if buffer is not None:
            kwargs["replay_buffer"].shutdown()
        raise


def cmd_run(args) -> int:
    from tqdm import tqdm

    from collectors.config import load_config
    from collectors.runtime import dashboard_url

    config = load_config(args.config)
    if args.deploy:
        deploy = load_config(args.deploy)
        config = deploy.model_copy(update={"job": config.job})
    if args.address:
        config.ray.address = args.address
    collector = build_collector(config, args.total_frames)
    print(f"Ray dashboard: {dashboard_url() or 'not available'}", flush=True)
    total = collector.total_frames
    t0 = time.perf_counter()
    try:
        with tqdm(total=total, unit="frames", unit_scale=True, disable=args.quiet) as bar:
            for batch in collector:
                n = collector._frames - bar.n
                bar.update(n)
                bar.set_postfix(fps=f"{collector._frames / (time.perf_counter() - t0):,.0f}")
        stats = collector.stats()
    finally:
        collector.shutdown()
        if collector.replay_buffer is not None:
            stats_buffer = collector.replay_buffer.info()
            collector.replay_buffer.shutdown()
            print(f"replay buffer: {stats_buffer['size']:,} frames held, "
                  f"{stats_buffer['write_count']:,} written")
    elapsed = time.perf_counter() - t0
    rows = [("frames", f"{stats['frames']:,}"), ("seconds", f"{elapsed:.2f}"),
            ("frames/s", f"{stats['frames'] / elapsed:,.0f}"), ("episodes", f"{stats['episodes']:,}"),
            ("mean return", "n/a" if math.isnan(stats["mean_return"]) else f"{stats['mean_return']:.2f}"),
            ("restarts", str(stats["restarts"])), ("lost frames", str(stats["lost_frames"])),
            ("nodes", str(len(set(stats["worker_nodes"])))), ("placement", stats["placement"])]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v:>12}" for k, v in rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectors",
                                     description="ray-collectors: run a collection job.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a collection job from a config")
    run.add_argument("config", help="job config (YAML), e.g. configs/cartpole.yaml")
    run.add_argument("--total-frames", type=int, default=None)
    run.add_argument("--address", default=None, help="Ray address (overrides the config)")
    run.add_argument("--deploy", default=None, help="deployment config to use (e.g. configs/cluster.yaml)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    import gymnasium

    try:
        return cmd_run(args)
    except (RayCollectorsError, ValueError, TypeError, NotImplementedError, TimeoutError,
            OSError, gymnasium.error.Error) as exc:
        text = str(exc).strip().splitlines()
        print(f"error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
