"""Faults on demand, for the tests that check how a run survives them.

Set in the environment of a run, ``install`` wraps the trainer's methods (and
the checkpoint writer) for that run only; without them nothing is touched, and
the training code itself has no hooks.

- ``DRLORA_MLX_FAULT_NAN_AT=3,7``: those iterations' gradients are non-finite
  (a NaN in one trainable array while their step runs, put back after it);
- ``DRLORA_MLX_FAULT_DIVERGE_RANK=1``: that data-parallel process grows one
  rank more than the others at the first growth event;
- ``DRLORA_MLX_FAULT_SLOW_SAVE=3``: every checkpoint waits 3 s between being
  written and being made visible;
- ``DRLORA_MLX_FAULT_KILL_AT=25`` (with ``DRLORA_MLX_FAULT_KILL_RANK=1``): that
  data-parallel process kills itself (SIGKILL) at the start of that iteration.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import checkpoint

NAN_AT = "DRLORA_MLX_FAULT_NAN_AT"
DIVERGE_RANK = "DRLORA_MLX_FAULT_DIVERGE_RANK"
SLOW_SAVE = "DRLORA_MLX_FAULT_SLOW_SAVE"
KILL_AT = "DRLORA_MLX_FAULT_KILL_AT"
KILL_RANK = "DRLORA_MLX_FAULT_KILL_RANK"


def _nan_at(trainer, iterations: set[int]) -> None:
    step = trainer._run_step

    def poisoned(batch, lengths, update):
        if trainer.iteration + 1 not in iterations:
            return step(batch, lengths, update)
        name, kept = tree_flatten(trainer.model.trainable_parameters())[0]
        trainer.model.update(tree_unflatten([(name, kept * mx.array(float("nan")))]))
        try:
            return step(batch, lengths, update)
        finally:
            trainer.model.update(tree_unflatten([(name, kept)]))

    trainer._run_step = poisoned


def _kill_at(trainer, iteration: int, rank: int) -> None:
    step = trainer._run_step

    def killed(batch, lengths, update):
        if trainer.iteration + 1 == iteration and trainer.rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(batch, lengths, update)

    trainer._run_step = killed


def _diverge(trainer, rank: int) -> None:
    check = trainer._check_agreement
    pending = [rank == trainer.rank]

    def diverged(step):
        if pending.pop() if pending else False:
            ranks = trainer.drlora.ranks()
            ranks[0, 0] = min(ranks[0, 0] + 1, trainer.drlora.r_max)
            trainer.drlora.set_ranks(ranks)
        return check(step)

    trainer._check_agreement = diverged


@contextmanager
def installed(trainer, environ=None):
    """The faults the environment asks for, on ``trainer`` and its checkpoints, while the body runs."""
    environ = os.environ if environ is None else environ
    iterations = {int(i) for i in environ.get(NAN_AT, "").split(",") if i.strip()}
    if iterations:
        _nan_at(trainer, iterations)
    if environ.get(DIVERGE_RANK, "").strip():
        _diverge(trainer, int(environ[DIVERGE_RANK]))
    if environ.get(KILL_AT, "").strip():
        _kill_at(trainer, int(environ[KILL_AT]), int(environ.get(KILL_RANK, "0") or 0))
    pause = float(environ.get(SLOW_SAVE, "0") or 0)
    publish = checkpoint._publish
    if pause:
        def slow(tmp, final):
            time.sleep(pause)
            publish(tmp, final)

        checkpoint._publish = slow
    try:
        yield
    finally:
        checkpoint._publish = publish
