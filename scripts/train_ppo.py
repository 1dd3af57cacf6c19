"""PPO on CartPole-v1 with MultiSyncDataCollector: on-policy, weights pushed after every batch.

    python scripts/train_ppo.py --out runs/ppo [--config configs/ppo_cartpole.yaml]
                                [--deploy configs/cluster.yaml] [--total-frames N]

Writes OUT/curve.csv (frames,seconds,mean_return) and OUT/curve.png.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402
from torch import nn  # noqa: E402

from collectors import MultiSyncDataCollector  # noqa: E402
from curves import example_args, write_curve  # noqa: E402


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
    args, cfg = example_args(__doc__, "configs/ppo_cartpole.yaml", argv, total_frames="frames to collect")
    job, hp = cfg.job, cfg.train
    total = args.total_frames or job["total_frames"]
    torch.manual_seed(job.get("seed", 0))

    actor = Actor(4, 2, hp["hidden"])
    critic = nn.Sequential(nn.Linear(4, hp["hidden"]), nn.Tanh(), nn.Linear(hp["hidden"], hp["hidden"]),
                           nn.Tanh(), nn.Linear(hp["hidden"], 1))
    policy = TensorDictModule(actor, in_keys=["observation"],
                              out_keys=["action", "sample_log_prob", "logits"])
    params = list(actor.parameters()) + list(critic.parameters())
    opt = torch.optim.Adam(params, lr=hp["lr"])
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
                group["lr"] = hp["lr"] * frac
            clip = hp["clip"] * frac
            batch = batch.reshape(-1, batch.shape[-1])  # [workers * envs, T]
            adv, ret = gae(batch, critic, hp["gamma"], hp["gae_lambda"])
            flat = batch.reshape(-1)
            adv, ret = adv.reshape(-1), ret.reshape(-1)
            for _ in range(hp["epochs"]):
                for idx in torch.randperm(flat.shape[0]).split(hp["minibatch"]):
                    mb = flat[idx]
                    a = adv[idx]
                    a = (a - a.mean()) / (a.std() + 1e-8)
                    dist = torch.distributions.Categorical(logits=actor.net(mb["observation"]))
                    ratio = (dist.log_prob(mb["action"]) - mb["sample_log_prob"]).exp()
                    pg = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
                    vf = (critic(mb["observation"]).squeeze(-1) - ret[idx]).pow(2).mean()
                    loss = pg + hp["vf_coef"] * vf - hp["ent_coef"] * dist.entropy().mean()
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
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
    write_curve(args.out, rows, "PPO on CartPole-v1, MultiSyncDataCollector (2 workers x 4 envs)")
    print(f"final mean return (last 20 episodes): {rows[-1][2] if rows else float('nan')}; best {best:.1f}; "
          f"{time.perf_counter() - t0:.0f}s; curve in {args.out}")
    return rows[-1][2] if rows else float("nan")


if __name__ == "__main__":
    main()
