"""Samples the trainer cannot draw itself (prioritized, slices, rate limits) come from the
buffer actor through a shared-memory slot when the trainer is on its node: the same samples a
call gives, errors raised as a call raises them, calls again when the link breaks."""
import time

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from actors.shm.handoff import SlotMaps, SlotWriter
from collectors import RayReplayBuffer


def counting_frames(n: int, episode: int = 5) -> TensorDict:
    """Frames of back-to-back episodes: obs t % episode, next obs t % episode + 1."""
    t = torch.arange(n) % episode
    obs = t.float()[:, None]
    done = (t == episode - 1)[:, None]
    return TensorDict({"observation": obs, ("next", "observation"): obs + 1,
                       ("next", "reward"): torch.ones(n, 1), ("next", "done"): done,
                       ("next", "terminated"): done,
                       ("collector", "traj_ids"): torch.arange(n) // episode}, [n])


@pytest.mark.parametrize("kwargs", [{"compact_obs": True, "sampler": "prioritized"},
                                    {"sampler": "prioritized"},
                                    {"sampler": "slice", "slice_len": 5}])
def test_link_samples_are_the_actors(kwargs):
    with RayReplayBuffer(200, batch_size=20, seed=0, **kwargs) as rb:
        rb.extend(counting_frames(100))
        for _ in range(5):
            s = rb.sample()
            assert s.batch_size == torch.Size([20])
            assert (s["next", "observation"] == s["observation"] + 1).all()
            assert (s["index"] < 100).all()
        assert rb.info()["link_samples"] == 5  # through the slot, not by calls
        if kwargs.get("sampler") == "prioritized":
            assert "priority_weight" in s.keys()
            rb.update_priority(s["index"], torch.full((20,), 5.0))


def test_local_sampling_false_means_calls_only():
    with RayReplayBuffer(200, batch_size=8, compact_obs=True, local_sampling=False) as rb:
        rb.extend(counting_frames(50))
        rb.sample()
        assert rb.info()["link_samples"] == 0


def test_an_error_in_the_actor_is_raised_as_a_call_raises_it_and_sampling_goes_on():
    with RayReplayBuffer(200, batch_size=8, compact_obs=True, sampler="prioritized",
                         min_size=60) as rb:
        rb.extend(counting_frames(50))
        with pytest.raises(TimeoutError, match="min_size=60"):
            rb.sample(timeout=0.2)
        rb.extend(counting_frames(20))
        assert rb.sample().batch_size == torch.Size([8])  # (by a call until the link reopens)


def test_a_restarted_actor_is_sampled_by_calls_then_by_a_new_link(tmp_path):
    with RayReplayBuffer(200, batch_size=8, compact_obs=True, sampler="prioritized",
                         checkpoint_dir=str(tmp_path), timeout_s=60) as rb:
        rb.extend(counting_frames(50))
        rb.sample()
        rb.checkpoint(str(tmp_path))
        pid = rb.info()["pid"]
        ray.kill(rb.actor, no_restart=False)
        deadline = time.monotonic() + 60
        while rb.info()["pid"] == pid:  # (the kill is asynchronous; info waits out the restart)
            assert time.monotonic() < deadline, "the buffer actor did not restart within 60 s"
        before = rb.info()["link_samples"]
        s = rb.sample()  # the link broke: a call
        assert (s["next", "observation"] == s["observation"] + 1).all()
        assert rb.info()["link_samples"] == before
        rb._link.retry_at = 0.0  # (the link would be tried again after RETRY_S)
        rb.sample()
        assert rb.info()["link_samples"] == before + 1


def test_a_pickled_handle_in_a_task_on_the_node_samples_through_its_own_link():
    @ray.remote(num_cpus=0)
    def draw(rb):
        s = rb.sample(8)
        return bool((s["next", "observation"] == s["observation"] + 1).all()), \
            rb.info()["link_samples"]

    with RayReplayBuffer(200, batch_size=8, compact_obs=True, sampler="prioritized") as rb:
        rb.extend(counting_frames(50))
        assert ray.get(draw.remote(rb), timeout=60) == (True, 1)


def test_threads_sampling_one_handle_each_get_whole_samples():
    import threading

    with RayReplayBuffer(200, batch_size=8, compact_obs=True, sampler="prioritized") as rb:
        rb.extend(counting_frames(100))
        bad, errors = [], []

        def draw():
            try:
                for _ in range(40):
                    s = rb.sample()
                    if not (s["next", "observation"] == s["observation"] + 1).all():
                        bad.append(s)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=draw) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and not bad
        assert 0 < rb.info()["link_samples"] <= 120


def test_held_samples_stay_as_drawn_and_changing_one_leaves_the_buffer_alone():
    with RayReplayBuffer(200, batch_size=16, seed=0, compact_obs=True, sampler="prioritized") as rb:
        rb.extend(counting_frames(100))
        held = [rb.sample() for _ in range(10)]  # more than the link's slots: the rest copied
        drawn = [s.clone() for s in held]
        for _ in range(10):
            rb.sample()
        for s, first in zip(held, drawn):
            assert (s == first).all()  # no later sample was written over a held one
        held[0]["observation"].add_(1000)  # a sample is the trainer's to change
        del held, drawn, s, first
        for _ in range(10):
            s = rb.sample()
            assert (s["observation"] < 5).all() and (s["next", "observation"] == s["observation"] + 1).all()
        assert rb.info()["link_samples"] == 30
        del s
        assert sorted(rb._link.free) == [1, 2, 3, 4]  # dropped samples gave their slots back


def test_a_slot_write_leaves_what_is_in_place_and_moves_what_is_not(tmp_path):
    folder = str(tmp_path)
    writer, maps = SlotWriter(folder, "s"), SlotMaps(folder, keep=4)
    a, b = np.arange(16, dtype=np.int64), np.arange(100, 164, dtype=np.int64)
    writer.write({"a": a, "b": b}, slot=1)
    views = writer.at(1).views()
    views["a"].copy_(torch.arange(16) * 2)  # filled in place, as a sample gathered there
    arrays = maps.arrays(*writer.write({"a": views["a"].numpy(), "b": b + 1}, slot=1))
    assert (arrays["a"] == a * 2).all() and (arrays["b"] == b + 1).all()
    # the same arrays in another order: "b" now goes where "a" is; both arrive whole
    views = {k: v.numpy() for k, v in writer.at(1).views().items()}
    arrays = maps.arrays(*writer.write({"b": views["b"], "a": views["a"]}, slot=1))
    assert (arrays["a"] == a * 2).all() and (arrays["b"] == b + 1).all()
    writer.close()
