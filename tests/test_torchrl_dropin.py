"""What a TorchRL user passes to TorchRL's collectors works on ours with only the import changed:
batched envs, lenient action checks, nested and multi-key envs, plain modules wrapped as TorchRL
wraps them, the policy's own exceptions, a spec-less RandomPolicy, StepCounter conflicts."""
import functools

import pytest
import torch
from torch import nn

torchrl = pytest.importorskip("torchrl", reason="install the torchrl extra")

from tensordict.nn import TensorDictModule  # noqa: E402
from torchrl.collectors import Collector as TorchRLCollector  # noqa: E402
from torchrl.envs import GymEnv, SerialEnv, StepCounter, TransformedEnv  # noqa: E402
from torchrl.modules import RandomPolicy  # noqa: E402
from torchrl.testing.mocking_classes import (ContinuousActionVecMockEnv, CountingEnv,  # noqa: E402
                                             CountingEnvCountPolicy, DiscreteActionVecMockEnv,
                                             DiscreteActionVecPolicy, MultiKeyCountingEnv,
                                             MultiKeyCountingEnvPolicy, NestedCountingEnv)

from collectors import (MultiaSyncDataCollector, MultiSyncDataCollector,  # noqa: E402
                        PolicyOutputError, SyncDataCollector)


def batches(collector, n=2):
    out = []
    try:
        for batch in collector:
            out.append(batch)
            if len(out) == n:
                break
    finally:
        collector.shutdown()
    return out


def counting(batch_size=()):
    return CountingEnv(max_steps=3, batch_size=batch_size)


def count_policy(env):
    return CountingEnvCountPolicy(env.full_action_spec[env.action_key], env.action_key)


# -- batched envs ----------------------------------------------------------------------------
def serial_counting():
    return SerialEnv(3, counting)


@pytest.mark.parametrize("make", [serial_counting, functools.partial(counting, (3,))],
                         ids=["SerialEnv", "batch_size"])
def test_batched_env_gives_env_by_time_batches_like_torchrl(make):
    env = make()
    policy = count_policy(env)
    with pytest.warns(UserWarning, match="rounded up to 12"):
        ours = SyncDataCollector(make, policy, frames_per_batch=10, total_frames=24)
    assert ours.requested_frames_per_batch == 12
    got = batches(ours)
    theirs = TorchRLCollector(make, policy, frames_per_batch=12, total_frames=24)
    want = list(theirs)
    theirs.shutdown()
    for b, w in zip(got, want):
        assert b.batch_size == w.batch_size == (3, 4) and b.names == [None, "time"]
        assert torch.equal(b["observation"], w["observation"])
        assert torch.equal(b["next", "done"], w["next", "done"])
    # counting to 4 (done once the count passes max_steps=3): a new trajectory every 4 frames
    ids = torch.cat([b["collector", "traj_ids"] for b in got], dim=1)
    assert ids[:, :4].tolist() == [[0] * 4, [1] * 4, [2] * 4]
    assert len(set(ids[:, 4:].flatten().tolist())) == 3 and ids[:, 4:].min() > 2


def test_batched_env_instance_and_multi_collector_stack_workers():
    env = SerialEnv(2, counting)
    got = batches(MultiSyncDataCollector([env, env], count_policy(env),
                                         frames_per_batch=16, total_frames=32), 1)
    assert got[0].batch_size == (2, 2, 4)
    ids = got[0]["collector", "traj_ids"][:, :, 0].flatten().tolist()
    assert len(set(ids)) == 4  # four envs, four trajectories


def test_batched_env_with_num_envs_is_refused():
    with pytest.raises(ValueError, match="num_envs=1 with a batched env"):
        SyncDataCollector(serial_counting, None, frames_per_batch=12, num_envs=2)


# -- the action check ------------------------------------------------------------------------
def test_actions_the_env_accepts_are_accepted():
    # a bool one-hot spec given int64 one-hot actions (TorchRL's own mock policy)
    batches(SyncDataCollector(DiscreteActionVecMockEnv, DiscreteActionVecPolicy(),
                              frames_per_batch=8, total_frames=8), 1)
    # bounded continuous actions out of the bounds: the env's business, as on TorchRL
    env = ContinuousActionVecMockEnv()
    linear = nn.Linear(env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1])
    with torch.no_grad():
        linear.bias.fill_(100.0)
    got = batches(SyncDataCollector(ContinuousActionVecMockEnv, TensorDictModule(
        linear, in_keys=["observation"], out_keys=["action"]), frames_per_batch=8,
        total_frames=8), 1)
    assert (got[0]["action"] > 1).any()


