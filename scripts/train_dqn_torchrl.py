"""TorchRL's DQN-CartPole recipe (sota-implementations/dqn), with our collector.

Everything but the collector is TorchRL's own: its env and transforms, QValueActor with an
EGreedyModule, ReplayBuffer(LazyTensorStorage), DQNLoss and HardUpdate. The only collector
import is ours; ``--torchrl-collector`` runs the same script on TorchRL's ``Collector`` for a
comparison with the same seed and budget. As in TorchRL's tutorials, the script never calls
``update_policy_weights_()``: the trainer's changes (optimizer steps, the annealed eps) reach
the workers by themselves.

    python scripts/train_dqn_torchrl.py --out runs/dqn [--total-frames N] [--torchrl-collector]

Writes OUT/curve.csv (frames,seconds,mean_return) and OUT/curve.png.
"""
from __future__ import annotations

import argparse
import time

import torch
from tensordict.nn import TensorDictSequential
from torch import nn
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs import Compose, GymEnv, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MLP, EGreedyModule, QValueActor
from torchrl.objectives import DQNLoss, HardUpdate

from collectors import SyncDataCollector
from curves import write_curve


def make_env():
    """The recipe's env: CartPole-v1 with an episode-reward sum and a step counter."""
    return TransformedEnv(GymEnv("CartPole-v1"), Compose(StepCounter(), RewardSum()))


def make_model(env):
    """The recipe's Q network: an MLP of 120 and 84 cells behind TorchRL's QValueActor."""
    mlp = MLP(in_features=env.observation_spec["observation"].shape[-1],
              out_features=env.action_spec.shape[-1], num_cells=[120, 84],
              activation_class=nn.ReLU)
    return QValueActor(mlp, spec=env.action_spec, in_keys=["observation"])


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for curve.csv and curve.png")
    p.add_argument("--total-frames", type=int, default=500_100, help="frame budget (the recipe's)")
    p.add_argument("--frames-per-batch", type=int, default=10, help="frames per collector batch")
    p.add_argument("--init-random-frames", type=int, default=10_000, help="random frames first")
    p.add_argument("--eps-steps", type=int, default=250_000, help="frames to anneal eps 1 -> 0.05")
    p.add_argument("--buffer-size", type=int, default=10_000, help="replay buffer capacity")
    p.add_argument("--batch-size", type=int, default=128, help="frames per gradient step")
    p.add_argument("--lr", type=float, default=2.5e-4, help="Adam learning rate")
    p.add_argument("--gamma", type=float, default=0.99, help="discount factor")
    p.add_argument("--target-update", type=int, default=50, help="updates between target copies")
    p.add_argument("--target-return", type=float, default=475.0, help="mean return to stop at")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--torchrl-collector", action="store_true", help="use TorchRL's Collector")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = make_model(make_env())
    greedy = EGreedyModule(annealing_num_steps=args.eps_steps, eps_init=1.0, eps_end=0.05,
                           spec=model.spec)
    policy = TensorDictSequential(model, greedy)
    kwargs = dict(frames_per_batch=args.frames_per_batch, total_frames=args.total_frames,
                  init_random_frames=args.init_random_frames)
    if args.torchrl_collector:
        from torchrl.collectors import Collector

        collector = Collector(make_env, policy, **kwargs)
        collector.set_seed(args.seed)
    else:
        collector = SyncDataCollector(make_env, policy, seed=args.seed, **kwargs)
    rb = ReplayBuffer(storage=LazyTensorStorage(args.buffer_size), batch_size=args.batch_size)
    loss = DQNLoss(model, delay_value=True, loss_function="l2")
    loss.make_value_estimator(gamma=args.gamma)
    target = HardUpdate(loss, value_network_update_interval=args.target_update)
    opt = torch.optim.Adam(loss.parameters(), lr=args.lr)
    rows, returns, frames, t0 = [], [], 0, time.perf_counter()
    try:
        for batch in collector:
            frames += batch.numel()
            ends = batch["next", "done"].squeeze(-1)
            returns += batch["next", "episode_reward"].squeeze(-1)[ends].tolist()
            rb.extend(batch.reshape(-1))
            greedy.step(batch.numel())  # anneals eps in place: the workers follow by themselves
            if frames >= args.init_random_frames:
                sample = rb.sample()
                out = loss(sample)
                opt.zero_grad()
                out["loss"].backward()
                nn.utils.clip_grad_norm_(loss.parameters(), 10.0)
                opt.step()
                target.step()
            if ends.any() and len(returns) >= 20:
                mean = sum(returns[-20:]) / 20
                if not rows or frames - rows[-1][0] >= 2000 or mean >= args.target_return:
                    rows.append((frames, round(time.perf_counter() - t0, 2), round(mean, 2)))
                    if len(rows) % 25 == 0:
                        print(f"frames {frames:>7}  {rows[-1][1]:>6.1f}s  mean return {mean:6.1f}",
                              flush=True)
                if mean >= args.target_return:
                    break
    finally:
        collector.shutdown()
    which = "TorchRL's Collector" if args.torchrl_collector else "ray-collectors SyncDataCollector"
    write_curve(args.out, rows, f"TorchRL DQN recipe on CartPole-v1, {which}")
    final = rows[-1][2] if rows else float("nan")
    print(f"{which}: mean return (last 20 episodes) {final} at {frames} frames, "
          f"{time.perf_counter() - t0:.0f}s; curve in {args.out}")
    return final


if __name__ == "__main__":
    main()
