"""Shared by the training examples: their command line, config, and learning curves."""
from __future__ import annotations

import argparse
import csv
import os


def example_args(doc: str, config: str, argv=None, **extra):
    """Parse ``--out --config --deploy`` (+ ``extra`` int options); return (args, config).

    ``--deploy`` swaps the deployment keys (ray, resources, placement) and keeps the job.
    """
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from collectors.config import load_config

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=config)
    p.add_argument("--deploy", default=None, help="deployment config, e.g. configs/cluster.yaml")
    for name, help_text in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=help_text)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.deploy:
        cfg = load_config(args.deploy).model_copy(update={"job": cfg.job, "train": cfg.train})
    return args, cfg


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