def test_an_index_action_on_a_one_hot_env_is_refused_with_the_fix():
    index_policy = TensorDictModule(lambda obs: torch.zeros(obs.shape[:-1], dtype=torch.int64),
                                    in_keys=["observation"], out_keys=["action"])
    with pytest.raises(PolicyOutputError, match="one-hot.*categorical_action_encoding"):
        SyncDataCollector(lambda: GymEnv("CartPole-v1"), index_policy, frames_per_batch=8)


# -- nested and multi-key envs ---------------------------------------------------------------
def test_nested_action_reward_and_done_keys():
    make = functools.partial(NestedCountingEnv, max_steps=3, nest_obs_action=True,
                             nest_done=True, nest_reward=True)
    env = make()
    assert env.action_key != "action" and "done" not in env.done_keys
    got = batches(SyncDataCollector(make, count_policy(env), frames_per_batch=8, total_frames=16))
    ids = torch.cat([b["collector", "traj_ids"] for b in got]).tolist()
    assert ids == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4  # any nested done ends the trajectory


def test_several_action_keys():
    env = MultiKeyCountingEnv(max_steps=3)
    policy = MultiKeyCountingEnvPolicy(full_action_spec=env.full_action_spec)
    got = batches(SyncDataCollector(functools.partial(MultiKeyCountingEnv, max_steps=3), policy,
                                    frames_per_batch=8, total_frames=8), 1)
    for key in env.action_keys:
        assert key in got[0].keys(True, True)


# -- plain modules, wrapped as TorchRL wraps them --------------------------------------------
class SeveralOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.LazyLinear(7)

    def forward(self, observation):
        out = self.linear(observation)
        return out, out.sum(-1), out.max(-1).values


class WrongArgs(nn.Module):
    def forward(self, observation, other_stuff):
        return observation


def test_module_arguments_name_observations_and_extra_outputs_are_kept():
    got = batches(SyncDataCollector(ContinuousActionVecMockEnv, SeveralOutputs(),
                                    frames_per_batch=8, total_frames=8), 1)
    assert {"action", "output1", "output2"} <= set(got[0].keys())
    assert torch.allclose(got[0]["output1"], got[0]["action"].sum(-1))


def test_module_whose_arguments_are_not_observations_is_refused_naming_them():
    with pytest.raises(PolicyOutputError, match=r"\['observation', 'other_stuff'\]"):
        SyncDataCollector(ContinuousActionVecMockEnv, WrongArgs(), frames_per_batch=8)


class Raises(nn.Module):
    def forward(self, observation):
        raise TypeError("this policy is broken")


def test_the_policys_own_exception_reaches_the_user_unchanged():
    with pytest.raises(TypeError, match="this policy is broken") as info:
        SyncDataCollector(ContinuousActionVecMockEnv, Raises(), frames_per_batch=8)
    assert any("first observation" in note for note in info.value.__notes__)


def test_random_policy_without_spec_takes_the_envs():
    policy = RandomPolicy()
    got = batches(SyncDataCollector(ContinuousActionVecMockEnv, policy, frames_per_batch=8,
                                    total_frames=8), 1)
    assert got[0]["action"].std() > 0


# -- small differences -----------------------------------------------------------------------
def test_init_random_frames_minus_one_means_none():
    c = SyncDataCollector(counting, count_policy(counting()), frames_per_batch=4,
                          total_frames=4, init_random_frames=-1)
    assert c.init_random_frames == 0
    got = batches(c, 1)
    assert (got[0]["action"] == 1).all()  # the policy's actions, not random ones


def test_max_frames_per_traj_on_a_torchrl_env():
    got = batches(SyncDataCollector(functools.partial(CountingEnv, max_steps=100),
                                    CountingEnvCountPolicy(CountingEnv().action_spec),
                                    frames_per_batch=6, total_frames=6, max_frames_per_traj=2), 1)
    assert got[0]["step_count"].flatten().tolist() == [0, 1, 0, 1, 0, 1]
    assert got[0]["next", "truncated"].flatten().tolist() == [False, True] * 3
    with pytest.raises(ValueError, match="step_count"):
        SyncDataCollector(lambda: TransformedEnv(CountingEnv(), StepCounter()), None,
                          frames_per_batch=4, max_frames_per_traj=5)


