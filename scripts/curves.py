"""Learning curves for the training examples: ``curve.csv`` and ``curve.png``."""
from __future__ import annotations

import csv
import os


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
