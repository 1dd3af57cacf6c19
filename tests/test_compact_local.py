"""A trainer on the buffer's node samples compact and frame storage itself: it maps the ring and
the side stores read-only and rebuilds next values and stacks, with no call to the actor. The
samples equal the plain storage's, also while the actor keeps writing in another process."""
import multiprocessing as mp
import queue
import time

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from actors.storage.compact_reader import CompactReader
from actors.storage.replay_buffer import ReplayBufferActor
from collectors import MultiSyncDataCollector, RayReplayBuffer
from test_compact import stacked_segments

pytestmark = pytest.mark.skipif(not ReplayBufferActor(2, share=True).share,
                                reason="no shared memory here")


def plain_contents(rb: ReplayBufferActor) -> TensorDict:
    return rb.storage[torch.arange(rb.size)].clone()


@pytest.mark.parametrize("compact_obs", [True, "frames"])
def test_the_readers_samples_equal_the_plain_storage_after_every_write(compact_obs):
    """Writes of 1 to 9 frames from 3 interleaved envs, episode ends inside writes, a ring of
    37 that wraps many times: every sample the reader rebuilds equals the plain storage there."""
    plain = ReplayBufferActor(37, seed=2)
    shared = ReplayBufferActor(37, seed=2, share=True, compact_obs=compact_obs)
    reader = None
    for td in stacked_segments([5, 9, 1, 2, 3, 8, 7, 4, 6, 2, 9, 1, 1, 5] * 6):
        plain.extend(td)
        shared.extend(td)
        loc = shared.storage_location()
        if reader is None or reader.side_gen != loc["side"]["gen"]:  # side files grew
            reader = CompactReader(loc, seed=0)
        got = reader.sample(16)
        assert got is not None
        out, index = got
        want = plain_contents(plain)[index]
        assert set(out) == set(want.keys(True, True))
        for key, value in out.items():
            assert torch.equal(value, want.get(key)), key
    if compact_obs == "frames":  # a frame per slot is mapped, the stacks are rebuilt here
        assert reader.tensors["observation"].shape == (37, 2, 2)
    shared.close()


def test_a_reader_of_files_that_moved_leaves_the_sample_to_the_actor():
    """The side store grows into new files: the old reader says so (``None``, stale) instead
    of reading rows it has not mapped; a reader of the new layout samples again."""
    rb = ReplayBufferActor(500, seed=0, share=True, compact_obs=True)
    segments = stacked_segments([3] * 60, envs=3)
    rb.extend(next(segments))
    reader = CompactReader(rb.storage_location(), seed=0)
    assert reader.sample(4) is not None
    rows = rb.compact.side.rows()
    while rb.compact.side.rows() == rows:  # every write keeps its last next value apart
        rb.extend(next(segments))
    assert reader.stale() and reader.sample(4) is None
    fresh = CompactReader(rb.storage_location(), seed=0)
    assert not fresh.stale() and fresh.sample(4) is not None
    rb.empty()
    assert fresh.sample(4) is None  # emptied: nothing to draw (and new files)
    rb.close()


def test_a_restored_frame_buffer_is_mapped_anew_and_reads_as_before():
    writes = list(stacked_segments([7, 3, 9, 5] * 5))
    rb = ReplayBufferActor(40, seed=1, share=True, compact_obs="frames")
    for td in writes:
        rb.extend(td)
    old = CompactReader(rb.storage_location(), seed=0)
    state = rb.state_dict()
    rb.load_state_dict(state)  # a restore moves the storage: the old mapping is dropped
    assert not old.usable()
    again = ReplayBufferActor(40, seed=1, share=True, compact_obs="frames")
    again.load_state_dict(state)
    plain = ReplayBufferActor(40, seed=1)
    for td in writes:
        plain.extend(td)
    for buffer in (rb, again):
        out, index = CompactReader(buffer.storage_location(), seed=0).sample(64)
        want = plain_contents(plain)[index]
        assert all(torch.equal(v, want.get(k)) for k, v in out.items())
        buffer.close()


