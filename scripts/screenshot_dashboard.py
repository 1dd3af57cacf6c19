"""Screenshot of the Ray dashboard's actor list while a collection runs (for the README).

    pip install playwright && apt-get install chromium
    python scripts/screenshot_dashboard.py [--out docs/results/dashboard_actors.png]

Authenticates with Ray's token (the dashboard's `ray-authentication-token` cookie) and drives
headless Chromium.
"""
from __future__ import annotations

import argparse
import os
import time



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs/results/dashboard_actors.png")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    import ray
    from playwright.sync_api import sync_playwright

    from collectors import MultiaSyncDataCollector, RayReplayBuffer
    from collectors.runtime import dashboard_url

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", log_to_driver=False)
    url = dashboard_url()
    token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    rb = RayReplayBuffer(100_000, name="cartpole-rb")
    c = MultiaSyncDataCollector("CartPole-v1", num_workers=4, frames_per_batch=500,
                                replay_buffer=rb, name="cartpole")
    c.start()
    time.sleep(5)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        ctx = browser.new_context(viewport={"width": 1500, "height": 900})
        ctx.add_cookies([{"name": "ray-authentication-token", "value": token, "url": url}])
        page = ctx.new_page()
        page.goto(f"{url}/#/actors", wait_until="networkidle", timeout=60_000)
        page.wait_for_timeout(6000)
        page.screenshot(path=args.out)
        browser.close()
    c.async_shutdown()
    rb.shutdown()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
