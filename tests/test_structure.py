"""The options object, accepted arguments that must act (no silent no-ops), the worker pool's
safety under concurrent readers, errors across the Ray boundary, and packaging."""
import inspect
import os
import pickle
import pydoc
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import collectors
from actors.errors import (CollectorError, EnvStepError, PolicyError, ReplayBufferUnavailable,
                           StartupTimeout)
from actors.options import CollectorOptions
from actors.coordination.restarts import RestartBudget
from actors.storage.samplers import PrioritizedSampler, WithoutReplacementSampler
from actors.coordination.worker_pool import WorkerPool
from collectors import (MultiaSyncDataCollector, MultiSyncDataCollector, RayReplayBuffer,
                        SyncDataCollector, aSyncDataCollector)
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env, faulty_counting_env
from conftest import alive_actor_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the options object -----------------------------------------------------------------------
def test_every_option_is_documented_in_help_and_signature():
    text = pydoc.render_doc(SyncDataCollector, renderer=pydoc.plaintext)
    params = inspect.signature(SyncDataCollector).parameters
    for name, field in CollectorOptions.model_fields.items():
        assert f"{name} (" in text, name
        assert field.description and field.description.split()[0] in text
        assert name in params
    assert "frames_per_batch (required)" in text
    for cls in (MultiSyncDataCollector, MultiaSyncDataCollector, collectors.aSyncDataCollector):
        assert "Keyword Args:" in cls.__doc__


def test_bad_options_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"sample_timeout_s must be positive; got -1"):
        CollectorOptions.build("X", frames_per_batch=10, sample_timeout_s=-1)
    with pytest.raises(ValueError, match=r"num_envs must be an integer; got 2.5"):
        CollectorOptions.build("X", frames_per_batch=10, num_envs=2.5)
    with pytest.raises(ValueError, match=r"worker_nice must be in 0..19"):
        CollectorOptions.build("X", frames_per_batch=10, worker_nice=40)
    with pytest.raises(ValueError, match=r"on_worker_error"):
        CollectorOptions.build("X", frames_per_batch=10, on_worker_error="ignore")
    with pytest.raises(ValueError, match=r"startup_timeout_s .*nothing waits forever"):
        CollectorOptions.build("X", frames_per_batch=10, startup_timeout_s=None)
    with pytest.raises(ValueError, match=r"reset_at_each_iter"):
        CollectorOptions.build("X", frames_per_batch=10, reset_at_each_iter="yes")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['frames'\]"):
        CollectorOptions.build("X", frames_per_batch=10, frames=3)
    opts = CollectorOptions.build("X", frames_per_batch=np.int64(10), total_frames=float("inf"),
                                  check_finite=True, max_frames_per_traj=-1, split_trajs=None)
    assert (opts.frames_per_batch, opts.total_frames, opts.check_finite) == (10, -1, "raise")
    assert opts.max_frames_per_traj is None and opts.split_trajs is False
    assert opts.for_workers().postproc is None


def test_options_reach_the_env_worker_typed():
    with SyncDataCollector(counting_env, frames_per_batch=4, max_restarts=7, name="opts-typed") as c:
        import ray

        handle = ray.get(c._driver.worker_handles.remote())[0]
        plan_options = ray.get(handle.__ray_call__.remote(lambda self: self.rollout.options))
    assert isinstance(plan_options, CollectorOptions)
    assert plan_options.max_restarts == 7 and plan_options.replay_buffer is None


# -- no silent no-ops ---------------------------------------------------------------------------
def test_reset_with_an_index_resets_only_those_envs():
    with SyncDataCollector(counting_env, frames_per_batch=6, num_envs=2,
                           create_env_kwargs={"episode_length": 100}) as c:
        c.next()  # each env at step 3
        c.reset(reset_idx=[False, True])
        b = c.next()
        assert b["observation"][:, 0, 0].tolist() == [3.0, 0.0]
        c.reset(index=torch.tensor([True, False]))
        b = c.next()
        assert b["observation"][:, 0, 0].tolist() == [0.0, 3.0]
        with pytest.raises(ValueError, match="one per env"):
            c.reset([True])


def test_multi_reset_idx_is_per_worker():
    with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=6,
                                create_env_kwargs={"episode_length": 100}) as c:
        c.next()
        c.reset([True, False])
        b = c.next()
        assert b["observation"][:, 0, 0].tolist() == [0.0, 3.0]


def test_set_seed_static_gives_every_env_the_same_seed():
    with SyncDataCollector("CartPole-v1", frames_per_batch=4, num_envs=3) as c:
        assert c.set_seed(7, static_seed=True) == 7
        first = c.next()["observation"][:, 0]
        assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])
        assert c.set_seed(7) == 9
        first = c.next()["observation"][:, 0]
        assert not torch.equal(first[0], first[1])


