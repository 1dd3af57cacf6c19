"""TorchRL 0.14.1's collector arguments: each accepted at TorchRL's default, the ones we
implement doing what they say, the others refused by name."""
import inspect
import threading

import pytest
import torch
from torch import nn

from collectors import (Collector, MultiaSyncDataCollector, MultiSyncDataCollector, RayCollector,
                        RayReplayBuffer, SyncDataCollector, aSyncDataCollector)
from collectors.policies import ArgmaxLayer
from collectors.testing import counting_env

torchrl_collectors = pytest.importorskip("torchrl.collectors")

REQUIRED = {"self", "create_env_fn", "policy", "frames_per_batch", "total_frames", "args", "kwargs"}


def torchrl_defaults(cls) -> dict:
    from torchrl.collectors._multi_base import MultiCollector

    init = cls.__init__
    params = inspect.signature(init).parameters
    if set(params) <= {"self", "args", "kwargs"}:  # forwards everything to MultiCollector
        params = inspect.signature(MultiCollector.__init__).parameters
    return {name: p.default for name, p in params.items()
            if name not in REQUIRED and p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("theirs, ours", [
    ("Collector", SyncDataCollector), ("MultiSyncCollector", MultiSyncDataCollector),
    ("MultiAsyncCollector", MultiaSyncDataCollector), ("AsyncCollector", aSyncDataCollector)])
def test_every_torchrl_argument_is_accepted_at_its_default(theirs, ours):
    defaults = torchrl_defaults(getattr(torchrl_collectors, theirs))
    assert len(defaults) > 15
    if ours in (SyncDataCollector, aSyncDataCollector):
        defaults.pop("num_workers", None)
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with ours(counting_env, policy, frames_per_batch=8, total_frames=16, **defaults) as c:
        batches = list(c)
    assert sum(b.numel() for b in batches) == 16


def test_values_that_would_change_behaviour_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="weight_updater"):
        SyncDataCollector(counting_env, frames_per_batch=8, weight_updater=object())
    with pytest.raises(NotImplementedError, match="interruptor"):  # TorchRL's multi take none
        MultiSyncDataCollector([counting_env] * 2, frames_per_batch=8, interruptor=object())
    with pytest.raises(TypeError, match="collection_stopped"):
        SyncDataCollector(counting_env, frames_per_batch=8, interruptor=object())
    with pytest.raises(ValueError, match="reset_when_done=False"):  # as TorchRL 0.14
        MultiaSyncDataCollector([counting_env] * 2, frames_per_batch=8, reset_when_done=False)
    with pytest.raises(NotImplementedError, match="backend='submitit'"):
        Collector(counting_env, frames_per_batch=8, backend="submitit")


def test_collector_front_door_builds_multi_collectors():
    with Collector(counting_env, frames_per_batch=8, total_frames=16, num_collectors=2, sync=True) as c:
        assert isinstance(c, MultiSyncDataCollector) and c.num_workers == 2
        assert c.next().batch_size == torch.Size([2, 4])
    with Collector(counting_env, frames_per_batch=8, num_collectors=2, backend="ray") as c:
        assert isinstance(c, MultiaSyncDataCollector)  # sync=None: async, as TorchRL
    with Collector(counting_env, frames_per_batch=8, backend="ray") as c:
        assert type(c) is SyncDataCollector
    with pytest.raises(ValueError, match="num_collectors"):
        Collector(counting_env, frames_per_batch=8, num_collectors=0)
    with pytest.raises(ValueError, match="sync is for several"):
        Collector(counting_env, frames_per_batch=8, sync=True)


def test_ray_collector_alias_takes_torchrl_names():
    with RayCollector(counting_env, frames_per_batch=8, num_collectors=2, sync=True,
                      remote_configs={"num_cpus": 0.5}, collector_kwargs={"seed": 1}) as c:
        assert isinstance(c, MultiSyncDataCollector) and c.next().batch_size == (2, 4)
    with pytest.raises(ValueError, match="divisible"):
        RayCollector(counting_env, frames_per_batch=9, num_collectors=2, sync=True)
    with pytest.raises(NotImplementedError, match="num_workers_per_collector"):
        RayCollector(counting_env, frames_per_batch=8, num_workers_per_collector=2)


