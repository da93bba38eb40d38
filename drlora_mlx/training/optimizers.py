"""A run's optimizers and learning-rate schedules, made from its settings.

The optimizer is the ``mlx.optimizers`` class the settings name (see
``optimizer_choices``). ``lr_schedule`` is ours (linear, cosine or constant
decay after a linear warm-up over the growth warm-up) or mlx-lm's block
``{name, warmup, warmup_init, arguments}``. The router's full weights get a
second optimizer of the same kind at ``router_learning_rate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.optimizers as optim
from mlx_lm.tuner.utils import build_schedule

from ..config.optimizer_choices import OPTIMIZER_CLASSES
from ..config.optimizer_choices import optimizer_kwargs as choice_kwargs

if TYPE_CHECKING:
    from ..config.settings import TrainingArgs
    from ..lora.handle import DRLoRA


def optimizer_kwargs(args: TrainingArgs) -> dict:
    """The keyword arguments the run's optimizer is made with (see ``optimizer_choices.optimizer_kwargs``)."""
    return choice_kwargs(args.optimizer, args.optimizer_config, args.weight_decay)


def learning_rate_schedule(args: TrainingArgs, warmup_steps: int, peak: float | None = None):
    """The learning rate by optimizer step. Ours: linear warm-up to the peak
    (default ``args.learning_rate``) over the growth warm-up, then the chosen
    decay. An mlx-lm block: mlx-lm's schedule, scaled by ``peak /
    args.learning_rate`` for another peak (the router's)."""
    peak = args.learning_rate if peak is None else peak
    if isinstance(args.lr_schedule, dict):
        schedule, ratio = build_schedule(args.lr_schedule), peak / args.learning_rate
        return schedule if ratio == 1 else (lambda step: schedule(step) * ratio)
    decay_steps = max(args.optimizer_steps - warmup_steps, 1)
    if args.lr_schedule == "linear":
        decay = optim.linear_schedule(peak, 0.0, decay_steps)
    elif args.lr_schedule == "cosine":
        decay = optim.cosine_decay(peak, decay_steps)
    else:
        decay = lambda _: peak  # noqa: E731
    if warmup_steps <= 0:
        return decay
    warmup = optim.linear_schedule(peak / warmup_steps, peak, warmup_steps - 1) if warmup_steps > 1 else (lambda _: peak)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(drlora: DRLoRA, args: TrainingArgs, warmup_steps: int):
    """(optimizer, the LoRA factors' optimizer): the chosen optimizer for the
    LoRA factors and a second one of the same kind, at
    ``args.router_learning_rate``, for the routers' full weights."""
    cls, kwargs = OPTIMIZER_CLASSES[args.optimizer], optimizer_kwargs(args)
    routers = tuple(layer.router_path + "." for layer in drlora.layers)
    lora = cls(learning_rate=learning_rate_schedule(args, warmup_steps), **kwargs)
    router = cls(learning_rate=learning_rate_schedule(args, warmup_steps, args.router_learning_rate), **kwargs)
    return optim.MultiOptimizer([router, lora], [lambda path, _: path.startswith(routers)]), lora


def needs_rank_guard(args: TrainingArgs) -> bool:
    """Whether the optimizer can move parameters whose gradient is zero, so the
    inactive ranks must be put back after each update. Muon orthogonalises
    each factor across its experts, whose active ranks differ, so it mixes
    inactive entries in; weight decay shrinks them. Without weight decay, Adam's,
    SGD's and Adafactor's updates of an entry that never had a gradient are zero."""
    return args.optimizer == "muon" or optimizer_kwargs(args).get("weight_decay", 0) > 0