# -- a writer in another process, a reader here: no torn sample --------------------------------
def encode(ids: np.ndarray) -> np.ndarray:
    """Frame ids as 2x2 uint8 frames (the id's 4 bytes)."""
    return ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 2, 2)


def decode(frames: torch.Tensor) -> torch.Tensor:
    raw = frames.contiguous().numpy().reshape(*frames.shape[:-2], 4)
    return torch.from_numpy(raw.copy().view("<u4")[..., 0].astype(np.int64))


def id_writes(seed: int, stack: int = 4):
    """Endless writes of 1-9 frames from 3 envs in turn. Every frame has a unique id; a stack
    holds its episode's last ``stack`` frame ids (the first padded); an env's frames are one
    id apart; ``"step"`` is the newest id and ``"episode"`` the episode's first id."""
    rng = np.random.default_rng(seed)
    envs = []
    for e in range(3):  # ids of env e count from e * 10**7 + 1
        first = e * 10**7 + 1
        envs.append({"stack": [first] * stack, "left": int(rng.integers(3, 12)), "first": first,
                     "next": first + 1})
    while True:
        env = envs[int(rng.integers(0, 3))]
        obs, nxt, done, step, episode = [], [], [], [], []
        for _ in range(int(rng.integers(1, 10))):
            cur = list(env["stack"])
            new = cur[1:] + [env["next"]]
            env["next"] += 1
            env["left"] -= 1
            end = env["left"] == 0
            obs.append(cur), nxt.append(new), done.append(end), step.append(cur[-1])
            episode.append(env["first"])
            if end:  # the reset frame starts a new episode, padded
                env.update(stack=[env["next"]] * stack, left=int(rng.integers(3, 12)),
                           first=env["next"], next=env["next"] + 1)
            else:
                env["stack"] = new
        n = len(obs)
        yield TensorDict({"observation": torch.from_numpy(encode(np.array(obs))),
                          ("next", "observation"): torch.from_numpy(encode(np.array(nxt))),
                          ("next", "done"): torch.tensor(done)[:, None],
                          "step": torch.tensor(step), "episode": torch.tensor(episode)}, [n])


def write_forever(capacity, asks, answers, stop):
    """The buffer actor's body in a process of its own: writes until ``stop``, and says where
    its storage is when asked (between writes)."""
    rb = ReplayBufferActor(capacity, seed=0, share=True, compact_obs="frames")
    writes = id_writes(1)
    try:
        while not stop.is_set():
            rb.extend(next(writes))
            try:
                asks.get_nowait()
                answers.put((rb.storage_location(), rb.write_count))
            except queue.Empty:
                pass
    finally:
        rb.close()


def check(out: dict) -> None:
    """What every whole sample satisfies; a torn one (frames of two writes mixed) does not."""
    ids, nxt = decode(out["observation"]), decode(out["next", "observation"])
    step, episode = out["step"], out["episode"]
    assert torch.equal(ids[:, -1], step), "the rebuilt stack is not the slot's"
    assert torch.equal(nxt[:, :-1], ids[:, 1:]) and torch.equal(nxt[:, -1], step + 1)
    diff = ids[:, 1:] - ids[:, :-1]
    assert ((diff == 0) | (diff == 1)).all()
    padded = ids == episode[:, None]  # an episode's first frame pads the front of its stacks
    assert (ids >= episode[:, None]).all() and (padded | (ids > episode[:, None])).all()
    assert ((diff == 1) | padded[:, 1:]).all(), "frames of another episode in a stack"