class LockedPolicy(nn.Module):
    """Holds a lock: it cannot be pickled, so it must be built inside each env actor."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.linear = nn.Linear(1, 2)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.linear(x).argmax(-1)


def test_policy_factory_builds_the_policy_in_each_actor():
    with pytest.raises(TypeError, match="pickled"):
        SyncDataCollector(counting_env, LockedPolicy(), frames_per_batch=8)
    with MultiSyncDataCollector(counting_env, policy_factory=LockedPolicy, num_workers=2,
                                frames_per_batch=8) as c:
        assert (c.next()["action"] == 1).all()
        weights = {"linear.weight": torch.zeros(2, 1), "linear.bias": torch.tensor([1.0, 0.0]),}
        with pytest.raises(TypeError, match="pass the weights"):
            c.update_policy_weights_()
        c.update_policy_weights_(weights)
        b = c.next()
        assert (b["action"] == 0).all() and (b["collector", "policy_version"] == 1).all()
    # both (TorchRL): the factory builds the actors' policies, the policy here is the weights'
    # source, never pickled
    here = LockedPolicy()
    with MultiSyncDataCollector(counting_env, here, policy_factory=LockedPolicy, num_workers=2,
                                frames_per_batch=8, auto_sync_weights=False) as c:
        assert (c.next()["action"] == 1).all()
        with torch.no_grad():
            here.linear.bias.copy_(torch.tensor([1.0, 0.0]))
        c.update_policy_weights_()
        assert (c.next()["action"] == 0).all()


def test_devices_cpu_accepted_cuda_checked():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, policy, frames_per_batch=8, device=torch.device("cpu"),
                           storing_device="cpu", env_device="cpu", policy_device="cpu") as c:
        assert c.next().device in (None, torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            SyncDataCollector(counting_env, policy, frames_per_batch=8, device="cuda")


def test_a_cuda_policy_shares_the_clusters_gpus_and_runs_on_the_one_ray_gives(monkeypatch):
    """(The CUDA runs themselves are in test_cuda.py.) Without num_gpus, workers split the
    cluster's GPUs, one each at most; inside an actor "cuda:i" names the GPU Ray gave it."""
    import ray

    from actors.options import CollectorOptions
    from actors.stepping.policy_runner import local_device
    from collectors.resources import gpu_share, worker_gpus
    from collectors.config import load_config

    for gpus, workers, share in [(1, 1, 1.0), (1, 2, 0.5), (1, 3, 0.3333), (4, 2, 1.0), (0, 2, 1.0)]:
        monkeypatch.setattr(ray, "cluster_resources", lambda gpus=gpus: {"CPU": 8, "GPU": gpus})
        assert gpu_share(workers) == share
    # (model_copy: a CUDA device would not validate on a machine without one)
    on_cuda = CollectorOptions(frames_per_batch=8, num_workers=2).model_copy(
        update={"policy_device": "cuda:0"})
    config = load_config(None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8, "GPU": 1})
    assert worker_gpus(on_cuda, config) == 0.5  # two workers share the one GPU
    assert worker_gpus(on_cuda.model_copy(update={"num_gpus": 1.0}), config) == 1.0
    config = load_config({"resources": {"env_worker": {"num_gpus": 0.25}}})  # a config's choice is kept
    assert worker_gpus(on_cuda, config) is None
    assert config.worker_options(num_gpus=worker_gpus(on_cuda, config))["num_gpus"] == 0.25
    assert worker_gpus(CollectorOptions(frames_per_batch=8), load_config(None)) is None
    for given, asked, runs_on in [([], "cuda:1", "cuda:1"), ([1], "cuda:1", "cuda:0"),
                                  ([0, 1], "cuda:1", "cuda:1"), ([2], "cuda", "cuda:0"),
                                  ([1], "cpu", "cpu")]:
        monkeypatch.setattr(ray, "get_gpu_ids", lambda given=given: given)
        assert local_device(asked) == runs_on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_policy_runs_on_cuda_and_batches_are_stored_where_asked():
    policy = nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, policy, frames_per_batch=8, policy_device="cuda",
                           storing_device="cuda") as c:
        b = c.next()
    assert b["action"].device.type == "cuda"


def test_compile_policy_compiles_in_the_actor():
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2), ArgmaxLayer())
    with SyncDataCollector(counting_env, policy, frames_per_batch=20, seed=0,
                           compile_policy={"backend": "eager"}) as c:
        compiled = c.next()
        import ray

        handle = ray.get(c._driver.worker_handles.remote())[0]
        kind = ray.get(handle.__ray_call__.remote(lambda self: type(self.rollout.runner.policy).__name__))
    with SyncDataCollector(counting_env, policy, frames_per_batch=20, seed=0) as c:
        plain = c.next()
    assert kind == "OptimizedModule"
    assert torch.equal(compiled["action"], plain["action"])


def test_track_traj_ids_and_hooks():
    calls = []
    with SyncDataCollector(counting_env, frames_per_batch=8, total_frames=16, track_traj_ids=False,
                           pre_collect_hook=lambda: calls.append("pre"),
                           post_collect_hook=lambda td: calls.append(td.numel()),
                           init_fn=lambda: None) as c:
        batches = list(c)
    assert "collector" not in batches[0].keys()  # as TorchRL: no bookkeeping entries at all
    assert calls == ["pre", 8, "pre", 8]


def test_options_a_ray_replay_buffer_would_skip_are_refused():
    rb = RayReplayBuffer(1000)
    try:
        for key, value in [("postproc", lambda td: td), ("split_trajs", True),
                           ("set_truncated", True), ("track_traj_ids", False)]:
            with pytest.raises(ValueError, match=key):
                SyncDataCollector(counting_env, frames_per_batch=8, replay_buffer=rb, **{key: value})
    finally:
        rb.shutdown()