def test_update_policy_weights_refuses_what_it_does_not_do():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, policy, frames_per_batch=4) as c:
        with pytest.raises(TypeError):
            c.update_policy_weights_(not_an_argument=1)
        with pytest.raises(NotImplementedError, match="model_id"):
            c.update_policy_weights_(model_id="critic")
        with pytest.raises(ValueError, match="worker_ids"):
            c.update_policy_weights_(worker_ids=[3])
        c.update_policy_weights_(model_id="policy")
        assert c.next()["collector", "policy_version"].unique().tolist() == [1]


def test_shutdown_raise_on_error_reports_a_failing_env_close():
    c = SyncDataCollector(faulty_counting_env, frames_per_batch=4,
                          create_env_kwargs={"mode": "raise_close"}, name="close-raises")
    c.next()
    with pytest.raises(CollectorError, match="close raises"):
        c.shutdown()
    assert alive_actor_names("close-raises/") == []
    d = SyncDataCollector(faulty_counting_env, frames_per_batch=4,
                          create_env_kwargs={"mode": "raise_close"})
    d.shutdown(raise_on_error=False)  # asked not to: no error


def test_async_collectors_refuse_cat_results_and_sync_refuse_preemption():
    with pytest.raises(ValueError, match="cat_results is only for MultiSyncDataCollector"):
        MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=4, cat_results=-1)
    with pytest.raises(ValueError, match="cat_results is only for MultiSyncDataCollector"):
        aSyncDataCollector(counting_env, frames_per_batch=4, cat_results="stack")
    with MultiaSyncDataCollector(counting_env, num_workers=2, frames_per_batch=4,
                                 cat_results="stack") as c:  # TorchRL's async takes "stack"
        assert c.next().shape == (4,)
    with pytest.raises(ValueError, match="preemptive_threshold"):
        SyncDataCollector(counting_env, frames_per_batch=4, preemptive_threshold=0.5)
    with pytest.raises(TypeError, match="one env actor"):
        SyncDataCollector(counting_env, frames_per_batch=4, num_workers=2)


def test_exploration_type_is_applied_around_the_policy():
    from tensordict.nn import (InteractionType, ProbabilisticTensorDictModule,
                               ProbabilisticTensorDictSequential, TensorDictModule)

    def make():
        torch.manual_seed(0)
        net = TensorDictModule(nn.Linear(1, 2), in_keys=["observation"], out_keys=["logits"])
        net.module.weight.data.zero_()
        net.module.bias.data.copy_(torch.tensor([0.0, 0.4]))  # mode: action 1; random: both
        return ProbabilisticTensorDictSequential(net, ProbabilisticTensorDictModule(
            in_keys=["logits"], out_keys=["action"],
            distribution_class=torch.distributions.Categorical))

    with SyncDataCollector(counting_env, make(), frames_per_batch=200, seed=1) as c:
        assert set(c.next()["action"].tolist()) == {0, 1}  # TorchRL's default: random
    with SyncDataCollector(counting_env, make(), frames_per_batch=200,
                           exploration_type=InteractionType.DETERMINISTIC) as c:
        assert set(c.next()["action"].tolist()) == {1}
    with pytest.raises(ValueError, match="exploration_type"):
        SyncDataCollector(counting_env, make(), frames_per_batch=4, exploration_type="greedy")


def test_config_driver_num_cpus_is_applied():
    from ray.util.state import list_actors

    config = {"resources": {"driver": {"num_cpus": 0.5}}}
    with SyncDataCollector(counting_env, frames_per_batch=4, config=config, name="driver-cpus"):
        import ray

        (actor,) = [a for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                           filters=[("state", "=", "ALIVE")], detail=True)
                    if a.name == "driver-cpus/driver"]
        assert actor.required_resources.get("CPU") == 0.5


def test_without_replacement_drop_last():
    s = WithoutReplacementSampler(10, seed=0, drop_last=True)
    a, b = s.sample(4, None, 10)[0].tolist(), s.sample(4, None, 10)[0].tolist()
    c = s.sample(4, None, 10)[0].tolist()  # only 2 left in the epoch: dropped, a new one starts
    assert len(set(a + b)) == 8 and s.epoch == 2 and len(set(c)) == 4
    keep = WithoutReplacementSampler(10, seed=0)
    keep.sample(4, None, 10), keep.sample(4, None, 10)
    assert keep.sample(4, None, 10)[0].shape == (4,) and keep.epoch == 2
    with pytest.raises(ValueError, match="drop_last"):
        RayReplayBuffer(10, sampler="random", drop_last=True)


