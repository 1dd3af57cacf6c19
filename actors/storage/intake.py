"""A replay-buffer actor's intake from env actors on its node, with no Ray call per batch.

The collector's driver (on the same node) connects to a Unix socket the buffer opens in the
driver's private folder in ``/dev/shm``. It sends groups of batches that env actors left in their
slot files (see :mod:`actors.shm.handoff`): ``(epoch, [(batch_id, (path, layout, inline))])``.
The intake thread maps each slot read-only, writes the batch into the buffer and answers the group
with one acknowledgement per batch; the driver asks those env actors for their next batch only
then, so a slot is never overwritten while it is read. The driver carries names, never frames.

    >>> intake = Intake(folder, write)  # doctest: +SKIP
    >>> intake.address  # the driver connects here  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
import uuid
from multiprocessing.connection import Connection

from actors.shm.folders import check_private, shm_root
from actors.shm.handoff import CONNECT_TIMEOUT_S, SlotMaps

log = logging.getLogger("ray_collectors.intake")

SLOTS_MAPPED = 1024  # slot files kept mapped (one per env actor, a new one when a slot grows)


class Intake:
    """``write([(batch_id, arrays)], epoch) -> [ack]`` is called for each group."""

    def __init__(self, folder: str, write):
        if os.path.dirname(folder) != shm_root():
            raise OSError(f"{folder} is not under this user's {shm_root()}")
        check_private(folder)
        self.write = write
        self.slots = SlotMaps(folder, keep=SLOTS_MAPPED)
        self.address = os.path.join(folder, f"intake-{uuid.uuid4().hex[:8]}.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        os.chmod(self.address, 0o600)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True, name="buffer-intake")
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        finally:
            self.listener.close()
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass
        sock.settimeout(None)
        conn = Connection(sock.detach())
        try:
            while True:
                try:
                    epoch, items = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self._write(items, epoch))
        except (OSError, ValueError):
            return  # the driver went away mid-reply
        finally:
            conn.close()
            self.slots.clear()

    def _write(self, items: list, epoch) -> list[dict]:
        try:
            return self.write([(batch_id, self.slots.arrays(*where)) for batch_id, where in items],
                              epoch)
        except TimeoutError:  # the rate limiter holds writers back: the driver sends them again
            return [{"rate_wait": True}] * len(items)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it
            log.exception("intake of %d batches failed", len(items))
            return [{"error": f"{type(exc).__name__}: {exc}",
                     "traceback": "".join(traceback.format_exception(exc))[-4000:]}] * len(items)