def test_samples_stay_whole_while_another_process_overwrites_the_ring():
    ctx = mp.get_context("spawn")
    asks, answers, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    writer = ctx.Process(target=write_forever, args=(61, asks, answers, stop), daemon=True)
    writer.start()
    try:
        reader, drawn, deadline = None, 0, time.monotonic() + 120
        while drawn < 8000:
            assert time.monotonic() < deadline, f"only {drawn} samples drawn in 120 s"
            if reader is None or reader.stale():
                asks.put(True)
                loc = answers.get(timeout=60)[0]
                try:
                    reader = CompactReader(loc, seed=drawn)
                except FileNotFoundError:  # the files moved again since: ask again
                    reader = None
                    continue
            got = reader.sample(16)
            if got is not None:
                check(got[0])
                drawn += 1
        asks.put(True)
        written = answers.get(timeout=60)[1]
        assert written > 20 * 61, written  # the ring wrapped many times while we drew
    finally:
        stop.set()
        writer.join(30)
        if writer.is_alive():
            writer.kill()
            writer.join(10)
    assert writer.exitcode == 0


def test_the_trainer_samples_a_frame_buffer_that_collectors_fill_without_calls():
    from collectors.testing import stacked_counting_env

    with RayReplayBuffer(500, batch_size=64, compact_obs="frames", seed=0) as rb:
        with MultiSyncDataCollector(stacked_counting_env, num_workers=2, frames_per_batch=24,
                                    total_frames=240, replay_buffer=rb, compact_obs=True) as c:
            for _ in c:
                pass
        deadline = time.monotonic() + 30
        while not isinstance(rb._local.reader, CompactReader):
            assert time.monotonic() < deadline, "the trainer never mapped the frame storage"
            rb.sample()  # (through the link until the trainer has mapped the storage)
        before = rb.info()
        for _ in range(20):
            s = rb.sample()
            obs, nxt = s["observation"], s["next", "observation"]
            done = s["next", "done"].squeeze(-1)
            assert obs.shape == (64, 4, 2, 2) and (s["index"] < 240).all()
            steps = obs[:, :, 0, 0].long()
            assert ((steps[:, 1:] - steps[:, :-1] == 1) | (steps[:, :-1] == 0)).all()
            assert (nxt[:, -1, 0, 0] == obs[:, -1, 0, 0] + 1).all()
            assert (nxt[~done][:, :-1] == obs[~done][:, 1:]).all()
        info = rb.info()
        # drawn here, neither by the link nor by calls, and counted by the actor all the same
        assert info["link_samples"] == before["link_samples"]
        assert info["sample_time"] == before["sample_time"]
        assert info["samples"] == before["samples"] + 20 * 64