def _count_until_two(observation):
    if (observation >= 2).any():
        raise KeyError("no such entry")
    return torch.ones_like(observation, dtype=torch.bool)


@pytest.mark.parametrize("shared_memory", [None, False])
def test_the_policys_exception_in_an_env_actor_is_raised_as_itself(shared_memory):
    policy = TensorDictModule(_count_until_two, in_keys=["observation"], out_keys=["action"])
    c = SyncDataCollector(counting, policy, frames_per_batch=4, shared_memory=shared_memory)
    with pytest.raises(KeyError, match="no such entry") as info:
        c.next()
    assert type(info.value).__name__ == "KeyError"
    assert "PolicyError" in str(info.value.__cause__)  # ours, with the worker's traceback
    c.shutdown()


# -- options and methods TorchRL users call --------------------------------------------------
def test_return_same_td_writes_every_batch_into_one_tensordict():
    from collectors.testing import counting_env

    c = SyncDataCollector(counting_env, frames_per_batch=4, total_frames=12, return_same_td=True)
    seen = []
    for batch in c:
        seen.append((batch, batch["observation"].flatten().tolist()))
    c.shutdown()
    assert all(b is seen[0][0] for b, _ in seen)  # one object...
    assert [obs for _, obs in seen] == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]]  # ...new data
    assert seen[0][0]["observation"].flatten().tolist() == [3, 4, 0, 1]  # keep only clones


def test_multi_and_async_collectors_lend_the_trainers_threads_as_torchrl_does():
    """TorchRL 0.14.1's multi and async collectors take one torch thread of the trainer per
    worker (at least 1 is left) and give them back at shutdown, up to the count at import; its
    single collector leaves them. Torch's spinning threads would starve the env actors."""
    from collectors import SyncDataCollector, aSyncDataCollector, trainer_threads
    from collectors.testing import counting_env

    before = torch.get_num_threads()
    cap = trainer_threads.THREADS_AT_IMPORT
    try:
        two, three = [counting_env] * 2, [counting_env] * 3
        for make, during, after in (
                (lambda: MultiSyncDataCollector(two, frames_per_batch=4), 2, min(cap, 4)),
                (lambda: MultiaSyncDataCollector(three, frames_per_batch=4), 1, min(cap, 4)),
                (lambda: aSyncDataCollector(counting_env, frames_per_batch=4), 3, min(cap, 4)),
                (lambda: SyncDataCollector(counting_env, frames_per_batch=4), 4, 4)):
            torch.set_num_threads(4)
            with make():
                assert torch.get_num_threads() == during
            assert torch.get_num_threads() == after
    finally:
        torch.set_num_threads(before)


def test_a_collector_dropped_unclosed_gives_the_trainers_threads_back():
    import gc

    from collectors import trainer_threads
    from collectors.testing import counting_env

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        c = MultiSyncDataCollector([counting_env] * 2, frames_per_batch=4)
        assert torch.get_num_threads() == 1
        del c
        gc.collect()
        assert torch.get_num_threads() == min(trainer_threads.THREADS_AT_IMPORT, 3)
    finally:
        torch.set_num_threads(before)


def test_num_threads_and_num_sub_threads():
    from collectors.testing import counting_env

    before = torch.get_num_threads()
    try:
        c = MultiSyncDataCollector([counting_env] * 2, frames_per_batch=4, num_threads=1,
                                   num_sub_threads=2)
        assert torch.get_num_threads() == 1
        import ray

        handles = ray.get(c._driver.worker_handles.remote())
        threads = ray.get([h.__ray_call__.remote(lambda self: torch.get_num_threads())
                           for h in handles])
        c.shutdown()
        assert threads == [2, 2]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_sub_threads"):
        SyncDataCollector(counting_env, frames_per_batch=4, num_sub_threads=0)