def test_prioritized_sum_tree_matches_the_formula():
    n = 50
    s = PrioritizedSampler(n, seed=0, alpha=0.7, beta=0.5, eps=1e-6)
    s.on_write(torch.arange(n), None, n)
    prio = torch.rand(n, dtype=torch.float64) + 0.01
    s.update_priority(torch.arange(n), prio)
    index, weight = s.sample(200_000, None, n)
    p = (prio + 1e-6) ** 0.7
    probs = p / p.sum()
    freq = torch.bincount(index, minlength=n).double() / index.numel()
    assert (freq - probs).abs().max() < 0.005
    expect = (n * probs[index]) ** -0.5 / (n * probs.min()) ** -0.5
    assert torch.allclose(weight.double(), expect, rtol=1e-5)
    state, tensors = s.state(), s.tensors()
    t = PrioritizedSampler(n, seed=0, alpha=0.7, beta=0.5, eps=1e-6)
    t.load(state, tensors, None, n)
    assert t.tree.total == pytest.approx(s.tree.total)


# -- the worker pool under concurrent readers ----------------------------------------------------
class FakeHandle:
    def __init__(self, index, weights):
        self.index, self.weights, self.killed = index, weights, False

    def send(self, weights):
        if not self.killed:
            self.weights = weights


def test_worker_replacement_is_safe_against_concurrent_weight_updates():
    born = []

    def spawn(i, *, weights, **_):
        time.sleep(0.001)  # widen the window between reading the weights and installing
        h = FakeHandle(i, weights)
        born.append(h)
        return h

    def kill(h):
        h.killed = True

    pool = WorkerPool("pool", 3, spawn=spawn, kill=kill, wait_ready=lambda h, t: True,
                      budget=lambda: RestartBudget(10**9, 60.0))
    pool.start()
    stop = threading.Event()
    errors = []

    def replacer():
        while not stop.is_set():
            for i in range(3):
                pool.replace(i, "test")

    final = []

    def updater():
        try:
            version = 0
            while version < 300 or len(born) < 40:
                version += 1
                for i, h in pool.set_weights(version, version):
                    h.send(version)
                    if h.killed:
                        assert not pool.is_current(i, h)  # a killed handle was replaced
            final.append(version)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=replacer), threading.Thread(target=updater)]
    for t in threads:
        t.start()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert not errors
    assert len(born) >= 40
    assert [h.weights for _, h in pool.alive()] == final * 3  # no update was missed


def test_restart_budget_trips_whatever_the_backoff():
    clock = [0.0]
    budget = RestartBudget(3, window_s=60.0, backoff_s=12.0, clock=lambda: clock[0])
    waits = []
    for _ in range(10):
        wait = budget.failed()
        if wait is None:
            break
        waits.append(wait)
        clock[0] += wait + 1.0  # back off, then fail again after a second of work
    assert waits == [12.0, 24.0, 30.0]  # doubling, capped
    assert wait is None  # the 4th failure within 3 s of working time


# -- errors ---------------------------------------------------------------------------------------
def test_errors_pickle_with_their_attributes():
    err = pickle.loads(pickle.dumps(CollectorError("boom", worker=3)))
    assert isinstance(err, CollectorError) and err.worker == 3 and str(err) == "boom"
    err = pickle.loads(pickle.dumps(StartupTimeout("slow", worker=1)))
    assert isinstance(err, TimeoutError) and isinstance(err, CollectorError)
    err = pickle.loads(pickle.dumps(EnvStepError(2, 5, "step", ValueError("bad"))))
    assert (err.env_index, err.seed, err.phase) == (2, 5, "step") and "ValueError" in err.tb
    assert issubclass(PolicyError, collectors.RayCollectorsError)
    assert collectors.ReplayBufferUnavailable is ReplayBufferUnavailable


def test_replay_buffer_is_a_context_manager():
    with RayReplayBuffer(100, batch_size=4, name="rb-ctx"):
        assert alive_actor_names("rb-ctx/") == ["rb-ctx/replay-buffer"]
    assert alive_actor_names("rb-ctx/") == []


# -- names and packaging ----------------------------------------------------------------------------
def test_actor_bodies_are_not_public():
    public = set(dir(collectors))
    assert not public & {"Driver", "EnvWorker", "ReplayBufferActor", "Rollout", "WorkerPool"}
    from collectors import base, replay_buffer

    for module in (base, replay_buffer):
        assert not hasattr(module, "Driver") and not hasattr(module, "ReplayBufferActor")


