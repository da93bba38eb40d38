"""The optimizers a run can use and their learning-rate schedules.

mlx_lm.lora's choice, with its names: ``optimizer`` is one of adam, adamw,
muon, sgd, adafactor (the ``mlx.optimizers`` class of that name) and
``optimizer_config`` maps an optimizer's name to the keyword arguments of its
class. ``lr_schedule`` is ours (linear, cosine or constant decay after a linear
warm-up over the growth warm-up) or mlx-lm's block ``{name, warmup,
warmup_init, arguments}``. The router's full weights get a second optimizer of
the same kind at ``router_learning_rate``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING

import mlx.optimizers as optim
from mlx_lm.tuner.utils import build_schedule

from .config import ConfigError

if TYPE_CHECKING:
    from .config import TrainingArgs
    from .drlora import DRLoRA

OPTIMIZER_CLASSES = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
                     "adafactor": optim.Adafactor}
# The keys of mlx-lm's lr_schedule block; ``name`` and ``arguments`` are required.
SCHEDULE_KEYS = ("name", "warmup", "warmup_init", "arguments")
# mlx.optimizers.schedulers that build_schedule can call with positional arguments.
SCHEDULES = ("cosine_decay", "exponential_decay", "linear_schedule", "step_decay")


def _arguments(name: str) -> list[str]:
    """The keyword arguments of an optimizer class, besides the learning rate."""
    params = inspect.signature(OPTIMIZER_CLASSES[name].__init__).parameters
    return [p for p in params if p not in ("self", "learning_rate")]


def optimizer_kwargs(args: TrainingArgs) -> dict:
    """The keyword arguments the chosen optimizer is made with: ``weight_decay``
    where the class has one, then the optimizer's entry of ``optimizer_config``."""
    kwargs = {"weight_decay": args.weight_decay} if "weight_decay" in _arguments(args.optimizer) else {}
    return {**kwargs, **(args.optimizer_config or {}).get(args.optimizer, {})}


def check_optimizer_settings(args: TrainingArgs) -> None:
    """Refuse, in one line, an ``optimizer_config`` or weight decay the optimizers cannot take."""
    config = args.optimizer_config or {}
    if not isinstance(config, dict):
        raise ConfigError("optimizer_config must map optimizer names to their arguments, e.g. "
                          "{adamw: {betas: [0.9, 0.98]}}")
    for name, kwargs in config.items():
        if name not in OPTIMIZER_CLASSES:
            close = difflib.get_close_matches(str(name).lower(), list(OPTIMIZER_CLASSES), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; choose from {', '.join(OPTIMIZER_CLASSES)}"
            raise ConfigError(f"optimizer_config: unknown optimizer {name!r}{hint}")
        if kwargs is None:
            continue
        if not isinstance(kwargs, dict):
            raise ConfigError(f"optimizer_config.{name} must map argument names to values; got {kwargs!r}")
        allowed = _arguments(name)
        for key in kwargs:
            if key not in allowed:
                cls = OPTIMIZER_CLASSES[name].__name__
                why = " (set learning_rate or lr_schedule instead)" if key == "learning_rate" else ""
                raise ConfigError(f"optimizer_config.{name}: {cls} has no argument {key!r}{why}; it takes "
                                  f"{', '.join(allowed)}")
    chosen = config.get(args.optimizer) or {}
    if args.weight_decay > 0 and "weight_decay" not in _arguments(args.optimizer):
        raise ConfigError(f"weight_decay {args.weight_decay}: {args.optimizer} has no weight decay; use "
                          "optimizer adamw (or set weight_decay 0)")
    if args.weight_decay > 0 and chosen.get("weight_decay", args.weight_decay) != args.weight_decay:
        raise ConfigError(f"weight decay given twice: weight_decay {args.weight_decay} and "
                          f"optimizer_config.{args.optimizer}.weight_decay {chosen['weight_decay']}; keep one")


def check_schedule_block(block: dict) -> None:
    """Refuse, in one line, an mlx-lm ``lr_schedule`` block that ``build_schedule`` cannot use."""
    for key in block:
        if key not in SCHEDULE_KEYS:
            close = difflib.get_close_matches(str(key), SCHEDULE_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; it takes {', '.join(SCHEDULE_KEYS)}"
            raise ConfigError(f"lr_schedule: unknown key {key!r}{hint}")
    name = block.get("name")
    if name not in SCHEDULES:
        raise ConfigError(f"lr_schedule: name must be one of {', '.join(SCHEDULES)} (mlx.optimizers schedules); "
                          f"got {name!r}")
    arguments = block.get("arguments")
    if not isinstance(arguments, list) or not arguments or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in arguments):
        raise ConfigError(f"lr_schedule: arguments must be a list of numbers passed to {name}, the first the "
                          f"initial learning rate; got {arguments!r}")
    warmup = block.get("warmup", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"lr_schedule: warmup must be a whole number of steps (0: none); got {warmup!r}")
    init = block.get("warmup_init", 0.0)
    if not isinstance(init, (int, float)) or isinstance(init, bool):
        raise ConfigError(f"lr_schedule: warmup_init must be a number; got {init!r}")
    try:
        build_schedule(block)(0)
    except (TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"lr_schedule: {name}{tuple(arguments)} cannot be made: {first}") from None


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