def test_hooks_are_settable_and_stats_per_worker():
    from collectors.testing import counting_env

    c = MultiSyncDataCollector([counting_env] * 2, frames_per_batch=4, total_frames=8)
    calls = []
    c.pre_collect_hook = lambda: calls.append("pre")
    c.post_collect_hook = lambda batch: calls.append(batch.numel())
    with pytest.raises(TypeError, match="callable"):
        c.post_collect_hook = 3
    list(c)
    assert calls == ["pre", 4, "pre", 4]
    per = c.stats(workers="per_worker")
    assert per["workers"] == 2 and per["worker_0/delivered"] == per["worker_1/delivered"] == 4
    assert "frames_per_s" not in per and "worker_1/batches" in c.stats(workers="both")
    with pytest.raises(ValueError, match="per_worker"):
        c.stats(workers="all")
    c.shutdown()


def test_track_policy_version_writes_torchrl_entries():
    from collectors.testing import counting_env

    got = batches(SyncDataCollector(counting_env, frames_per_batch=4, total_frames=4,
                                    track_policy_version=True), 1)
    version = got[0]["collector", "policy_version"]
    assert torch.equal(got[0]["policy_version"], version)
    assert torch.equal(got[0]["next", "policy_version"], version)
    plain = batches(SyncDataCollector(counting_env, frames_per_batch=4, total_frames=4), 1)
    assert "policy_version" not in plain[0].keys()


def test_non_tensor_entries_stay_in_the_batch():
    from tensordict import NonTensorStack
    from torchrl.testing.mocking_classes import CountingEnvWithString

    for shared_memory in (None, False):
        got = batches(SyncDataCollector(CountingEnvWithString, None, frames_per_batch=6,
                                        total_frames=12, shared_memory=shared_memory))
        for b in got:
            now, after = b.get("string"), b.get(("next", "string"))
            assert isinstance(now, NonTensorStack) and now.batch_size == b.batch_size
            words, nxt = now.tolist(), after.tolist()
            assert all(isinstance(w, str) and w for w in words + nxt)
            done = b["next", "done"].flatten().tolist()
            for t in range(len(words) - 1):  # the next frame starts where this one ended
                if not done[t]:
                    assert words[t + 1] == nxt[t]


def _biased_linear(bias: float):
    def factory():
        module = nn.Linear(7, 7)
        with torch.no_grad():
            module.weight.zero_()
            module.bias.fill_(bias)
        return TensorDictModule(module, in_keys=["observation"], out_keys=["action"])
    return factory


@pytest.mark.parametrize("shared_memory", [None, False])
def test_per_worker_policy_factories_and_per_worker_weights(shared_memory):
    from tensordict import TensorDict
    from torchrl.weight_update import SharedMemWeightSyncScheme

    c = MultiSyncDataCollector([ContinuousActionVecMockEnv] * 3,
                               policy_factory=[_biased_linear(i) for i in range(3)],
                               weight_sync_schemes={"policy": SharedMemWeightSyncScheme()},
                               frames_per_batch=6, total_frames=-1, shared_memory=shared_memory)
    try:
        it = iter(c)
        actions = next(it)["action"]
        for w in range(3):
            assert torch.allclose(actions[w], torch.full_like(actions[w], float(w)))
        new = {i: TensorDict({"module": {"weight": torch.zeros(7, 7),
                                         "bias": torch.full((7,), 10.0 * (i + 1))}})
               for i in (0, 2)}
        c.update_policy_weights_(new)
        actions = next(it)["action"]
        expected = [10.0, 1.0, 30.0]  # worker 1 untouched
        for w in range(3):
            assert torch.allclose(actions[w], torch.full_like(actions[w], expected[w]))
    finally:
        c.shutdown()
    with pytest.raises(ValueError, match="one per worker"):
        MultiSyncDataCollector([ContinuousActionVecMockEnv] * 3, frames_per_batch=6,
                               policy_factory=[_biased_linear(0)] * 2)


