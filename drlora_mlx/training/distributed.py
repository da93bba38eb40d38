"""What a data-parallel run needs around its compiled step (``mx.distributed``).

The gradients and routing sums are summed over processes inside the step
(``trainer.py``); this module has the rest: the group the process was launched
in, a barrier, naming the process that is gone when a collective fails, and a
watchdog for a peer that hangs without dying (it never closes its connection,
so no collective fails).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import zlib
from contextlib import contextmanager, nullcontext

import mlx.core as mx
import numpy as np

from ..errors import RunStopped


class PeerLost(RunStopped):
    """A data-parallel process is gone; the others stop instead of waiting for it."""

    exit_code = 6

    def __init__(self, who: str, iteration: int, last: str):
        super().__init__(f"{who} is gone (its connection was lost after iteration {iteration}), so this run "
                         f"stopped; {last} (with any number of processes)")


def launched_world():
    """The data-parallel group this process was launched in (``mlx.launch``), or None."""
    launched = mx.distributed.init()
    return launched if launched.size() > 1 else None


def barrier(world) -> None:
    """Every process of ``world`` (if any) has reached this point."""
    if world is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Peers:
    """Every process's id and host, gathered once at the start, to name the one that is gone."""

    def __init__(self, world):
        self.rank, self.size = world.rank(), world.size()
        me = mx.array([os.getpid(), zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF], dtype=mx.int32)
        self.table = np.asarray(mx.distributed.all_gather(me[None], group=world, stream=mx.cpu))  # (size, 2)

    def lost(self) -> str:
        """Which processes are gone: on this host, those whose process ended; else the ring neighbours."""
        host = self.table[self.rank, 1]
        dead = [r for r, (pid, h) in enumerate(self.table)
                if r != self.rank and h == host and not _alive(int(pid))]
        if dead:
            return "data-parallel process " + ", ".join(str(r) for r in dead)
        neighbours = sorted({(self.rank - 1) % self.size, (self.rank + 1) % self.size} - {self.rank})
        return "data-parallel process " + " or ".join(str(r) for r in neighbours)


@contextmanager
def _watching(iteration, timeout: float, message):
    done = threading.Event()
    seen = [iteration(), time.monotonic()]

    def watch():
        while not done.wait(1.0):
            now = iteration()
            if now != seen[0]:
                seen[:] = [now, time.monotonic()]
            elif now > 0 and time.monotonic() - seen[1] > timeout:
                print(f"drlora-mlx: error: {message(now)}", file=sys.stderr, flush=True)
                os._exit(PeerLost.exit_code)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def watchdog(world, iteration, timeout: float, message):
    """While the body runs in a data-parallel ``world``, a process that sees no
    finished iteration (``iteration()``) for ``timeout`` seconds after the first
    prints ``message(iteration)`` as one line and exits with ``PeerLost``'s code.
    Without a world it does nothing."""
    return nullcontext() if world is None else _watching(iteration, timeout, message)