def test_shutdown_of_a_collector_whose_constructor_raised_is_a_no_op():
    """The clean-up after a failing test (conftest) shuts down every collector object it finds,
    including one whose constructor raised before any actor started."""
    import gc

    with pytest.raises(TypeError, match="pickled") as info:  # (its traceback keeps the object)
        SyncDataCollector(counting_env, LockedPolicy(), frames_per_batch=8)
    half_built = [o for o in gc.get_objects() if type(o) is SyncDataCollector and o._driver is None]
    assert info.value is not None
    assert half_built
    for c in half_built:
        c.shutdown()
        c.shutdown()  # idempotent
    SyncDataCollector.__new__(SyncDataCollector).shutdown()  # raised before any attribute was set


def test_extend_buffer_false_adds_each_step_as_torchrl_does():
    """TorchRL's Collector(extend_buffer=False) adds every step to the buffer on its own (in
    time order); ours fills a TorchRL buffer the same way, frame for frame; the options that
    need whole batches are refused with it, and a RayReplayBuffer is refused by name."""
    from tensordict.nn import TensorDictModule
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.envs import GymWrapper

    from collectors.testing import CountingEnv

    class Parity(nn.Module):
        def forward(self, obs):
            return obs[..., 0].long() % 2

    policy = TensorDictModule(Parity(), in_keys=["observation"], out_keys=["action"])
    theirs_rb = ReplayBuffer(storage=LazyTensorStorage(100))
    env = lambda: GymWrapper(CountingEnv(5), categorical_action_encoding=True)  # noqa: E731
    theirs = torchrl_collectors.Collector(env, policy, frames_per_batch=10, total_frames=30,
                                          replay_buffer=theirs_rb, extend_buffer=False)
    assert list(theirs) == [None] * 3
    theirs.shutdown()
    ours_rb = ReplayBuffer(storage=LazyTensorStorage(100))
    added = []
    add = ours_rb.add
    ours_rb.add = lambda td: added.append(td.batch_size) or add(td)
    with SyncDataCollector(counting_env, policy, frames_per_batch=10, total_frames=30,
                           replay_buffer=ours_rb, extend_buffer=False) as c:
        assert list(c) == [None] * 3
    assert added == [torch.Size([])] * 30  # one add per step
    n = len(theirs_rb)
    assert n == len(ours_rb) == 30
    for key in ("observation", ("next", "observation"), ("next", "done"), ("collector", "traj_ids")):
        assert torch.equal(theirs_rb[:n][key].reshape(n, -1).float(),
                           ours_rb[:n][key].reshape(n, -1).float()), key
    for bad in ({"split_trajs": True}, {"postproc": lambda td: td}, {"return_same_td": True}):
        with pytest.raises(ValueError, match="extend_buffer=False"):
            SyncDataCollector(counting_env, frames_per_batch=10, replay_buffer=ours_rb,
                              extend_buffer=False, **bad)
    with RayReplayBuffer(10) as ray_rb, \
            pytest.raises(NotImplementedError, match="extend_buffer=False with a RayReplayBuffer"):
        SyncDataCollector(counting_env, frames_per_batch=10, replay_buffer=ray_rb,
                          extend_buffer=False)


def test_extend_buffer_false_steps_of_several_workers_in_time_order():
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    rb = ReplayBuffer(storage=LazyTensorStorage(100))
    with MultiSyncDataCollector(counting_env, num_workers=2, frames_per_batch=10, total_frames=10,
                                replay_buffer=rb, extend_buffer=False) as c:
        assert list(c) == [None]
    obs = rb[:10]["observation"][:, 0]
    worker = rb[:10]["collector", "worker_id"]
    assert worker.tolist() == [0, 1] * 5  # step t of worker 0, then of worker 1
    assert obs[0::2].tolist() == obs[1::2].tolist() == [0, 1, 2, 3, 4]


def test_worker_idx_is_kept_as_torchrl_keeps_it():
    """TorchRL's collectors keep ``worker_idx`` as an attribute (their weight-sync schemes read
    it); ours too, checked as a non-negative int."""
    theirs = torchrl_collectors.Collector(lambda: __import__("torchrl.envs", fromlist=["GymEnv"]).GymEnv(
        "CartPole-v1"), frames_per_batch=8, total_frames=8, worker_idx=3)
    assert theirs.worker_idx == 3
    theirs.shutdown()
    with SyncDataCollector(counting_env, frames_per_batch=8, worker_idx=3) as c:
        assert c.worker_idx == 3 and c.next().numel() == 8
    with SyncDataCollector(counting_env, frames_per_batch=8) as c:
        assert c.worker_idx is None
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="worker_idx"):
            SyncDataCollector(counting_env, frames_per_batch=8, worker_idx=bad)