def test_no_bench_subcommand_and_no_path_hacks():
    out = subprocess.run([sys.executable, "-m", "collectors", "bench"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and "invalid choice: 'bench'" in out.stderr
    for folder in ("collectors", "actors", "scripts"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, folder, name)) as fh:
                    assert "sys.path.insert" not in fh.read(), name


def test_wheel_installs_and_runs_the_demo(tmp_path):
    wheel_dir, venv = tmp_path / "wheel", tmp_path / "venv"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheel_dir), ROOT], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("ray_collectors-*.whl")
    # a bare venv that sees this interpreter's packages (the dependencies) behind its own, so
    # the test also passes when it runs inside a virtual environment; the repo is not on its path
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    theirs = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    repo = os.path.realpath(ROOT)
    ours = [p for p in dict.fromkeys(sys.path) if p and os.path.isdir(p)
            and not os.path.realpath(p).startswith(repo)]  # what this interpreter imports from
    with open(os.path.join(theirs, "outer-packages.pth"), "w") as fh:
        fh.write("\n".join(ours) + "\n")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    demo = (
        "import collectors, actors, actors.shm.handoff, actors.stepping.env_worker\n"
        "assert collectors.__file__.startswith(%r), collectors.__file__\n"
        "from collectors import SyncDataCollector\n"
        "c = SyncDataCollector('CartPole-v1', frames_per_batch=200, total_frames=1000, seed=0)\n"
        "for batch in c:\n"
        "    print(batch.batch_size, batch.names)\n"
        "    break\n"
        "c.shutdown()\n" % str(venv))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([py, "-c", demo], capture_output=True, text=True, cwd=str(tmp_path),
                         env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "torch.Size([200]) ['time']" in out.stdout


# -- weights follow the trainer's policy, as TorchRL's shared weights do ---------------------------
class Scaled(nn.Module):
    """A linear layer whose output is scaled by a buffer (like EGreedyModule's annealed eps)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        return (self.linear(x) * self.scale).argmax(-1)


def test_in_place_changes_reach_the_next_batch_without_an_update_call():
    policy = Scaled()
    with torch.no_grad():
        policy.linear.weight.zero_()
        policy.linear.bias.copy_(torch.tensor([0.0, 1.0]))
    with MultiSyncDataCollector(counting_env, policy, num_workers=2, frames_per_batch=8) as c:
        b = c.next()
        assert (b["action"] == 1).all() and (b["collector", "policy_version"] == 0).all()
        assert (c.next()["collector", "policy_version"] == 0).all()  # unchanged: nothing sent
        with torch.no_grad():
            policy.scale.fill_(-1.0)  # a buffer changed in place
        b = c.next()
        assert (b["action"] == 0).all() and (b["collector", "policy_version"] == 1).all()
        policy.load_state_dict({"linear.weight": torch.zeros(2, 1), "linear.bias": torch.tensor([0.0, -1.0]),
                                "scale": torch.tensor(-1.0)})
        b = c.next()
        assert (b["action"] == 1).all() and (b["collector", "policy_version"] == 2).all()
        opt = torch.optim.SGD(policy.parameters(), lr=10.0)
        loss = -policy.linear(torch.ones(1, 1))[0, 1]  # with scale -1: pushes action 1 down
        loss.backward()
        opt.step()
        b = c.next()
        assert (b["action"] == 0).all() and (b["collector", "policy_version"] == 3).all()


def test_automatic_sync_can_be_turned_off():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, policy, frames_per_batch=4, auto_sync_weights=False) as c:
        with torch.no_grad():
            policy[0].bias.add_(1.0)
        assert (c.next()["collector", "policy_version"] == 0).all()


def test_background_collection_follows_the_trainer_policy():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with torch.no_grad():
        policy[0].weight.zero_()
        policy[0].bias.copy_(torch.tensor([1.0, 0.0]))
    rb = RayReplayBuffer(100_000, batch_size=64)
    c = SyncDataCollector(counting_env, policy, frames_per_batch=50, replay_buffer=rb)
    try:
        c.start()
        with torch.no_grad():
            policy[0].bias.copy_(torch.tensor([0.0, 1.0]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            td = rb.sample(64)
            new = td["collector", "policy_version"] >= 1
            if new.any():
                assert (td["action"][new] == 1).all()
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no frame collected with the changed weights within 60 s")
        assert c.policy_version >= 1
    finally:
        c.async_shutdown()
        rb.shutdown()


def test_env_actor_modules_leave_torch_and_tensordict_out_of_start_up():
    """An env actor imports these modules before its first batch; torch and tensordict cost
    seconds to import and a gymnasium env with a random policy needs neither (importing them
    here once added 3.5 s to the first batch)."""
    script = ("import sys\nimport actors.stepping.env_worker, actors.stepping.vector_rollout, actors.stepping.compact\n"
              "print(sorted(m for m in ('torch', 'tensordict') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