@pytest.mark.parametrize("shared_memory", [None, False])
def test_enable_profile_writes_a_trace_of_the_chosen_workers(tmp_path, shared_memory):
    import json

    from collectors.testing import counting_env

    c = MultiSyncDataCollector([counting_env] * 2, policy_factory=_argmax_policy,
                               frames_per_batch=8, total_frames=40, shared_memory=shared_memory)
    with pytest.raises(ValueError, match="must exceed warmup_rollouts"):
        c.enable_profile(num_rollouts=1, warmup_rollouts=1)
    with pytest.raises(ValueError, match="out of range"):
        c.enable_profile(workers=[5])
    assert c.profile_config is None
    c.enable_profile(workers=[0], save_path=str(tmp_path / "dropped_{worker_idx}.json"))
    c.disable_profile()  # before any batch: nothing is recorded, nothing written
    assert c.profile_config is None
    c.enable_profile(workers=[1], num_rollouts=3, warmup_rollouts=1,
                     save_path=str(tmp_path / "trace_{worker_idx}.json"))
    assert (c.profile_config.workers, c.profile_config.num_rollouts) == ([1], 3)
    list(c)
    with pytest.raises(RuntimeError, match="Cannot enable profiling after iteration"):
        c.enable_profile()
    c.shutdown()
    assert [p.name for p in tmp_path.iterdir()] == ["trace_1.json"]
    events = json.loads((tmp_path / "trace_1.json").read_text())["traceEvents"]
    assert any("linear" in str(e.get("name", "")).lower() for e in events)


def _argmax_policy():
    from collectors.policies import ArgmaxLayer

    return nn.Sequential(nn.Linear(1, 2), ArgmaxLayer())


@pytest.mark.parametrize("cls, shape", [(MultiSyncDataCollector, (2, 10)),
                                        (MultiaSyncDataCollector, (20,))])
def test_per_worker_lists_of_one_value_work_and_mixed_ones_are_refused(cls, shape):
    from collectors.testing import counting_env

    with cls([counting_env] * 2, frames_per_batch=[10, 10], device=["cpu", "cpu"],
             storing_device=("cpu", "cpu"), total_frames=40) as c:
        got = [tuple(b.batch_size) for b in c]
    assert got == [shape] * 2  # async: each worker's batch is the list's sum, as TorchRL 0.14
    if cls is MultiSyncDataCollector:  # stacking different lengths fails in TorchRL too
        with pytest.raises(ValueError, match=r"frames_per_batch=\[10, 20\].*cat_results=-1"):
            cls([counting_env] * 2, frames_per_batch=[10, 20])
    else:  # as TorchRL 0.14's MultiAsyncCollector: every batch is 30 frames of one worker
        with cls([counting_env] * 2, frames_per_batch=[10, 20], total_frames=60) as c:
            batches = list(c)
        assert [b.numel() for b in batches] == [30, 30]
        assert all(b["collector", "worker_id"].unique().numel() == 1 for b in batches)
    with pytest.raises(ValueError, match="positive integer"):
        cls([counting_env] * 2, frames_per_batch=[10, 0])
    with pytest.raises(NotImplementedError, match="policy_device"):
        cls([counting_env] * 2, frames_per_batch=20, policy_device=["cpu", "meta"])
    with pytest.raises(ValueError, match="exactly one value per worker: 2 workers, got 3"):
        cls([counting_env] * 2, frames_per_batch=[10, 10, 10])


@pytest.mark.parametrize("shared_memory", [None, False])
def test_multisync_per_worker_frames_concatenated_as_torchrl(shared_memory):
    """frames_per_batch=[4, 7] with cat_results=-1: worker 0's 4 steps then worker 1's 7, each
    worker's episodes going on across batches (counting env, episodes of 5)."""
    from collectors.testing import counting_env

    with MultiSyncDataCollector([counting_env] * 2, frames_per_batch=[4, 7], cat_results=-1,
                                total_frames=22, shared_memory=shared_memory) as c:
        assert c.requested_frames_per_batch == 11
        assert c.get_distant_attr("frames_per_batch") == [4, 7]
        batches = list(c)
        stats = c.stats()
    assert [b.batch_size for b in batches] == [torch.Size([11])] * 2
    for b in batches:
        assert b["collector", "worker_id"].tolist() == [0] * 4 + [1] * 7
    obs = [b["observation"][:, 0].tolist() for b in batches]
    assert obs[0] == [0, 1, 2, 3] + [0, 1, 2, 3, 4, 0, 1]
    assert obs[1] == [4, 0, 1, 2] + [2, 3, 4, 0, 1, 2, 3]
    assert stats["frames"] == 22