def test_each_shard_of_a_compact_buffer_is_sampled_here_and_the_sample_spans_them():
    from test_sample_link import counting_frames

    with RayReplayBuffer(400, num_shards=2, batch_size=200, compact_obs=True, seed=0) as rb:
        for shard in rb.shards:
            shard.extend(counting_frames(100))
        deadline = time.monotonic() + 30
        while not all(isinstance(s._local.reader, CompactReader) for s in rb.shards):
            assert time.monotonic() < deadline, "the trainer never mapped both shards"
            rb.sample()
        links = [s.info()["link_samples"] for s in rb.shards]
        for _ in range(10):
            s = rb.sample()
            assert (s["next", "observation"] == s["observation"] + 1).all()
            assert set((s["index"] // rb.stride).tolist()) == {0, 1}
        assert [s.info()["link_samples"] for s in rb.shards] == links  # no sample by the actors


def test_samples_drawn_here_while_collectors_stream_into_a_frame_buffer_are_whole():
    """``start()`` streams stacked counting frames into a small frame buffer (it wraps every
    few batches) while the trainer samples it itself: every stack is one env's episode, its
    steps count up to the newest, and the next stack is the stack shifted by one step."""
    from collectors import MultiaSyncDataCollector
    from collectors.testing import stacked_counting_env

    with RayReplayBuffer(120, batch_size=32, compact_obs="frames", seed=0) as rb:
        with MultiaSyncDataCollector(stacked_counting_env, num_workers=2, frames_per_batch=12,
                                     total_frames=-1, replay_buffer=rb, compact_obs=True) as c:
            c.start()
            deadline, drawn = time.monotonic() + 120, 0
            while drawn < 300:
                assert time.monotonic() < deadline, f"only {drawn} local samples in 120 s"
                if len(rb) < 32:
                    time.sleep(0.05)
                    continue
                s = rb.sample()
                drawn += isinstance(rb._local.reader, CompactReader)
                obs, nxt = s["observation"], s["next", "observation"]
                done = s["next", "done"].squeeze(-1)
                same = obs[:, :, 0, 1:] == obs[:, -1:, 0, 1:]  # episode and env tag
                assert same.all() and (obs[:, :, 1, 0] == obs[:, -1:, 1, 0]).all()
                steps = obs[:, :, 0, 0].long()
                assert ((steps[:, 1:] - steps[:, :-1] == 1) | (steps[:, :-1] == 0)).all()
                assert (nxt[:, -1, 0, 0] == obs[:, -1, 0, 0] + 1).all()
                assert (nxt[~done][:, :-1] == obs[~done][:, 1:]).all()
            written = rb.write_count
        assert written > 5 * 120, written  # the ring wrapped while the trainer sampled


def test_a_restarted_frame_buffer_is_mapped_again_from_its_checkpoint(tmp_path):
    from test_sample_link import counting_frames

    with RayReplayBuffer(200, batch_size=8, compact_obs=True, checkpoint_dir=str(tmp_path),
                         timeout_s=60) as rb:
        rb.extend(counting_frames(50))
        deadline = time.monotonic() + 30
        while not isinstance(rb._local.reader, CompactReader):
            assert time.monotonic() < deadline, "the trainer never mapped the storage"
            rb.sample()
        first = rb._local.reader.dir
        rb.checkpoint(str(tmp_path))
        pid = rb.info()["pid"]
        import ray

        ray.kill(rb.actor, no_restart=False)
        while rb.info()["pid"] == pid:  # (the kill is asynchronous; info waits out the restart)
            assert time.monotonic() < deadline + 60, "the buffer actor did not restart"
        deadline = time.monotonic() + 30
        while rb._local.reader is None or rb._local.reader.dir == first:
            assert time.monotonic() < deadline, "the restored storage was never mapped"
            s = rb.sample()  # (by the link or a call meanwhile)
            assert (s["next", "observation"] == s["observation"] + 1).all()
        links = rb.info()["link_samples"]
        for _ in range(10):
            s = rb.sample()
            assert (s["next", "observation"] == s["observation"] + 1).all()
            assert (s["index"] < 50).all()
        assert rb.info()["link_samples"] == links  # drawn here again


def test_a_side_store_that_cannot_grow_in_shared_memory_goes_private_and_readers_step_back(
        monkeypatch):
    """``/dev/shm`` full when a side store grows: the buffer keeps every frame (samples by the
    actor equal the plain storage's), and the ring is closed to readers, who use calls."""
    import actors.storage.side_files as side_files

    writes = list(stacked_segments([3] * 60, envs=3))
    plain = ReplayBufferActor(500, seed=0)
    rb = ReplayBufferActor(500, seed=0, share=True, compact_obs=True)
    rb.extend(writes[0])
    plain.extend(writes[0])
    reader = CompactReader(rb.storage_location(), seed=0)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(side_files, "_writable", full)
    for td in writes[1:]:  # the side store outgrows its first 64 rows
        rb.extend(td)
        plain.extend(td)
    assert rb.compact.side.files.failed and not reader.usable()
    assert getattr(rb.compact.side.values[("next", "observation")], "shm_path", None) is None
    a, b = plain.sample(64), rb.sample(64)
    assert (a["index"] == b["index"]).all() and (a == b).all()
    rb.close()
