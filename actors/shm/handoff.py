"""Batches from an env actor to a trainer on the same node, through shared memory.

Each env actor listens on a Unix socket in the collector's private folder (see
:mod:`actors.storage.shared_ring`; 0700, so only this user reaches it) and keeps a slot file there. The
trainer connects, then per batch sends one byte (collect, with random actions or not) and waits
for the reply; the actor collects, writes the arrays into its slot and replies with the small
meta and the slot's layout. Both sides block in the kernel while they wait (a socket read, or
``select`` with a deadline on the trainer's side): no core spins. A dead actor closes its end,
which the trainer reads as end-of-file at once; a hung one misses its deadline.

A slot holds one batch. The trainer copies a batch out before it asks for the next one, so the
batch a user holds is never overwritten. A batch larger than the slot makes the actor write a new,
larger slot file (its name goes with the reply); arrays of Python objects go inside the reply.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> server = HandoffServer(folder, "w0")
    >>> client = HandoffClient(folder, server.address)
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import socket
import stat
import traceback
from multiprocessing.connection import Connection

import numpy as np

from actors.errors import FatalWorkerError

ALIGN = 64
COLLECT, RANDOM, STOP = b"c", b"r", b"s"
CONNECT_TIMEOUT_S = 30.0


class SlotWriter:
    """The actor's slot files: ``write(arrays)`` gives ``(path, layout, inline)``. With
    ``slots=2`` writes alternate between two files, so a consumer that keeps two requests in
    flight reads one batch while the next is written into the other."""

    def __init__(self, folder: str, name: str, slots: int = 1):
        self.name = name
        self.slots = [_Slot(folder, f"{name}-{k}") for k in range(slots)]
        self.turn = 0

    @property
    def path(self) -> str | None:  # (the slot written last)
        return self.slots[(self.turn - 1) % len(self.slots)].path

    def write(self, arrays: dict, slot: int | None = None) -> tuple[str | None, list, dict]:
        """Into the next slot in turn, or into slot ``slot`` (added when new: the consumer
        chooses among its slots, e.g. one it no longer reads)."""
        if slot is None:
            slot, self.turn = self.turn, (self.turn + 1) % len(self.slots)
        return self.at(slot).write(arrays)

    def at(self, slot: int) -> "_Slot":
        while slot >= len(self.slots):
            self.slots.append(_Slot(self.slots[0].folder, f"{self.name}-{len(self.slots)}"))
        return self.slots[slot]

    def close(self, unlink: bool = True) -> None:
        for slot in self.slots:
            slot.close(unlink)


class _Slot:
    """One slot file, grown (as a new file) when a batch does not fit."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name
        self.generation = 0
        self.path: str | None = None
        self.buf: np.memmap | None = None
        self.layout: tuple = ()  # of the last write
        self._views: dict | None = None  # torch views of ``layout`` in ``buf``
        self._lent = False  # views handed out since the last write (arrays may sit in ``buf``)

    def views(self) -> dict:
        """``{key: tensor}``: where the last write put each array (writable views of the slot).
        A producer may fill them directly; ``write`` then leaves in place what is in place."""
        if self._views is None:
            import torch  # (here: env actors that never call this start without torch)

            self._views = layout_views(torch.from_numpy(self.buf), self.layout) \
                if self.buf is not None else {}
        self._lent = True
        return self._views

    def write(self, arrays: dict) -> tuple[str | None, list, dict]:
        layout, inline, offset = [], {}, 0
        for key, a in arrays.items():
            if a.dtype.hasobject:
                inline[key] = a
                continue
            offset = -(-offset // ALIGN) * ALIGN
            layout.append((key, a.dtype.str, a.shape, offset))
            offset += a.nbytes
        if layout and (self.buf is None or offset > self.buf.shape[0]):
            self._grow(offset)
        if tuple(layout) != self.layout:
            self.layout, self._views = tuple(layout), None
        placed, lent, self._lent = set(), self._lent and bool(layout), False
        start = self.buf.ctypes.data if lent else 0
        end = start + (self.buf.nbytes if lent else 0)
        # with views lent, arrays may already sit in the slot: left in place, or moved out
        # first (their place may be written over); env actors never pay for this check
        for key, dtype, shape, off in layout if lent else ():
            a = arrays[key]
            if start <= a.ctypes.data < end:
                if a.ctypes.data == start + off and a.flags.c_contiguous:
                    placed.add(key)
                else:
                    arrays = {**arrays, key: a.copy()}
        for key, dtype, shape, off in layout:
            if key not in placed:
                dst = np.ndarray(shape, dtype=dtype, buffer=self.buf, offset=off)
                np.copyto(dst, arrays[key], casting="no")
        # (objects pickled here by value: the connection's pickler would send torch tensors as
        # shared-memory handles, which a process of another Ray worker cannot open)
        return self.path, layout, pickle.dumps(inline) if inline else {}

    def _grow(self, nbytes: int) -> None:
        size = max(nbytes, 2 * (0 if self.buf is None else self.buf.shape[0]), 4096)
        self.generation += 1
        path = os.path.join(self.folder, f"{self.name}-{self.generation}.slot")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS at a write
        finally:
            os.close(fd)
        old, self.path = self.path, path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
        self._views = None
        if old is not None:
            os.unlink(old)  # the trainer maps the new file when a reply names it

    def close(self, unlink: bool = True) -> None:
        self.buf, self._views = None, None
        path, self.path = self.path, None
        if path is not None and unlink:
            try:
                os.unlink(path)
            except FileNotFoundError:  # the collector closed and removed its folder meanwhile
                pass


class SlotMaps:
    """Read-only maps of slot files in ``folder`` (checked: regular files of ours there), the
    ``keep`` most recent kept mapped; ``arrays(path, layout, inline)`` gives a reply's arrays."""

    def __init__(self, folder: str, keep: int = 1, writable: bool = False):
        self.folder, self.keep = folder, keep
        self.mode = "r+" if writable else "r"  # (r+: the reader hands out views it may write)
        self.maps: dict[str, np.memmap] = {}

    def arrays(self, path: str | None, layout: list, inline: dict) -> dict:
        buf = self.mapped(path) if layout else None
        arrays = {key: np.ndarray(shape, dtype=dtype, buffer=buf, offset=off)
                  for key, dtype, shape, off in layout}
        arrays.update(pickle.loads(inline) if isinstance(inline, bytes) else inline)
        return arrays

    def mapped(self, path: str) -> np.memmap:
        """The map of slot file ``path`` (checked: a regular file of ours in the folder)."""
        buf = self.maps.get(path)
        if buf is None:
            st = os.lstat(path)
            if os.path.dirname(path) != self.folder or not stat.S_ISREG(st.st_mode) \
                    or st.st_uid != os.getuid():
                raise OSError(f"slot {path} is not a regular file of ours in {self.folder}")
            if len(self.maps) >= self.keep:  # (a grown slot's old file is gone: unmap it)
                self.maps.pop(next(iter(self.maps)))
            buf = self.maps[path] = np.memmap(path, dtype=np.uint8, mode=self.mode,
                                              shape=(st.st_size,))
        return buf

    def clear(self) -> None:
        self.maps = {}


class HandoffServer:
    """The env actor's side: a listening socket and a slot; ``serve(collect)`` runs the loop."""

    def __init__(self, folder: str, name: str, slots: int = 1):
        self.address = os.path.join(folder, f"{name}.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        os.chmod(self.address, 0o600)  # (its folder is 0700 already)
        self.listener.listen(1)
        self.slot = SlotWriter(folder, name, slots)

    def serve(self, collect, connect_timeout_s: float = CONNECT_TIMEOUT_S, raw: bool = False,
              slot_of=None) -> str:
        """Answer requests with ``collect(random_actions) -> (arrays, meta)`` until the trainer
        says stop or goes away, or a batch fails (the failure is the last reply). Returns why
        it ended. ``raw``: ``collect`` gets the request's bytes instead; ``slot_of(request)``:
        the slot the reply goes into (default: in turn), and ``collect`` gets the views of
        that slot's last reply as well (:meth:`_Slot.views`)."""
        self.listener.settimeout(connect_timeout_s)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return "no trainer connected"
        finally:
            self.listener.close()
            try:
                os.unlink(self.address)  # one trainer per hand-off
            except FileNotFoundError:  # the collector closed and removed its folder meanwhile
                pass
        sock.settimeout(None)
        conn = Connection(sock.detach())
        failed = False
        try:
            while True:
                try:
                    request = conn.recv_bytes()
                except (EOFError, OSError):
                    return "trainer gone"
                if request == STOP:
                    return "stopped"
                try:
                    slot = slot_of(request) if slot_of is not None else None
                    if slot is None:
                        arrays, meta = collect(request if raw else request == RANDOM)
                    else:  # (where the slot's last reply was: the sample may go straight there)
                        arrays, meta = collect(request, self.slot.at(slot).views())
                    reply = ("ok", meta, *self.slot.write(arrays, slot))
                except Exception as exc:  # noqa: BLE001 - reported to the trainer, then we end
                    kind = "fatal" if isinstance(exc, FatalWorkerError) else "error"
                    reply = ("error", kind, exc, "".join(traceback.format_exception(exc))[-8000:])
                try:
                    conn.send(reply)
                except (OSError, ValueError):
                    return "trainer gone"
                except Exception:  # noqa: BLE001 - an exception that does not pickle
                    conn.send(reply[:2] + (None,) + reply[3:])
                if reply[0] == "error":
                    failed = True
                    return "failed"
        finally:
            conn.close()
            # after a failure the consumer may still read the batches it was given: the files
            # stay until the consumer removes its folder
            self.slot.close(unlink=not failed)


class WorkerFailed(Exception):
    """The actor's reply to a request was an error: ``kind`` ("error" or "fatal"), the original
    exception when it pickled (``cause``) and the traceback text."""

    def __init__(self, kind: str, cause: BaseException | None, text: str):
        super().__init__(text)
        self.kind, self.cause, self.text = kind, cause, text


class HandoffClient:
    """The trainer's side of one actor's hand-off: ``request`` then ``receive``."""

    def __init__(self, folder: str, address: str, keep: int = 1, writable: bool = False):
        if os.path.dirname(address) != folder:
            raise OSError(f"{address} is not in the collector's folder {folder}")
        self.folder = folder
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        self.conn = Connection(sock.detach())
        self.slots = SlotMaps(folder, keep, writable)

    def fileno(self) -> int:
        return self.conn.fileno()

    def request(self, random_actions: bool, raw: bytes | None = None) -> None:
        """Ask for one batch (``OSError`` if the actor is gone); ``raw``: send these bytes."""
        self.conn.send_bytes(raw if raw is not None else RANDOM if random_actions else COLLECT)

    def receive(self) -> tuple[dict, dict]:
        """The reply: ``(arrays, meta)``; the arrays are views of the slot, valid until the next
        request. ``EOFError``/``OSError``: the actor is gone; ``WorkerFailed``: it raised."""
        meta, where = self.receive_where()
        return self.slots.arrays(*where), meta

    def receive_where(self) -> tuple[dict, tuple]:
        """The reply without reading the slot: ``(meta, (path, layout, inline))``, for a
        consumer in another process (:meth:`SlotMaps.arrays` reads it there)."""
        reply = self.conn.recv()
        if reply[0] == "error":
            raise WorkerFailed(reply[1], reply[2], reply[3])
        _, meta, path, layout, inline = reply
        return meta, (path, layout, inline)

    def close(self, stop: bool = True) -> None:
        """Tell the actor to stop serving (it then takes plain calls again); idempotent."""
        if self.conn.closed:
            return
        if stop:
            try:
                self.conn.send_bytes(STOP)
            except OSError:
                pass
        self.conn.close()
        self.slots.clear()


def layout_views(whole, layout: tuple) -> dict:
    """``{key: tensor}``: the arrays a slot layout places in ``whole`` (a uint8 tensor of the
    slot), as views."""
    return {key: whole[start:stop].view(dtype).view(shape)
            for key, dtype, shape, start, stop in _recipe(layout)}


def layout_end(layout: tuple) -> int:
    """The first byte after the arrays of a slot layout."""
    return max((stop for *_, stop in _recipe(layout)), default=0)


@functools.lru_cache(maxsize=64)
def _recipe(layout: tuple) -> list:
    """``(key, torch dtype, shape, start, stop)`` per array of a slot layout."""
    import torch

    out = []
    for key, dtype, shape, off in layout:
        dtype = np.dtype(dtype)
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        out.append((key, torch_dtype, shape, off, off + dtype.itemsize * math.prod(shape)))
    return out
