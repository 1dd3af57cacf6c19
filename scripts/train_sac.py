"""SAC on Pendulum-v1: background collection into the replay-buffer actor while the learner
samples.

    python scripts/train_sac.py --out runs/sac [--config configs/sac_pendulum.yaml]
                                [--deploy configs/cluster.yaml] [--updates N]

The env actor streams batches into the buffer actor (``collector.start()``); the learner only
samples, pushes weights every ``push_every`` updates and logs the policy-version lag of the data
it samples. Writes OUT/curve.csv (frames,seconds,mean_return) and OUT/curve.png.
"""
from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402
from torch import nn  # noqa: E402

from collectors import RayReplayBuffer, aSyncDataCollector  # noqa: E402
from curves import example_args, write_curve  # noqa: E402

MAX_ACTION = 2.0


def mlp(i, o, h):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class Actor(nn.Module):
    """Tanh-Gaussian policy; returns (action, log-prob)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = mlp(3, 2, hidden)

    def dist(self, obs):
        mu, log_std = self.net(obs).chunk(2, -1)
        return mu, log_std.clamp(-5, 2).exp()

    def forward(self, obs):
        mu, std = self.dist(obs)
        u = mu + std * torch.randn_like(mu)
        a = torch.tanh(u)
        logp = torch.distributions.Normal(mu, std).log_prob(u) - torch.log(1 - a.pow(2) + 1e-6)
        return a * MAX_ACTION, logp.sum(-1)


def main(argv=None) -> float:
    args, cfg = example_args(__doc__, "configs/sac_pendulum.yaml", argv, updates="learner updates")
    job, hp = cfg.job, cfg.train
    updates = args.updates or hp["updates"]
    torch.manual_seed(job.get("seed", 0))
    h = hp["hidden"]
    actor = Actor(h)
    q1, q2 = mlp(4, 1, h), mlp(4, 1, h)
    q1_t, q2_t = copy.deepcopy(q1), copy.deepcopy(q2)
    log_alpha = torch.zeros((), requires_grad=True)
    opt_a = torch.optim.Adam(actor.parameters(), lr=hp["lr"])
    opt_q = torch.optim.Adam(list(q1.parameters()) + list(q2.parameters()), lr=hp["lr"])
    opt_alpha = torch.optim.Adam([log_alpha], lr=hp["lr"])
    policy = TensorDictModule(actor, in_keys=["observation"], out_keys=["action", "sample_log_prob"])

    rb = RayReplayBuffer(hp["buffer_capacity"], batch_size=hp["batch_size"],
                         min_size=hp["min_size"], prefetch=True, config=cfg, name="sac-buffer")
    collector = aSyncDataCollector(job["env"], policy, num_envs=job["num_envs"],
                                   frames_per_batch=job["frames_per_batch"], total_frames=-1,
                                   init_random_frames=hp["init_random_frames"],
                                   seed=job.get("seed"), replay_buffer=rb, config=cfg, name="sac")
    collector.start()
    rows, t0, lag = [], time.perf_counter(), []
    try:
        for step in range(1, updates + 1):
            td = rb.sample(timeout=60)
            obs, act = td["observation"], td["action"]
            r = td["next", "reward"].squeeze(-1)
            nobs, term = td["next", "observation"], td["next", "terminated"].squeeze(-1).float()
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                na, nlogp = actor(nobs)
                x = torch.cat([nobs, na / MAX_ACTION], -1)
                target = r + hp["gamma"] * (1 - term) * (torch.min(q1_t(x), q2_t(x)).squeeze(-1) - alpha * nlogp)
            x = torch.cat([obs, act / MAX_ACTION], -1)
            q_loss = F.mse_loss(q1(x).squeeze(-1), target) + F.mse_loss(q2(x).squeeze(-1), target)
            opt_q.zero_grad()
            q_loss.backward()
            opt_q.step()
            a, logp = actor(obs)
            x = torch.cat([obs, a / MAX_ACTION], -1)
            a_loss = (alpha * logp - torch.min(q1(x), q2(x)).squeeze(-1)).mean()
            opt_a.zero_grad()
            a_loss.backward()
            opt_a.step()
            alpha_loss = -(log_alpha * (logp.detach() - 1.0)).mean()  # target entropy -dim(A)
            opt_alpha.zero_grad()
            alpha_loss.backward()
            opt_alpha.step()
            with torch.no_grad():
                for net, tgt in ((q1, q1_t), (q2, q2_t)):
                    for p_, pt in zip(net.parameters(), tgt.parameters()):
                        pt.lerp_(p_, hp["tau"])
            lag.append(collector.policy_version - float(td["collector", "policy_version"].float().mean()))
            if step % hp["push_every"] == 0:
                collector.update_policy_weights_()
            if step % 250 == 0:
                stats = collector.stats()
                recent = stats["recent_returns"][-20:]
                if recent:
                    mean = sum(recent) / len(recent)
                    rows.append((stats["frames"], round(time.perf_counter() - t0, 2), round(mean, 2)))
                    print(f"update {step:>6}  frames {stats['frames']:>8}  {rows[-1][1]:>6.1f}s  "
                          f"mean return {mean:8.2f}  policy lag {sum(lag) / len(lag):5.1f} versions",
                          flush=True)
                    lag.clear()
    finally:
        collector.async_shutdown()
        rb.shutdown()
    write_curve(args.out, rows, "SAC on Pendulum-v1, aSyncDataCollector.start() into RayReplayBuffer")
    final = rows[-1][2] if rows else float("nan")
    print(f"final mean return (last 20 episodes): {final}; {time.perf_counter() - t0:.0f}s; curve in {args.out}")
    return final


if __name__ == "__main__":
    main()
