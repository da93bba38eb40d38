"""Every setting of drlora-mlx, in two dataclasses validated on construction.

``DRLoRAConfig`` defines the adapter and its growth (the method);
``TrainingArgs`` how to train (data, optimisation, reporting, checkpoints).
CLI flags (``--r-init``), YAML keys (``r_init``) and the Python API
(``DRLoRAConfig(r_init=...)``) map onto their fields one to one, and
``resolve`` layers them: defaults < the built-in model's preset < a resumed
run's own settings < the YAML file < the command line.

Without a model, ``TrainingArgs`` takes the preset of the built-in tiny MoE for
every field that was not given (``TrainingArgs()`` is what ``drlora-mlx
train`` with no arguments runs).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

from .errors import InputError
from .saliency import SALIENCY_MODES
from .schedule import GrowthSchedule, auto_grow_every, auto_growth_buffer

METHODS = ("drlora", "lora")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TRAIN_ROUTER = ("after-warmup", "never", "always")
ROUTING_SIGNALS = ("weight", "count")
ALLOCATIONS = ("per-layer", "global")
LR_SCHEDULES = ("linear", "cosine", "constant")
# The router's full weights take larger steps than the LoRA factors at the same
# learning rate; their default learning rate is this share of --learning-rate
# (chosen by scripts/experiment.py's router ablation, see BENCHMARKS.md).
ROUTER_LR_SCALE = 0.3


class ConfigError(InputError):
    """A setting out of range or of the wrong type; the message names it."""


def _setting(default, text: str, **rules):
    """A dataclass field with its help text and validation rules in the metadata:
    ``choices``, ``at_least`` (a number), ``positive`` (True), and for fields
    whose default depends on the model, ``usual`` / ``builtin`` (the field's
    default is then None until ``__post_init__`` picks one)."""
    return field(default=default, metadata={"help": text, **rules})


def _check(obj) -> None:
    """The per-field rules of a settings dataclass (cross-field rules are the class's own)."""
    for f in fields(obj):
        value, rules = getattr(obj, f.name), f.metadata
        if value is None:
            continue
        if "choices" in rules and value not in rules["choices"]:
            raise ConfigError(f"{f.name} must be one of {', '.join(rules['choices'])}; got {value!r}")
        if "at_least" in rules and value < rules["at_least"]:
            raise ConfigError(f"{f.name} must be at least {rules['at_least']}; got {value}")
        if rules.get("positive") and not value > 0:
            raise ConfigError(f"{f.name} must be positive; got {value}")


def _fill_model_defaults(obj, builtin: bool) -> None:
    for f in fields(obj):
        if getattr(obj, f.name) is None and "usual" in f.metadata:
            value = f.metadata["builtin"] if builtin and "builtin" in f.metadata else f.metadata["usual"]
            object.__setattr__(obj, f.name, value)


class Ranks(NamedTuple):
    """The three ranks of a run, in the paper's order of mention."""

    r_init: int
    r_target: int
    r_max: int


@dataclass(frozen=True)
class DRLoRAConfig:
    """Everything that defines the adapter and its growth, nothing about data or optimisation."""

    method: str = _setting("drlora", "drlora (growing ranks) or lora (uniform rank)", choices=METHODS)
    r_init: int = _setting(8, "Active rank of every expert module at the start.")
    r_max: int = _setting(32, "Largest rank a module can grow to (allocated width).")
    r_target: int = _setting(16, "Mean rank per layer at the end: the parameter budget.")
    lora_rank: int = _setting(16, "Rank of every module with --method lora.", at_least=1)
    scale: float = _setting(2.0, "Constant LoRA scale (the paper's alpha/r = 2).", positive=True)
    grow_every: int | None = _setting(None, "Steps between growth events (T_grow); default 200, less for short runs.",
                                      at_least=1)
    grow_fraction: float = _setting(0.1, "p_grow: a module gains at most floor((r_max - r_init) * p_grow) ranks per "
                                         "event.")
    ema_beta: float = _setting(0.9, "beta of the routing-frequency and rank-importance EMAs.")
    rank_penalty: float = _setting(1.2, "gamma in the saliency's (r + 1) ** gamma.", at_least=0)
    warmup_ratio: float = _setting(0.03, "Share of the steps before the first growth event (and learning-rate "
                                         "warm-up).")
    growth_buffer: int | None = _setting(None, "Steps after the last growth event (T_buffer); default 200, less for "
                                               "short runs.", at_least=0)
    targets: tuple[str, ...] = _setting(("up_proj", "down_proj"), "Expert projections to adapt (comma list of "
                                                                   "gate_proj, up_proj, down_proj).")
    train_router: str = _setting("after-warmup", "When the router's full weights train.", choices=TRAIN_ROUTER)
    saliency: str = _setting("both", "Saliency signals: both, or one for the ablations.", choices=SALIENCY_MODES)
    routing_signal: str = _setting("weight", "Routing frequency from the applied routing weights or from token counts.",
                                   choices=ROUTING_SIGNALS)
    allocation: str = _setting("per-layer", "Rank budget per layer (the paper) or pooled over layers (ablation).",
                               choices=ALLOCATIONS)
    shared_expert_rank: int = _setting(0, "Fixed LoRA rank for shared experts, outside the growth pool (0: not "
                                          "adapted).", at_least=0)
    attention_rank: int = _setting(0, "Fixed LoRA rank for the attention projections (0: not adapted).", at_least=0)
    active_width: bool = _setting(True, "Compute the expert LoRA at the smallest r_init * 2^k covering the largest "
                                        "active rank (few compiled shapes) instead of always at r_max.")

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))
        _check(self)
        if self.method == "drlora" and not (1 <= self.r_init < self.r_target <= self.r_max):
            raise ConfigError(
                f"ranks must satisfy 1 <= r_init < r_target <= r_max; got r_init={self.r_init}, "
                f"r_target={self.r_target}, r_max={self.r_max} (for one fixed rank use --method lora)"
            )
        if not self.targets:
            raise ConfigError("targets must name at least one expert projection: gate_proj, up_proj, down_proj")
        for t in self.targets:
            if t not in EXPERT_PROJECTIONS:
                raise ConfigError(f"targets: unknown expert projection {t!r}; choose from {', '.join(EXPERT_PROJECTIONS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets lists a projection twice: {','.join(self.targets)}")
        if not 0 < self.grow_fraction <= 1:
            raise ConfigError(f"grow_fraction must be in (0, 1]; got {self.grow_fraction}")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"ema_beta must be in [0, 1); got {self.ema_beta}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")

    @property
    def ranks(self) -> Ranks:
        """The ranks as trained: all three equal to lora_rank for uniform LoRA."""
        if self.method == "lora":
            return Ranks(self.lora_rank, self.lora_rank, self.lora_rank)
        return Ranks(self.r_init, self.r_target, self.r_max)

    def schedule(self, total_steps: int, n_modules: int) -> GrowthSchedule:
        """The growth schedule of a run of ``total_steps`` optimizer steps."""
        r = self.ranks
        return GrowthSchedule(
            total_steps=total_steps,
            n_modules=n_modules,
            r_init=r.r_init,
            r_target=r.r_target,
            r_max=r.r_max,
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
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown DR-LoRA setting(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class TrainingArgs:
    """How to train: data, optimisation, reporting, checkpoints. (The method is ``DRLoRAConfig``.)"""

    model: str | None = _setting(None, "Local model folder or Hugging Face id (default: the built-in tiny MoE).")
    data: str | None = _setting(None, "Folder with train.jsonl, valid.jsonl, test.jsonl (default: the bundled tasks).")
    adapter_path: str = _setting("adapters", "Where the adapter, metrics and state are written.")
    iters: int | None = _setting(None, "Training iterations (batches) [default: 1000; the built-in model: 200].",
                                 at_least=1, usual=1000, builtin=200)
    batch_size: int | None = _setting(None, "Examples per batch [default: 4; the built-in model: 8].",
                                      at_least=1, usual=4, builtin=8)
    learning_rate: float | None = _setting(None, "Peak AdamW learning rate [default: 1e-5; the built-in model: 2e-3].",
                                           positive=True, usual=1e-5, builtin=2e-3)
    router_learning_rate: float | None = _setting(None, "Peak learning rate of the router's full weights, when they "
                                                        f"train [default: --learning-rate x {ROUTER_LR_SCALE}].",
                                                  positive=True)
    lr_schedule: str = _setting("linear", "Decay after the warm-up.", choices=LR_SCHEDULES)
    weight_decay: float = _setting(0.0, "AdamW weight decay (never applied to inactive ranks).", at_least=0)
    max_seq_length: int = _setting(2048, "Longer examples are truncated.", at_least=1)
    grad_accumulation_steps: int = _setting(1, "Batches per optimizer update.", at_least=1)
    grad_checkpoint: bool = _setting(False, "Recompute activations in the backward pass to save memory.")
    mask_prompt: bool | None = _setting(None, "Train on completions only (completions and chat data) [default: off; "
                                              "the built-in model: on].", usual=False, builtin=True)
    steps_per_report: int = _setting(10, "Iterations between loss reports.", at_least=1)
    steps_per_eval: int | None = _setting(None, "Iterations between validation-loss evaluations [default: 200; the "
                                                "built-in model: 50].", at_least=1, usual=200, builtin=50)
    val_batches: int | None = _setting(None, "Validation batches per evaluation (-1: all) [default: 25; the built-in "
                                             "model: 10].", at_least=-1, usual=25, builtin=10)
    save_every: int = _setting(100, "Iterations between adapter saves.", at_least=1)
    seed: int = _setting(0, "Random seed (LoRA initialisation and batch order).")
    test: bool = _setting(False, "Evaluate the test set after training.")
    test_batches: int = _setting(500, "Test batches to evaluate (-1: all).", at_least=-1)
    resume: bool = _setting(False, "Continue the run in --adapter-path from its newest complete checkpoint.")
    resume_from: str | None = _setting(None, "Continue from this checkpoint folder, or start from a `drlora-mlx "
                                             "export` PEFT adapter.")
    keep_checkpoints: int = _setting(2, "Checkpoints to keep (the newest).", at_least=1)
    skip_nonfinite: int = _setting(0, "Batches with a NaN/inf loss or gradient to skip before stopping.", at_least=0)
    peer_timeout: int = _setting(600, "Data parallel: seconds without progress after which a process stops, its "
                                      "peers presumed lost.", at_least=1)

    def __post_init__(self):
        _fill_model_defaults(self, builtin=self.model is None)
        if self.router_learning_rate is None:
            object.__setattr__(self, "router_learning_rate", self.learning_rate * ROUTER_LR_SCALE)
        _check(self)
        if self.iters % self.grad_accumulation_steps:
            raise ConfigError(
                f"iters ({self.iters}) must be a multiple of grad_accumulation_steps ({self.grad_accumulation_steps})"
            )

    @property
    def optimizer_steps(self) -> int:
        return self.iters // self.grad_accumulation_steps

    def to_dict(self) -> dict:
        return asdict(self)


# ----- YAML files and layering ------------------------------------------------------


def read_yaml(path: str) -> dict:
    """The settings of a YAML file (a mapping of setting names to values)."""
    import yaml

    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


def _typed(key: str, value, kind: str, source: str):
    """A file's value as the field's type (ints where floats are expected are fine)."""
    if value is None and "None" in kind:
        return value
    if key == "targets" and isinstance(value, (list, str)):
        return value
    if "bool" in kind:
        ok = isinstance(value, bool)
    elif "float" in kind:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif "int" in kind:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = next(t for t in ("bool", "float", "int", "str") if t in kind)
        raise ConfigError(f"{source}: {key} must be {want}, got {value!r}")
    return float(value) if "float" in kind else value


def setting_fields():
    """Every setting field of both dataclasses."""
    return fields(TrainingArgs) + fields(DRLoRAConfig)


def resolve(given: dict, file_settings: dict | None = None, source: str = "config file",
            base: dict | None = None) -> tuple[TrainingArgs, DRLoRAConfig]:
    """(TrainingArgs, DRLoRAConfig) from the command line (``given``, typed
    already), a YAML file's settings and ``base`` (a resumed run's own
    settings), over the defaults."""
    kinds = {f.name: str(f.type) for f in setting_fields()}
    file_settings = file_settings or {}
    for key in file_settings:
        if key not in kinds:
            close = difflib.get_close_matches(str(key).replace("-", "_"), sorted(kinds), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    settings = dict(base or {})
    settings.update({k: _typed(k, v, kinds[k], source) for k, v in file_settings.items()})
    settings.update(given)
    training = {f.name for f in fields(TrainingArgs)}
    args = TrainingArgs(**{k: v for k, v in settings.items() if k in training})
    config = DRLoRAConfig(**{k: v for k, v in settings.items() if k not in training})
    return args, config


def run_settings(args: TrainingArgs, config: DRLoRAConfig) -> dict:
    """The record of a run's settings that checkpoints and adapters keep."""
    return {"training": args.to_dict(), "method": config.to_dict()}
