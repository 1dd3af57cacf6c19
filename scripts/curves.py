"""Shared by the training examples: their command line, typed hyperparameters, and curves.

Each example declares its hyperparameters as a pydantic model, one field each with its type,
default and help text; the YAML's ``train:`` section fills it, and every field is also a flag
(``--lr 3e-4``), as CleanRL's scripts do with theirs.
"""
from __future__ import annotations

import argparse
import csv
import os


def example_args(doc: str, config: str, hyper, argv=None):
    """Parse ``--out --config --deploy`` and one flag per field of ``hyper`` (a pydantic model);
    returns ``(args, config, hyperparameters)``.

    Values come from the field defaults, then the config's ``train:`` section, then the flags.
    ``--deploy`` swaps the deployment keys (ray, resources, placement) and keeps the job.
    """
    from collectors.config import load_config
    from collectors.errors import ConfigError
    from pydantic import ValidationError

    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for curve.csv and curve.png")
    p.add_argument("--config", default=config, help="job config (YAML)")
    p.add_argument("--deploy", default=None, help="deployment config, e.g. configs/cluster.yaml")
    for name, field in hyper.model_fields.items():
        kind = field.annotation if field.annotation in (int, float, str) else float
        if field.annotation in (int, type(None)) or "int" in str(field.annotation):
            kind = int
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help=f"{field.description} (default: the config's, else {field.default})")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.deploy:
        cfg = load_config(args.deploy).model_copy(update={"job": cfg.job, "train": cfg.train})
    values = dict(cfg.train or {})
    values.update({k: getattr(args, k) for k in hyper.model_fields if getattr(args, k) is not None})
    try:
        hp = hyper.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"train section of {args.config}: {problems}") from None
    return args, cfg, hp


def env_shapes(env_id: str) -> tuple[int, int, float | None]:
    """(observation size, action size or count, action bound for Box actions) from the spaces."""
    import gymnasium as gym

    env = gym.make(env_id)
    try:
        obs = int(gym.spaces.flatdim(env.observation_space))
        space = env.action_space
        if isinstance(space, gym.spaces.Discrete):
            return obs, int(space.n), None
        return obs, int(gym.spaces.flatdim(space)), float(abs(space.high).max())
    finally:
        env.close()



def write_curve(out_dir: str, rows: list[tuple[int, float, float]], title: str) -> None:
    """``rows``: (frames, seconds, mean_return). Writes DIR/curve.csv and DIR/curve.png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "curve.csv"), "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["frames", "seconds", "mean_return"])
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    frames, seconds, ret = zip(*rows) if rows else ([], [], [])
    a.plot(frames, ret)
    a.set_xlabel("frames")
    a.set_ylabel("mean return (last 20 episodes)")
    b.plot(seconds, ret)
    b.set_xlabel("wall-clock seconds")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curve.png"), dpi=100)
    plt.close(fig)
