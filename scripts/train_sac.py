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
import time

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tensordict.nn import TensorDictModule
from torch import nn

from collectors import RayReplayBuffer, aSyncDataCollector
from curves import env_shapes, example_args, write_curve


class SACHyperparameters(BaseModel):
    """The ``train:`` section of configs/sac_pendulum.yaml; each field is also a flag."""

    model_config = ConfigDict(extra="forbid")
    updates: int = Field(12000, gt=0, description="learner updates")
    batch_size: int = Field(256, gt=0, description="frames per sampled batch")
    buffer_capacity: int = Field(100_000, gt=0, description="replay buffer capacity (frames)")
    min_size: int = Field(2000, ge=0, description="frames stored before the first sample")
    init_random_frames: int = Field(2000, ge=0, description="frames collected with random actions")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (actor, critics, temperature)")
    gamma: float = Field(0.99, gt=0, le=1, description="discount factor")
    tau: float = Field(0.005, gt=0, le=1, description="target network averaging rate")
    hidden: int = Field(128, gt=0, description="hidden units of the actor and critic MLPs")
    push_every: int = Field(10, gt=0, description="send weights to the env actor every N updates")
    target_return: float = Field(-200.0, description="mean return reported as solved")


def mlp(i, o, h):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class Actor(nn.Module):
    """Tanh-Gaussian policy; returns (action scaled to the bound, log-prob)."""

    def __init__(self, obs_dim: int, act_dim: int, bound: float, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)
        self.bound = bound

    def dist(self, obs):
        mu, log_std = self.net(obs).chunk(2, -1)
        return mu, log_std.clamp(-5, 2).exp()

    def forward(self, obs):
        mu, std = self.dist(obs)
        u = mu + std * torch.randn_like(mu)
        a = torch.tanh(u)
        logp = torch.distributions.Normal(mu, std).log_prob(u) - torch.log(1 - a.pow(2) + 1e-6)
        return a * self.bound, logp.sum(-1)


def main(argv=None) -> float:
    args, cfg, hp = example_args(__doc__, "configs/sac_pendulum.yaml", SACHyperparameters, argv)
    job = cfg.job
    updates = hp.updates
    torch.manual_seed(job.get("seed", 0))
    obs_dim, act_dim, bound = env_shapes(job["env"])
    if bound is None:
        raise SystemExit(f"train_sac.py handles Box action spaces; {job['env']} has discrete actions.")
    h = hp.hidden
    actor = Actor(obs_dim, act_dim, bound, h)
    q1, q2 = mlp(obs_dim + act_dim, 1, h), mlp(obs_dim + act_dim, 1, h)
    q1_t, q2_t = copy.deepcopy(q1), copy.deepcopy(q2)
    log_alpha = torch.zeros((), requires_grad=True)
    opt_a = torch.optim.Adam(actor.parameters(), lr=hp.lr)
    opt_q = torch.optim.Adam(list(q1.parameters()) + list(q2.parameters()), lr=hp.lr)
    opt_alpha = torch.optim.Adam([log_alpha], lr=hp.lr)
    policy = TensorDictModule(actor, in_keys=["observation"], out_keys=["action", "sample_log_prob"])

    rb = RayReplayBuffer(hp.buffer_capacity, batch_size=hp.batch_size,
                         min_size=hp.min_size, prefetch=True, config=cfg, name="sac-buffer")
    collector = aSyncDataCollector(job["env"], policy, num_envs=job["num_envs"],
                                   frames_per_batch=job["frames_per_batch"], total_frames=-1,
                                   init_random_frames=hp.init_random_frames,
                                   seed=job.get("seed"), replay_buffer=rb, config=cfg, name="sac",
                                   num_threads=1)  # spinning torch threads starve the env actor
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
                x = torch.cat([nobs, na / bound], -1)
                target = r + hp.gamma * (1 - term) * (torch.min(q1_t(x), q2_t(x)).squeeze(-1) - alpha * nlogp)
            x = torch.cat([obs, act / bound], -1)
            q_loss = F.mse_loss(q1(x).squeeze(-1), target) + F.mse_loss(q2(x).squeeze(-1), target)
            opt_q.zero_grad()
            q_loss.backward()
            opt_q.step()
            a, logp = actor(obs)
            x = torch.cat([obs, a / bound], -1)
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
                        pt.lerp_(p_, hp.tau)
            lag.append(collector.policy_version - float(td["collector", "policy_version"].float().mean()))
            if step % hp.push_every == 0:
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
    write_curve(args.out, rows, f"SAC on {job['env']}, aSyncDataCollector.start() into RayReplayBuffer")
    final = rows[-1][2] if rows else float("nan")
    print(f"final mean return (last 20 episodes): {final}; {time.perf_counter() - t0:.0f}s; curve in {args.out}")
    return final


if __name__ == "__main__":
    main()
