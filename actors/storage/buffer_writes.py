"""The replay-buffer actor's entry points for collectors: one batch through the object store
(``extend_ref``), several at once (``extend_refs``), and the intake of the local feed
(``open_intake``). Each acknowledges per batch; a batch id is stored once."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from tensordict import TensorDict

from actors.stepping.compact import expand_arrays
from actors.storage.intake import Intake

TRAJ_KEY = ("collector", "traj_ids")
INTAKE_WAIT_S = 1.0  # a group write held by the rate limiter is answered "rate_wait" after this


def arrays_to_frames(arrays: dict) -> TensorDict:
    """Worker arrays ``{key: [E, T, ...]}`` -> a flat TensorDict of valid frames, env-major."""
    flat = {}
    arrays = expand_arrays(arrays)  # compact_obs batches: next observations put back
    with warnings.catch_warnings():  # read-only object-store views: only read, then copied
        warnings.simplefilter("ignore", UserWarning)
        for key, value in arrays.items():
            t = torch.as_tensor(np.ascontiguousarray(value))
            flat[key] = t.reshape(-1, *t.shape[2:])
    td = TensorDict(flat, batch_size=[flat[("collector", "traj_ids")].shape[0]])
    keep = td.get(("collector", "traj_ids")) >= 0
    return td if bool(keep.all()) else td[keep]



class BufferWritesMixin:
    """Needs ``extend``, ``cond``, ``seen``, ``fenced``, ``writing``, ``batches``,
    ``checkpointed_batches``, ``checkpoint_dir`` and ``incarnation`` of ``ReplayBufferActor``."""

    def extend_ref(self, refs: list, batch_id=None, timeout: float | None = None,
                   epoch: str | None = None) -> dict:
        """Fetch worker arrays from the object store (``[ref]``) and write their valid frames.

        Returns the acknowledgement ``{"frames", "incarnation", "undurable"}``: frames written
        (0 for a batch already stored), this actor's incarnation (new after a restart), and how
        many of the batches written so far are not yet in a checkpoint, which the writer keeps
        to resend should this actor restart from its checkpoint.
        """
        import ray

        return self._write_arrays(lambda: ray.get(refs[0]), batch_id, timeout, epoch)

    def extend_refs(self, items: list, epoch: str | None = None) -> list[dict]:
        """``[(batch_id, [ref])]`` fetched at once and written in one group (see
        :meth:`_write_group`); an acknowledgement per batch as :meth:`extend_ref`'s, or
        ``{"lost": True}`` for one whose data died with its worker, ``{"rate_wait": True}``
        for one the rate limiter holds (send it again)."""
        import ray
        from ray.exceptions import ObjectLostError, OwnerDiedError

        fetched: list = [None] * len(items)
        try:
            fetched = ray.get([refs[0] for _, refs in items])
        except (ObjectLostError, OwnerDiedError):  # one of them is gone: the others one by one
            for k, (_, refs) in enumerate(items):
                try:
                    fetched[k] = ray.get(refs[0])
                except (ObjectLostError, OwnerDiedError):
                    fetched[k] = None
        pairs = [(bid, arrays) for (bid, _), arrays in zip(items, fetched) if arrays is not None]
        written = iter(self._write_group(pairs, epoch))
        with self.cond:
            undurable = self.batches - self.checkpointed_batches if self.checkpoint_dir else 0
        return [dict(next(written), incarnation=self.incarnation, undurable=undurable)
                if arrays is not None else {"lost": True} for arrays in fetched]

    def open_intake(self, folder: str) -> str:
        """Take batches from env actors on this node through their slot files in ``folder``
        (a collector driver's, see :mod:`actors.storage.intake`); returns the socket address."""
        return Intake(folder, self._write_group).address

    def _write_group(self, pairs: list, epoch) -> list[dict]:
        """``[(batch_id, arrays)]`` in one write when they stack (one check, one copy into the
        ring), else one by one; an acknowledgement per batch."""
        with self.cond:
            if epoch in self.fenced:
                return [{"frames": 0, "fenced": True}] * len(pairs)
            self.writing[epoch] = self.writing.get(epoch, 0) + 1
        try:
            fresh = [(tuple(bid), a) for bid, a in pairs if tuple(bid) not in self.seen]
            frames = {bid: int((a[TRAJ_KEY] >= 0).sum()) for bid, a in fresh}
            written: dict = {}
            stackable = len(fresh) > 1 and not any(
                isinstance(k, tuple) and k[0] == "_compact" for k in fresh[0][1])
            if stackable and sum(frames.values()):
                try:
                    merged = {k: np.concatenate([a[k] for _, a in fresh]) for k in fresh[0][1]}
                except (KeyError, ValueError):  # (shapes differ: one by one)
                    merged = None
                try:
                    if merged is not None and self.extend(arrays_to_frames(merged), None, INTAKE_WAIT_S,
                                                          group_ids=[bid for bid, _ in fresh]):
                        written = frames
                except TimeoutError:  # the rate limiter holds the group (nothing written): sent again
                    return [{"rate_wait": True} if tuple(bid) in frames else {"frames": 0}
                            for bid, _ in pairs]
            acks = []
            for bid, a in pairs:
                bid = tuple(bid)
                if bid not in written and bid in frames and not (acks and acks[-1].get("rate_wait")):
                    try:
                        written[bid] = self.extend(arrays_to_frames(a), bid, INTAKE_WAIT_S)
                    except TimeoutError:  # the rate limiter holds it (and the rest): sent again
                        acks.append({"rate_wait": True})
                        continue
                elif acks and acks[-1].get("rate_wait"):
                    acks.append({"rate_wait": True})
                    continue
                acks.append({"frames": written.get(bid, 0)})
            return acks
        finally:
            with self.cond:
                self.writing[epoch] -= 1
                self.cond.notify_all()

    def _write_arrays(self, fetch, batch_id, timeout, epoch) -> dict:
        """Write the worker arrays ``fetch()`` gives unless ``epoch`` is fenced or ``batch_id``
        is stored already; the acknowledgement of :meth:`extend_ref`."""
        with self.cond:
            if epoch is not None and epoch in self.fenced:
                return {"frames": 0, "fenced": True, "incarnation": self.incarnation, "undurable": 0}
            if epoch is not None:
                self.writing[epoch] = self.writing.get(epoch, 0) + 1
        try:
            n = 0
            if batch_id is None or tuple(batch_id) not in self.seen:
                n = self.extend(arrays_to_frames(fetch()), batch_id, timeout)
        finally:
            if epoch is not None:
                with self.cond:
                    self.writing[epoch] -= 1
                    self.cond.notify_all()
        with self.cond:
            undurable = self.batches - self.checkpointed_batches if self.checkpoint_dir else 0
        return {"frames": n, "incarnation": self.incarnation, "undurable": undurable}