def test_multisync_per_worker_frames_into_a_ray_replay_buffer_and_a_lost_worker():
    import functools

    from collectors import RayReplayBuffer
    from collectors.testing import counting_env, faulty_counting_env

    rb = RayReplayBuffer(1000)
    try:
        with MultiSyncDataCollector([counting_env] * 2, frames_per_batch=[3, 6], cat_results=-1,
                                    total_frames=18, replay_buffer=rb) as c:
            for _ in c:
                pass
        assert len(rb) == 18 and rb.write_count == 18
    finally:
        rb.shutdown()
    env = functools.partial(faulty_counting_env, "exit", [1], 15, 1)  # worker 1 dies once
    with MultiSyncDataCollector(env, num_workers=2, frames_per_batch=[4, 12], cat_results=-1,
                                total_frames=48) as c:
        batches = list(c)
        stats = c.stats()
    assert [b.numel() for b in batches] == [16] * 3
    assert stats["restarts"] == 1
    assert stats["per_worker"][1]["dropped"] == {"worker_died": 12}  # its batch, not 8 or 4
    assert stats["per_worker"][0]["dropped"] == {}


def test_cat_results_zero_concatenates_along_the_first_dim_as_torchrl():
    from collectors.testing import counting_env

    with MultiSyncDataCollector([counting_env] * 2, frames_per_batch=[4, 7], cat_results=0,
                                total_frames=11) as c:
        assert c.cat_results == 0
        (flat,) = list(c)
    assert flat.batch_size == torch.Size([11])  # one env per worker: the same as -1
    assert flat["collector", "worker_id"].tolist() == [0] * 4 + [1] * 7
    with MultiSyncDataCollector([counting_env] * 2, frames_per_batch=12, num_envs=2,
                                cat_results=0, total_frames=12) as c:
        (batch,) = list(c)
    assert batch.batch_size == torch.Size([4, 3])  # [workers * envs, T]
    assert batch["collector", "worker_id"][:, 0].tolist() == [0, 0, 1, 1]
    assert (batch["observation"][..., 0] == torch.arange(3.0)).all()
    with pytest.raises(ValueError, match="cat_results"):
        MultiSyncDataCollector([counting_env] * 2, frames_per_batch=8, cat_results=2)


def test_extend_buffer_false_with_per_worker_frames_adds_steps_in_time_order():
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    from collectors.testing import counting_env

    rb = ReplayBuffer(storage=LazyTensorStorage(100))
    with MultiSyncDataCollector([counting_env] * 2, frames_per_batch=[2, 3], cat_results=-1,
                                total_frames=5, replay_buffer=rb, extend_buffer=False) as c:
        for _ in c:
            pass
    stored = rb[:]
    assert stored["collector", "worker_id"].tolist() == [0, 1, 0, 1, 1]
    assert stored["observation"][:, 0].tolist() == [0, 0, 1, 1, 2]


def _records_device(td):
    td.set("action", torch.zeros(td.batch_size, dtype=torch.int64))
    td.set("saw_cpu", torch.full(td.batch_size, td.device is not None, dtype=torch.bool))
    return td


def _records_device_one_hot(td):  # a TorchRL env's Discrete action is one-hot
    _records_device(td)
    td.set("action", torch.nn.functional.one_hot(td.get("action"), 2))
    return td


def _torchrl_counting_env():
    from torchrl.envs import GymWrapper

    from collectors.testing import CountingEnv

    return GymWrapper(CountingEnv())


@pytest.mark.parametrize("env", ["gymnasium", "torchrl"])
@pytest.mark.parametrize("kwargs, on_cpu", [({}, False), ({"device": "cpu"}, True),
                                            ({"policy_device": "cpu"}, True),
                                            ({"storing_device": "cpu"}, False),
                                            ({"env_device": "cpu"}, False)])
def test_the_policy_and_batch_see_the_device_torchrl_gives_them(env, kwargs, on_cpu):
    """As TorchRL 0.14 (observed): with device or policy_device "cpu" a TensorDict policy's
    input is on device cpu; with device or storing_device "cpu" so is the batch; otherwise
    (env_device included) they have no device."""
    from collectors.testing import counting_env

    if env == "gymnasium":
        make, policy = counting_env, _records_device
    else:
        make, policy = _torchrl_counting_env, _records_device_one_hot
    with SyncDataCollector(make, policy, frames_per_batch=4, total_frames=4, **kwargs) as c:
        (batch,) = list(c)
    assert batch["saw_cpu"].all() if on_cpu else not batch["saw_cpu"].any()
    stored = {"device", "storing_device"} & set(kwargs)
    assert batch.device == (torch.device("cpu") if stored else None)
