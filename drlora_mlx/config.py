"""The DR-LoRA method configuration: one dataclass, validated on construction.

CLI flags (``--r-init``), YAML keys (``r_init``) and the Python API
(``DRLoRAConfig(r_init=...)``) map onto its fields one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .schedule import GrowthSchedule, auto_grow_every, auto_growth_buffer
from .saliency import SALIENCY_MODES

METHODS = ("drlora", "lora")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TRAIN_ROUTER = ("after-warmup", "never", "always")
ROUTING_SIGNALS = ("weight", "count")
ALLOCATIONS = ("per-layer", "global")


class ConfigError(ValueError):
    """A configuration value out of range; the message names the field."""


def _help(text: str, **extra):
    return {"help": text, **extra}


@dataclass(frozen=True)
class DRLoRAConfig:
    """Everything that defines the adapter and its growth, nothing about data or optimisation."""

    method: str = field(default="drlora", metadata=_help("drlora (growing ranks) or lora (uniform rank)", choices=METHODS))
    r_init: int = field(default=8, metadata=_help("Active rank of every expert module at the start."))
    r_max: int = field(default=32, metadata=_help("Largest rank a module can grow to (allocated width)."))
    r_target: int = field(default=16, metadata=_help("Mean rank per layer at the end: the parameter budget."))
    lora_rank: int = field(default=16, metadata=_help("Rank of every module with --method lora."))
    scale: float = field(default=2.0, metadata=_help("Constant LoRA scale (the paper's alpha/r = 2)."))
    grow_every: int | None = field(default=None, metadata=_help("Steps between growth events (T_grow); default 200, less for short runs."))
    grow_fraction: float = field(default=0.1, metadata=_help("p_grow: a module gains at most floor((r_max - r_init) * p_grow) ranks per event."))
    ema_beta: float = field(default=0.9, metadata=_help("beta of the routing-frequency and rank-importance EMAs."))
    rank_penalty: float = field(default=1.2, metadata=_help("gamma in the saliency's (r + 1) ** gamma."))
    warmup_ratio: float = field(default=0.03, metadata=_help("Share of the steps before the first growth event (and learning-rate warm-up)."))
    growth_buffer: int | None = field(default=None, metadata=_help("Steps after the last growth event (T_buffer); default 200, less for short runs."))
    targets: tuple[str, ...] = field(default=("up_proj", "down_proj"), metadata=_help("Expert projections to adapt (comma list of gate_proj, up_proj, down_proj)."))
    train_router: str = field(default="after-warmup", metadata=_help("When the router's full weights train.", choices=TRAIN_ROUTER))
    saliency: str = field(default="both", metadata=_help("Saliency signals: both, or one for the ablations.", choices=SALIENCY_MODES))
    routing_signal: str = field(default="weight", metadata=_help("Routing frequency from the applied routing weights or from token counts.", choices=ROUTING_SIGNALS))
    allocation: str = field(default="per-layer", metadata=_help("Rank budget per layer (the paper) or pooled over layers (ablation).", choices=ALLOCATIONS))
    shared_expert_rank: int = field(default=0, metadata=_help("Fixed LoRA rank for shared experts, outside the growth pool (0: not adapted)."))
    attention_rank: int = field(default=0, metadata=_help("Fixed LoRA rank for the attention projections (0: not adapted)."))
    active_width: bool = field(default=True, metadata=_help("Compute the expert LoRA at the smallest r_init * 2^k covering the largest active rank (few compiled shapes) instead of always at r_max."))

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        if self.method == "drlora":
            if not (1 <= self.r_init < self.r_target <= self.r_max):
                raise ConfigError(
                    f"ranks must satisfy 1 <= r_init < r_target <= r_max; got r_init={self.r_init}, "
                    f"r_target={self.r_target}, r_max={self.r_max} (for one fixed rank use --method lora)"
                )
        elif self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be at least 1; got {self.lora_rank}")
        if not self.targets:
            raise ConfigError("targets must name at least one expert projection: gate_proj, up_proj, down_proj")
        for t in self.targets:
            if t not in EXPERT_PROJECTIONS:
                raise ConfigError(f"targets: unknown expert projection {t!r}; choose from {', '.join(EXPERT_PROJECTIONS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets lists a projection twice: {','.join(self.targets)}")
        if not self.scale > 0:
            raise ConfigError(f"scale must be positive; got {self.scale}")
        if not 0 < self.grow_fraction <= 1:
            raise ConfigError(f"grow_fraction must be in (0, 1]; got {self.grow_fraction}")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"ema_beta must be in [0, 1); got {self.ema_beta}")
        if not self.rank_penalty >= 0:
            raise ConfigError(f"rank_penalty must be >= 0; got {self.rank_penalty}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.grow_every is not None and self.grow_every < 1:
            raise ConfigError(f"grow_every must be at least 1; got {self.grow_every}")
        if self.growth_buffer is not None and self.growth_buffer < 0:
            raise ConfigError(f"growth_buffer must be >= 0; got {self.growth_buffer}")
        for name in ("shared_expert_rank", "attention_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")

    @property
    def ranks(self) -> tuple[int, int, int]:
        """(r_init, r_target, r_max) as trained: all equal to lora_rank for uniform LoRA."""
        if self.method == "lora":
            return (self.lora_rank,) * 3
        return self.r_init, self.r_target, self.r_max

    def schedule(self, total_steps: int, n_modules: int) -> GrowthSchedule:
        """The growth schedule of a run of ``total_steps`` optimizer steps."""
        r_init, r_target, r_max = self.ranks
        return GrowthSchedule(
            total_steps=total_steps,
            n_modules=n_modules,
            r_init=r_init,
            r_max=r_max,
            r_target=r_target,
            warmup_ratio=self.warmup_ratio,
            grow_every=self.grow_every if self.grow_every is not None else auto_grow_every(total_steps),
            growth_buffer=self.growth_buffer if self.growth_buffer is not None else auto_growth_buffer(total_steps),
            grow_fraction=self.grow_fraction,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DRLoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown DR-LoRA setting(s): {', '.join(unknown)}")
        return cls(**d)
