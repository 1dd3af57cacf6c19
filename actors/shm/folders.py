"""Private folders in ``/dev/shm`` for what the trainer and the actors of one node share: a
replay buffer's ring, a collector's weight board and batch slots.

- The root ``/dev/shm/ray-collectors-<uid>`` is created 0700; its owner, mode and type (a real
  directory, not a symlink) are checked by writers and readers, and anything else means "no
  shared memory" (the callers fall back to Ray's object store).
- Each folder holds a ``writer.lock`` that its creator locks exclusively (``flock``) for as long
  as it lives; a folder whose lock can be taken has no writer (the kernel drops the lock with
  the process, in any pid namespace): ``remove_stale`` deletes it.
"""
from __future__ import annotations

import fcntl
import os
import platform
import shutil
import stat
import uuid

SHM = "/dev/shm"
LOCK = "writer.lock"


def shm_root() -> str:
    return os.path.join(SHM, f"ray-collectors-{os.getuid()}")


def check_private(path: str) -> None:
    """``path`` is a real directory of ours that nobody else can enter; else ``OSError``."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a plain directory")
    if st.st_uid != os.getuid():
        raise OSError(f"{path} belongs to uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise OSError(f"{path} has mode {oct(st.st_mode & 0o777)}; expected 0700")


def private_root() -> str:
    """The per-user root, created 0700 if missing and verified either way."""
    root = shm_root()
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    check_private(root)
    return root


def shareable(nbytes: int) -> bool:
    """True when ``nbytes`` of storage fits comfortably in ``/dev/shm`` on an x86 machine."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir(SHM):
        return False
    try:
        st = os.statvfs(SHM)
    except OSError:
        return False
    return nbytes * 2 < st.f_bavail * st.f_frsize


def writer_gone(lock_path: str) -> bool:
    """True when nobody holds the writer's exclusive lock (its process ended)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases a shared lock we may have taken
    return True


def remove_stale() -> None:
    """Delete ring folders whose writer is gone (a buffer actor that was killed)."""
    try:
        root = private_root()
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        folder = os.path.join(root, name)
        if os.path.isdir(folder) and not os.path.islink(folder) and writer_gone(os.path.join(folder, LOCK)):
            shutil.rmtree(folder, ignore_errors=True)


def private_folder(prefix: str = "") -> tuple[str, int]:
    """A new 0700 folder under the private root, and the fd of its ``writer.lock``, locked
    exclusively for this process's life: ``remove_stale`` deletes the folder once it is gone."""
    folder = os.path.join(private_root(), prefix + uuid.uuid4().hex)
    os.mkdir(folder, 0o700)
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, fd


def remove_folder(folder: str | None, lock_fd: int | None) -> None:
    """Remove a folder made by :func:`private_folder`, then release its lock (either may be
    ``None``: nothing to do for it)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    if lock_fd is not None:
        os.close(lock_fd)
