"""Soak: background collection into a checkpointed replay buffer while things go wrong.

For ``--minutes M``: two env workers stream batches into a ``RayReplayBuffer`` with
``checkpoint_every=5`` and a ``samples_per_insert`` rate limit; a trainer samples, and every so
often stops sampling for a while (the rate limiter then holds the writers); env workers are
killed at random; once, the buffer actor is killed and comes back from its checkpoint. At the
end it prints what was produced, delivered, dropped, stored and duplicated, and exits non-zero
if a frame was lost or stored twice.

    python scripts/soak.py --minutes 10 [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import time

from collectors import MultiaSyncDataCollector, RayReplayBuffer
from collectors.testing import counting_env, kill_worker


def soak(minutes: float, seed: int = 0, out=print) -> dict:
    rng = random.Random(seed)
    folder = tempfile.mkdtemp(prefix="soak-")
    rb = RayReplayBuffer(2_000_000, batch_size=64, checkpoint_dir=os.path.join(folder, "rb"),
                         checkpoint_every=5, samples_per_insert=0.5, min_size=200,
                         error_buffer=20_000,
                         name="soak-buffer", timeout_s=60)
    c = MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=100,
                                replay_buffer=rb, name="soak", write_timeout_s=60,
                                max_restarts=100_000)  # the kills are on purpose
    end = time.monotonic() + minutes * 60
    buffer_kill_at = time.monotonic() + minutes * 60 * rng.uniform(0.3, 0.6)
    next_worker_kill = time.monotonic() + rng.uniform(5, 15)
    pause_until, samples, kills, buffer_killed = 0.0, 0, 0, False
    try:
        c.start()
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_worker_kill:
                kill_worker(c, rng.randrange(2))
                kills += 1
                next_worker_kill = now + rng.uniform(5, 15)
            if not buffer_killed and now >= buffer_kill_at:
                os.kill(rb.info()["pid"], signal.SIGKILL)
                buffer_killed = True
            if now < pause_until:
                time.sleep(0.05)  # a trainer busy elsewhere: writers wait on the rate limiter
                continue
            if rng.random() < 0.002:
                pause_until = now + rng.uniform(2, 8)
                continue
            try:
                rb.sample(timeout=10)
                samples += 1
            except TimeoutError:
                pass  # nothing to sample yet (rate limiter): try again
        c.async_shutdown(timeout=30)
        stats = c.stats()
        ids = [tuple(i) for i in rb.batch_ids()]
        per = stats["per_worker"]
        produced = sum(p["frames"] for p in per)
        delivered = sum(p["delivered"] for p in per)
        dropped = sum(sum(p["dropped"].values()) for p in per)
        report = {
            "minutes": minutes, "worker kills": kills, "buffer killed": buffer_killed,
            "trainer samples": samples, "produced": produced, "delivered": delivered,
            "dropped": dropped, "stored": rb.write_count, "duplicated": len(ids) - len(set(ids)),
            "written but not stored": sorted(set(map(tuple, stats["written_batch_ids"])) - set(ids)),
            "restored from": rb.info()["restored_from"], "error": c.background_error(),
        }
    finally:
        c.shutdown(raise_on_error=False)
        rb.shutdown()
    for key, value in report.items():
        out(f"{key:>22}: {value}")
    return report


def ok(report: dict) -> bool:
    return (report["produced"] == report["delivered"] + report["dropped"] and report["delivered"] > 0
            and report["stored"] == report["delivered"] and report["duplicated"] == 0
            and not report["written but not stored"] and report["error"] is None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    report = soak(args.minutes, args.seed)
    good = ok(report)
    print("nothing lost, nothing stored twice" if good else "FAILED: frames lost or duplicated")
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
