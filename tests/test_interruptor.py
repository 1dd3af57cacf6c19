"""TorchRL's ``interruptor`` on SyncDataCollector: once stopped, the batch in flight ends after
the current step and the rest is padding with traj id -1; started again, batches are whole."""
import threading

import numpy as np
import pytest
import torch

from collectors import SyncDataCollector
from collectors.testing import BusyEnv, CountingEnv, counting_env


class Flag:
    """The smallest interruptor: what TorchRL's ``_Interruptor`` offers."""

    def __init__(self):
        self.stopped = False

    def start_collection(self):
        self.stopped = False

    def stop_collection(self):
        self.stopped = True

    def collection_stopped(self):
        return self.stopped


def slow_counting_env():
    return BusyEnv(CountingEnv(episode_length=1000), busy_ms=2.0)


def torchrl_counting_env():
    from torchrl.envs import GymWrapper
    return GymWrapper(CountingEnv(episode_length=1000))


def torchrl_interruptor():
    constants = pytest.importorskip("torchrl.collectors._constants")
    return constants._Interruptor()


@pytest.mark.parametrize("make", [Flag, torchrl_interruptor])
@pytest.mark.parametrize("env,num_envs", [(counting_env, 1), (counting_env, 3),
                                          ("torchrl", 1)])
def test_stopped_before_the_batch_keeps_exactly_one_step(make, env, num_envs):
    if env == "torchrl":
        pytest.importorskip("torchrl")
        env = torchrl_counting_env
    interruptor = make()
    interruptor.start_collection()
    with SyncDataCollector(env, frames_per_batch=10 * num_envs, total_frames=4 * num_envs,
                           num_envs=num_envs, interruptor=interruptor) as c:
        assert c.interruptor is interruptor
        interruptor.stop_collection()
        batches = list(c)
    assert len(batches) == 4  # only real steps count towards total_frames
    for b in batches:
        ids = b["collector", "traj_ids"].reshape(num_envs, 10)
        assert (ids[:, 0] >= 0).all() and (ids[:, 1:] == -1).all()
        assert b.numel() == 10 * num_envs
        obs = b["observation"].reshape(num_envs, 10)
        assert (obs[:, 1:] == 0).all()  # the padding is zeros, not an older batch's data
    firsts = torch.stack([b["observation"].reshape(num_envs, 10)[:, 0] for b in batches], 1)
    assert (firsts == torch.arange(4.0)).all()  # the envs went on one step per batch


def test_stopping_mid_batch_cuts_it_after_the_current_step_and_starting_again_resumes():
    interruptor = Flag()
    with SyncDataCollector(slow_counting_env, frames_per_batch=400, interruptor=interruptor) as c:
        stopper = threading.Timer(0.15, interruptor.stop_collection)
        stopper.start()
        first = c.next()
        stopper.join()
        ids = first["collector", "traj_ids"]
        real = int((ids >= 0).sum())
        assert 1 <= real < 400  # did not run to the end
        assert (ids[:real] >= 0).all() and (ids[real:] == -1).all()
        assert (first["observation"][:real, 0] == torch.arange(real)).all()
        interruptor.start_collection()
        second = c.next()
    assert (second["collector", "traj_ids"] >= 0).all()  # whole again
    assert second["observation"][0, 0] == real  # and carried on from the cut step
    assert c._frames == real + 400


def test_bad_interruptor_objects_are_named():
    with pytest.raises(TypeError, match="collection_stopped"):
        SyncDataCollector(counting_env, frames_per_batch=8, interruptor=True)


def test_interruptor_never_stopped_changes_nothing():
    with SyncDataCollector(counting_env, frames_per_batch=10, total_frames=30,
                           interruptor=Flag()) as c:
        batches = list(c)
    obs = torch.cat([b["observation"][:, 0] for b in batches]).numpy()
    assert np.array_equal(obs, np.tile(np.arange(5.0), 6))


def test_stopped_interruptor_with_gymnasiums_native_vector_env():
    interruptor = Flag()
    interruptor.stop_collection()
    with SyncDataCollector("CartPole-v1", frames_per_batch=64, total_frames=32, num_envs=16,
                           native_vector=True, interruptor=interruptor) as c:
        batches = list(c)
    assert len(batches) == 2
    for b in batches:
        ids = b["collector", "traj_ids"]
        assert b.batch_size == torch.Size([16, 4])
        assert (ids[:, 0] >= 0).all() and (ids[:, 1:] == -1).all()


def test_interruptor_with_a_replay_buffer_is_refused():
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    from collectors import RayReplayBuffer

    with pytest.raises(NotImplementedError, match="interruptor with a replay_buffer"):
        SyncDataCollector(counting_env, frames_per_batch=8, interruptor=Flag(),
                          replay_buffer=ReplayBuffer(storage=LazyTensorStorage(100)))
    with RayReplayBuffer(100) as rb, pytest.raises(NotImplementedError, match="replay_buffer"):
        SyncDataCollector(counting_env, frames_per_batch=8, interruptor=Flag(), replay_buffer=rb)


def test_a_stopped_interruptor_with_a_worker_that_died_goes_on():
    from collectors.testing import kill_worker

    interruptor = Flag()
    interruptor.stop_collection()
    with SyncDataCollector(counting_env, frames_per_batch=10, interruptor=interruptor,
                           max_restarts=3) as c:
        c.next()
        kill_worker(c, 0)
        for _ in range(3):
            b = c.next()
            assert b.numel() == 10
        assert c.stats()["restarts"] == 1
