"""One run per adapter folder: a lock the operating system releases when its process ends.

The lock is ``fcntl.flock`` on ``<adapter-path>/.drlora-mlx.lock``: a second run
into the same folder is refused at once, and a lock left by a process that
died (even by SIGKILL) is free again, since the kernel drops it with the
process. The file records the holder's process id for the message.
A run takes it once (``training.run.run``, before it decides where it
starts); data-parallel processes other than 0 take none (process 0 writes for
all of them).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from ..files import storage

LOCK = ".drlora-mlx.lock"


class FolderInUse(InputError):
    """Another run holds the adapter folder."""


@contextmanager
def holding(adapter_path: str | os.PathLike, world=None):
    """Hold the lock of ``adapter_path`` while the body runs (refuse when another process holds it)."""
    folder = Path(adapter_path).resolve()
    if world is not None and world.rank() != 0:
        yield
        return
    with storage("the run's lock", folder):
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderInUse(
            f"{adapter_path} is in use by another drlora-mlx run (process {holder}); wait for it to end or "
            "give --adapter-path another folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
