"""PPO on CartPole-v1 with MultiSyncDataCollector: on-policy, weights pushed after every batch.

    python scripts/train_ppo.py --out runs/ppo [--config configs/ppo_cartpole.yaml]
                                [--deploy configs/cluster.yaml] [--total-frames N]

Writes OUT/curve.csv (frames,seconds,mean_return) and OUT/curve.png.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict.nn import TensorDictModule
from torch import nn

from collectors import MultiSyncDataCollector
from curves import env_shapes, example_args, write_curve


class PPOHyperparameters(BaseModel):
    """The ``train:`` section of configs/ppo_cartpole.yaml; each field is also a flag."""

    model_config = ConfigDict(extra="forbid")
    total_frames: Optional[int] = Field(None, gt=0, description="frames to collect (default: job.total_frames)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate, annealed linearly to 0")
    gamma: float = Field(0.98, gt=0, le=1, description="discount factor")
    gae_lambda: float = Field(0.8, ge=0, le=1, description="GAE lambda")
    epochs: int = Field(20, gt=0, description="passes over each batch")
    minibatch: int = Field(256, gt=0, description="frames per gradient step")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip, annealed linearly to 0")
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    vf_coef: float = Field(0.5, ge=0, description="value loss coefficient")
    max_grad_norm: float = Field(0.5, gt=0, description="gradient norm clip")
    hidden: int = Field(64, gt=0, description="hidden units of the actor and critic MLPs")
    target_return: float = Field(475.0, description="mean return reported as solved")


class Actor(nn.Module):
    """obs -> (sampled action, its log-prob, logits): the collection policy."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, n_actions))

    def forward(self, obs):
        logits = self.net(obs)
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()
        return action, dist.log_prob(action), logits


def gae(batch, value_fn, gamma: float, lam: float):
    """Advantages and returns from our ``("next", ...)`` keys; rows are env streams over time."""
    with torch.no_grad():
        v = value_fn(batch["observation"]).squeeze(-1)
        v_next = value_fn(batch["next", "observation"]).squeeze(-1)
    r = batch["next", "reward"].squeeze(-1)
    term = batch["next", "terminated"].squeeze(-1).float()
    done = batch["next", "done"].squeeze(-1).float()
    delta = r + gamma * v_next * (1 - term) - v
    adv = torch.zeros_like(delta)
    last = torch.zeros_like(delta[..., 0])
    for t in reversed(range(delta.shape[-1])):
        last = delta[..., t] + gamma * lam * (1 - done[..., t]) * last
        adv[..., t] = last
    return adv, adv + v


def main(argv=None) -> float:
    args, cfg, hp = example_args(__doc__, "configs/ppo_cartpole.yaml", PPOHyperparameters, argv)
    job = cfg.job
    total = hp.total_frames or job["total_frames"]
    torch.manual_seed(job.get("seed", 0))
    obs_dim, n_actions, bound = env_shapes(job["env"])
    if bound is not None:
        raise SystemExit(f"train_ppo.py handles Discrete action spaces; {job['env']} has Box actions.")

    actor = Actor(obs_dim, n_actions, hp.hidden)
    critic = nn.Sequential(nn.Linear(obs_dim, hp.hidden), nn.Tanh(), nn.Linear(hp.hidden, hp.hidden),
                           nn.Tanh(), nn.Linear(hp.hidden, 1))
    policy = TensorDictModule(actor, in_keys=["observation"],
                              out_keys=["action", "sample_log_prob", "logits"])
    params = list(actor.parameters()) + list(critic.parameters())
    opt = torch.optim.Adam(params, lr=hp.lr)
    collector = MultiSyncDataCollector(
        job["env"], policy, num_workers=job["num_workers"], num_envs=job["num_envs"],
        frames_per_batch=job["frames_per_batch"], total_frames=total, seed=job.get("seed"),
        config=cfg, name="ppo")
    rows, t0, best = [], time.perf_counter(), float("-inf")
    n_updates = max(1, len(collector))
    try:
        for it, batch in enumerate(collector):
            frac = 1.0 - it / n_updates  # linear annealing of lr and clip, as in rl-zoo
            for group in opt.param_groups:
                group["lr"] = hp.lr * frac
            clip = hp.clip * frac
            batch = batch.reshape(-1, batch.shape[-1])  # [workers * envs, T]
            adv, ret = gae(batch, critic, hp.gamma, hp.gae_lambda)
            flat = batch.reshape(-1)
            adv, ret = adv.reshape(-1), ret.reshape(-1)
            for _ in range(hp.epochs):
                for idx in torch.randperm(flat.shape[0]).split(hp.minibatch):
                    mb = flat[idx]
                    a = adv[idx]
                    a = (a - a.mean()) / (a.std() + 1e-8)
                    dist = torch.distributions.Categorical(logits=actor.net(mb["observation"]))
                    ratio = (dist.log_prob(mb["action"]) - mb["sample_log_prob"]).exp()
                    pg = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
                    vf = (critic(mb["observation"]).squeeze(-1) - ret[idx]).pow(2).mean()
                    loss = pg + hp.vf_coef * vf - hp.ent_coef * dist.entropy().mean()
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                    opt.step()
            collector.update_policy_weights_()  # on-policy: the next batch uses these weights
            recent = collector.stats()["recent_returns"][-20:]
            if recent:
                mean = sum(recent) / len(recent)
                best = max(best, mean)
                rows.append((collector.stats()["frames"], round(time.perf_counter() - t0, 2), round(mean, 2)))
                if it % 20 == 0:
                    print(f"frames {rows[-1][0]:>7}  {rows[-1][1]:>6.1f}s  mean return {mean:7.2f}", flush=True)
    finally:
        collector.shutdown()
    write_curve(args.out, rows, f"PPO on {job['env']}, MultiSyncDataCollector ({job['num_workers']} workers x {job['num_envs']} envs)")
    print(f"final mean return (last 20 episodes): {rows[-1][2] if rows else float('nan')}; best {best:.1f}; "
          f"{time.perf_counter() - t0:.0f}s; curve in {args.out}")
    return rows[-1][2] if rows else float("nan")


if __name__ == "__main__":
    main()
