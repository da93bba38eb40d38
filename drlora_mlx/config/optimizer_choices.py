"""The optimizers and learning-rate schedules a run can name, and what each accepts.

mlx_lm.lora's choice, with its names: ``optimizer`` is one of adam, adamw,
muon, sgd, adafactor (the ``mlx.optimizers`` class of that name) and
``optimizer_config`` maps an optimizer's name to the keyword arguments of its
class; mlx-lm's ``lr_schedule`` block is ``{name, warmup, warmup_init,
arguments}``. The settings check their values here when they are made;
``optimizers`` builds a run's optimizers from them.
"""

from __future__ import annotations

import difflib
import inspect

import mlx.optimizers as optim
from mlx_lm.tuner.utils import build_schedule

from ..errors import ConfigError

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


def optimizer_kwargs(optimizer: str, optimizer_config: dict | None, weight_decay: float) -> dict:
    """The keyword arguments ``optimizer`` is made with: ``weight_decay`` where
    the class has one, then the optimizer's entry of ``optimizer_config``."""
    kwargs = {"weight_decay": weight_decay} if "weight_decay" in _arguments(optimizer) else {}
    return {**kwargs, **(optimizer_config or {}).get(optimizer, {})}


def check_optimizer_settings(optimizer: str, optimizer_config: dict | None, weight_decay: float) -> None:
    """Refuse, in one line, an ``optimizer_config`` or weight decay the optimizers cannot take."""
    config = optimizer_config or {}
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
    chosen = config.get(optimizer) or {}
    if weight_decay > 0 and "weight_decay" not in _arguments(optimizer):
        raise ConfigError(f"weight_decay {weight_decay}: {optimizer} has no weight decay; use "
                          "optimizer adamw (or set weight_decay 0)")
    if weight_decay > 0 and chosen.get("weight_decay", weight_decay) != weight_decay:
        raise ConfigError(f"weight decay given twice: weight_decay {weight_decay} and "
                          f"optimizer_config.{optimizer}.weight_decay {chosen['weight_decay']}; keep one")


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
