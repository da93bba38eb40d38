"""Every setting of drlora-mlx, in two dataclasses validated on construction.

``DRLoRAConfig`` defines the adapter and its growth (the method);
``TrainingArgs`` how to train (data, optimisation, reporting, checkpoints).
CLI flags (``--r-init``), YAML keys (``r_init``) and the Python API
(``DRLoRAConfig(r_init=...)``) map onto their fields one to one, and
``resolve`` layers them: defaults < the built-in model's preset < a resumed
run's own settings < the YAML file < the command line. An mlx_lm.lora
configuration reads with mlx-lm's meaning: most of its keys are fields here
too, and ``from_mlx_lm`` translates the others (``lora_parameters``,
``fine_tune_type``, ``training_mode``, ``config``) onto the fields.

Without a model, ``TrainingArgs`` takes the preset of the built-in tiny MoE for
every field that was not given (``TrainingArgs()`` is what ``drlora-mlx
train`` with no arguments runs).
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from typing import NamedTuple

from ..errors import ConfigError
from ..families.mlx_lm_names import EXPERT_CONTAINERS, EXPERT_PROJECTIONS, PROJECTION_OF
from ..method.routed import RoutedSchedule
from ..method.saliency import SALIENCY_MODES
from ..method.schedule import GrowthSchedule, auto_grow_every, auto_growth_buffer
from .optimizer_choices import (
    OPTIMIZER_CLASSES,
    check_optimizer_settings,
    check_schedule_block,
)

METHODS = ("drlora", "lora", "routed")
TRAIN_ROUTER = ("after-warmup", "never", "always")
ROUTING_SIGNALS = ("weight", "count")
ALLOCATIONS = ("per-layer", "global")
LORA_LAYOUTS = ("pooled", "masked")
LR_SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = tuple(OPTIMIZER_CLASSES)
# The router's full weights take larger steps than the LoRA factors at the same
# learning rate; their default learning rate is this share of --learning-rate
# (chosen by scripts/experiment.py's router ablation, see BENCHMARKS.md).
ROUTER_LR_SCALE = 0.3


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
        # (lr_schedule's mlx-lm block is a mapping: TrainingArgs checks it.)
        if "choices" in rules and not isinstance(value, dict) and value not in rules["choices"]:
            raise ConfigError(f"{f.name} must be one of {', '.join(rules['choices'])}; got {value!r}")
        if "at_least" in rules and value < rules["at_least"]:
            raise ConfigError(f"{f.name} must be at least {rules['at_least']}; got {value}")
        if rules.get("positive") and not value > 0:
            raise ConfigError(f"{f.name} must be positive; got {value}")


def _names(obj, name: str) -> None:
    """A comma list field (a string or a list of strings) as a tuple of stripped names."""
    value = getattr(obj, name)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise ConfigError(f"{name} must be a comma list or a list of names; got {value!r}")
    object.__setattr__(obj, name, tuple(t.strip() for t in items if t.strip()))


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

    method: str = _setting("drlora", "drlora (growing ranks), lora (uniform rank) or routed (the budget on each "
                                     "layer's most routed experts, chosen once after warm-up)", choices=METHODS)
    r_init: int = _setting(8, "Active rank of every expert module at the start.")
    r_max: int = _setting(32, "Largest rank a module can grow to (allocated width).")
    r_target: int = _setting(16, "Mean rank per layer at the end: the parameter budget.")
    lora_rank: int = _setting(16, "Rank of every module with --method lora, and of the --lora-keys modules.",
                              at_least=1)
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
    lora_keys: tuple[str, ...] = _setting((), "Linear modules by their path inside a decoder layer, given fixed-rank "
                                              "LoRA at --lora-rank (comma list, e.g. "
                                              "self_attn.q_proj,self_attn.v_proj).")
    num_layers: int = _setting(-1, "Adapt the last N decoder layers (-1: all): the MoE layers among them get expert "
                                   "LoRA, and --lora-keys and the attention LoRA apply in them only.", at_least=-1)
    lora_layout: str | None = _setting(None, "Where the expert LoRA lives: pooled (the default for DR-LoRA with "
                                             "per-layer allocation: a per-layer pool of r_target ranks per module, "
                                             "the memory of uniform LoRA at r_target) or masked (every expert at "
                                             "r_max; the default otherwise).", choices=LORA_LAYOUTS)
    routed_fraction: float = _setting(0.25, "--method routed: share of each layer's experts that get LoRA, the most "
                                            "routed first (MoE-Sieve's top quarter).")
    routed_share: float = _setting(0.0, "--method routed: instead of --routed-fraction, the fewest most routed "
                                        "experts whose routing shares add up to this (ESFT's threshold; 0: off).",
                                   at_least=0)
    active_width: bool = _setting(True, "Compute the expert LoRA at the smallest r_init * 2^k covering the largest "
                                        "active rank (few compiled shapes) instead of always at r_max.")

    def __post_init__(self):
        _names(self, "targets")
        _names(self, "lora_keys")
        _check(self)
        if self.num_layers == 0:
            raise ConfigError("num_layers must be -1 (all decoder layers) or at least 1; got 0")
        if len(set(self.lora_keys)) != len(self.lora_keys):
            raise ConfigError(f"lora_keys lists a module twice: {','.join(self.lora_keys)}")
        if self.method == "drlora" and not (1 <= self.r_init < self.r_target <= self.r_max):
            raise ConfigError(
                f"ranks must satisfy 1 <= r_init < r_target <= r_max; got r_init={self.r_init}, "
                f"r_target={self.r_target}, r_max={self.r_max} (for one fixed rank use --method lora)"
            )
        if self.method == "routed" and not 1 <= self.r_target <= self.r_max:
            raise ConfigError(f"ranks must satisfy 1 <= r_target <= r_max for --method routed; got "
                              f"r_target={self.r_target}, r_max={self.r_max}")
        if not 0 < self.routed_fraction <= 1:
            raise ConfigError(f"routed_fraction must be in (0, 1]; got {self.routed_fraction}")
        if self.routed_share > 1:
            raise ConfigError(f"routed_share must be in (0, 1], or 0 to use routed_fraction; got {self.routed_share}")
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
        if self.lora_layout == "pooled" and not self._pooled_fits:
            why = "uniform LoRA has no budget to pool" if self.method == "lora" else \
                "global allocation lets a layer take more than its share"
            raise ConfigError(f"lora_layout pooled sizes each layer's LoRA state to its rank budget, and {why}; "
                              "use lora_layout masked (or leave it out)")

    @property
    def _pooled_fits(self) -> bool:
        return self.method == "routed" or (self.method == "drlora" and self.allocation == "per-layer")

    @property
    def resolved_lora_layout(self) -> str:
        """The expert LoRA layout a run uses: ``lora_layout``, or by default pooled where a
        per-layer budget exists (DR-LoRA with per-layer allocation, the routed method), else masked."""
        return self.lora_layout or ("pooled" if self._pooled_fits else "masked")

    @property
    def ranks(self) -> Ranks:
        """The ranks as trained: all three equal to lora_rank for uniform LoRA;
        for the routed method r_init is 0 (LoRA is off while routing is profiled)."""
        if self.method == "lora":
            return Ranks(self.lora_rank, self.lora_rank, self.lora_rank)
        if self.method == "routed":
            return Ranks(0, self.r_target, self.r_max)
        return Ranks(self.r_init, self.r_target, self.r_max)

    def schedule(self, total_steps: int, n_modules: int) -> GrowthSchedule:
        """The growth schedule of a run of ``total_steps`` optimizer steps (the
        routed method's: its one event at t_warmup)."""
        r = self.ranks
        kind = RoutedSchedule if self.method == "routed" else GrowthSchedule
        return kind(
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
        d["lora_keys"] = list(self.lora_keys)
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
    data: str | None = _setting(None, "Folder with train.jsonl, valid.jsonl, test.jsonl (default: the bundled tasks, "
                                      "unless hf_dataset is given).")
    hf_dataset: dict | list | None = _setting(None, "YAML only: Hugging Face dataset(s) to train on, as mlx_lm.lora "
                                                    "reads them ({path, train_split, valid_split, test_split, ...} "
                                                    "or a list of them).")
    prompt_feature: str = _setting("prompt", "Field of the prompt in prompt/completion data.")
    completion_feature: str = _setting("completion", "Field of the completion in prompt/completion data.")
    chat_feature: str = _setting("messages", "Field of the messages in chat data.")
    text_feature: str = _setting("text", "Field of the text in text data.")
    trust_remote_code: bool = _setting(False, "Let the tokenizer run code that comes with the model "
                                              "(transformers' trust_remote_code).")
    train: bool = _setting(True, "Train the adapter (false with --test: evaluate the adapter in --adapter-path).")
    adapter_path: str = _setting("adapters", "Where the adapter, metrics and state are written.")
    iters: int | None = _setting(None, "Training iterations (batches) [default: 1000; the built-in model: 200].",
                                 at_least=1, usual=1000, builtin=200)
    batch_size: int | None = _setting(None, "Examples per batch [default: 4; the built-in model: 8].",
                                      at_least=1, usual=4, builtin=8)
    learning_rate: float | None = _setting(None, "Peak learning rate [default: 1e-5; the built-in model: 2e-3].",
                                           positive=True, usual=1e-5, builtin=2e-3)
    router_learning_rate: float | None = _setting(None, "Peak learning rate of the router's full weights, when they "
                                                        f"train [default: --learning-rate x {ROUTER_LR_SCALE}].",
                                                  positive=True)
    lr_schedule: str | dict = _setting("linear", "Decay after the warm-up (in YAML also mlx-lm's block {name, "
                                                 "warmup, warmup_init, arguments}).", choices=LR_SCHEDULES)
    optimizer: str = _setting("adamw", "Optimizer of the LoRA factors and the router (the mlx.optimizers class).",
                              choices=OPTIMIZERS)
    optimizer_config: dict | None = _setting(None, "YAML only: {optimizer: {keyword arguments of its "
                                                   "mlx.optimizers class}}, as mlx_lm.lora reads it.")
    weight_decay: float = _setting(0.0, "Weight decay of adamw, muon, sgd or adafactor (never applied to inactive "
                                        "ranks).", at_least=0)
    max_seq_length: int = _setting(2048, "Longer examples are truncated.", at_least=1)
    grad_accumulation_steps: int = _setting(1, "Batches per optimizer update.", at_least=1)
    grad_checkpoint: bool = _setting(False, "Recompute activations in the backward pass to save memory.")
    loss_chunk_size: int | None = _setting(None, "Tokens per chunk of the final head and cross-entropy, each chunk's "
                                                 "logits recomputed in the backward pass, so that the loss never holds "
                                                 "every token's logits [default: as many tokens as 8M logits make, "
                                                 "32 MB in float32]; 0: the plain loss, all logits at once (as "
                                                 "mlx-lm).", at_least=0)
    clear_cache_threshold: int | str | None = _setting(None, "Clear MLX's buffer cache after an iteration when it "
                                                             "holds more than this (bytes, or 500MB, 8GB; 0: after "
                                                             "every iteration) [default: never].")
    mask_prompt: bool | None = _setting(None, "Train on completions only (completions and chat data) [default: off; "
                                              "the built-in model: on].", usual=False, builtin=True)
    steps_per_report: int = _setting(10, "Iterations between loss reports.", at_least=1)
    report_to: str | None = _setting(None, "Also report the losses to these services, through mlx-lm's callbacks "
                                           "(comma list: wandb, swanlab).")
    project_name: str | None = _setting(None, "Project name for --report-to.")
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
    resume_adapter_file: str | None = _setting(None, "Start from the LoRA weights of this mlx-lm adapters.safetensors "
                                                     "file.")
    keep_checkpoints: int = _setting(2, "Checkpoints to keep (the newest).", at_least=1)
    skip_nonfinite: int = _setting(0, "Batches with a NaN/inf loss or gradient to skip before stopping.", at_least=0)
    peer_timeout: int = _setting(600, "Data parallel: seconds without progress after which a process stops, its "
                                      "peers presumed lost.", at_least=1)

    def __post_init__(self):
        _fill_model_defaults(self, builtin=self.model is None)
        if self.router_learning_rate is None:
            object.__setattr__(self, "router_learning_rate", self.learning_rate * ROUTER_LR_SCALE)
        if isinstance(self.optimizer, str):  # mlx_lm.lora reads optimizer names in any case
            object.__setattr__(self, "optimizer", self.optimizer.lower())
        if self.clear_cache_threshold is not None:
            object.__setattr__(self, "clear_cache_threshold", byte_count(self.clear_cache_threshold,
                                                                         "clear_cache_threshold"))
        _check(self)
        if isinstance(self.lr_schedule, dict):
            check_schedule_block(self.lr_schedule)
        check_optimizer_settings(self.optimizer, self.optimizer_config, self.weight_decay)
        hf = [self.hf_dataset] if isinstance(self.hf_dataset, dict) else self.hf_dataset
        if hf is not None and (not isinstance(hf, list) or not hf or not all(isinstance(d, dict) for d in hf)):
            raise ConfigError("hf_dataset must be a mapping ({path: ..., train_split: ...}) or a list of them; "
                              f"got {self.hf_dataset!r}")
        if self.iters % self.grad_accumulation_steps:
            raise ConfigError(
                f"iters ({self.iters}) must be a multiple of grad_accumulation_steps ({self.grad_accumulation_steps})"
            )

    @property
    def optimizer_steps(self) -> int:
        return self.iters // self.grad_accumulation_steps

    def to_dict(self) -> dict:
        return asdict(self)


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([MG]B?)?\s*", re.IGNORECASE)


def byte_count(value, name: str) -> int:
    """A byte count given as a number or, as mlx-lm's flags take it, a size such as 500MB or 8G."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{name} must be a byte count such as 1000000, 500MB or 8GB; got {value!r}")
    unit = {"": 1, "M": 10**6, "G": 10**9}[(match[2] or "")[:1].upper()]
    return int(Decimal(match[1]) * unit)


# ----- YAML files and layering ------------------------------------------------------


# YAML 1.1 reads 1e-5 and 2.0e5 as strings (its floats need a dot and a signed exponent); mlx_lm.lora
# reads them as numbers, and so does a config file here.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """yaml.safe_load's loader, plus floats written with an exponent only."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return Loader


def read_yaml(path: str) -> dict:
    """The settings of a YAML file (a mapping of setting names to values)."""
    import yaml

    try:
        with open(path) as f:
            loaded = yaml.load(f, _yaml_loader())
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


# ----- mlx_lm.lora's own keys -------------------------------------------------------

# Keys of mlx_lm.lora's configuration that are no field here; ``from_mlx_lm`` says what they mean.
MLX_LM_KEYS = ("fine_tune_type", "training_mode", "lora_parameters", "config")
LORA_PARAMETERS = ("rank", "scale", "dropout", "keys")


def _number(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    return value


def _split_keys(keys) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targets, lora_keys) of mlx-lm's ``lora_parameters.keys``: a key naming
    a projection of the routed experts (``mlp.switch_mlp.up_proj``, SwitchMLP's
    ``fc1`` / ``fc2``) selects that expert projection; any other key is a
    linear module of the decoder layer."""
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ConfigError(f"lora_parameters.keys must be a list of module paths (e.g. self_attn.q_proj); got {keys!r}")
    targets, others = [], []
    for key in (k.strip() for k in keys):
        parts = key.split(".")
        if len(parts) >= 2 and parts[-1] in PROJECTION_OF and parts[-2] in EXPERT_CONTAINERS:
            targets.append(PROJECTION_OF[parts[-1]])
        else:
            others.append(key)
    return tuple(dict.fromkeys(targets)), tuple(dict.fromkeys(others))


def _lora_parameters(block, where: str) -> dict:
    """The fields mlx-lm's ``lora_parameters`` block sets."""
    if not isinstance(block, dict):
        raise ConfigError(f"{where}lora_parameters must be a mapping of rank, scale, dropout, keys; got {block!r}")
    for key in block:
        if key not in LORA_PARAMETERS:
            close = difflib.get_close_matches(str(key), LORA_PARAMETERS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if key == "alpha":
                hint = " (mlx-lm's LoRA takes scale, the factor alpha / rank)"
            raise ConfigError(f"{where}lora_parameters: unknown key {key!r}{hint}")
    out = {}
    if block.get("rank") is not None:
        rank = block["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"{where}lora_parameters.rank must be a whole number of at least 1; got {rank!r}")
        # One rank means the uniform LoRA rank, and for DR-LoRA the budget around it.
        out.update(lora_rank=rank, r_target=rank, r_init=max(1, rank // 2), r_max=2 * rank)
    if block.get("scale") is not None:
        out["scale"] = _number(block["scale"], f"{where}lora_parameters.scale")
    if block.get("dropout") is not None and _number(block["dropout"], f"{where}lora_parameters.dropout") != 0:
        raise ConfigError(f"{where}lora_parameters.dropout {block['dropout']}: drlora-mlx has no LoRA dropout; "
                          "set dropout: 0.0")
    if block.get("keys") is not None:
        targets, lora_keys = _split_keys(block["keys"])
        if targets:
            out["targets"] = list(targets)
        if lora_keys:
            out["lora_keys"] = list(lora_keys)
    return out


def from_mlx_lm(settings: dict, source: str = "") -> dict:
    """``settings`` with mlx_lm.lora's own keys replaced by the fields they mean:

    - ``fine_tune_type: lora`` is ``method: lora`` (dora and full are refused);
    - ``training_mode`` must be ``normal``; ``config`` must be null;
    - ``lora_parameters``: ``rank`` is ``lora_rank`` and the DR-LoRA budget
      (``r_target = rank``, ``r_init = rank // 2``, ``r_max = 2 * rank``),
      ``scale`` is ``scale``, ``dropout`` must be 0, ``keys`` naming a
      projection of the routed experts (``mlp.switch_mlp.up_proj``) are
      ``targets`` and the other keys ``lora_keys``.

    A field that ``settings`` names itself wins over one derived here.
    ``source`` (a config file) begins the error messages."""
    where = f"{source}: " if source else ""
    out = {k: v for k, v in settings.items() if k not in MLX_LM_KEYS}
    derived = {}
    kind = settings.get("fine_tune_type")
    if kind == "lora":
        derived["method"] = "lora"
    elif kind in ("dora", "full"):
        raise ConfigError(f"{where}fine_tune_type {kind}: drlora-mlx trains LoRA only; use fine_tune_type lora "
                          "(uniform LoRA) or leave it out (DR-LoRA)")
    elif kind is not None:
        raise ConfigError(f"{where}fine_tune_type must be lora; got {kind!r}")
    mode = settings.get("training_mode")
    if mode is not None and mode != "normal":
        raise ConfigError(f"{where}training_mode {mode!r}: drlora-mlx trains on the next-token loss only; set "
                          "training_mode: normal")
    if settings.get("config") is not None:
        raise ConfigError(f"{where}config {settings['config']!r}: a config file cannot name another; give one "
                          "file with -c")
    if settings.get("lora_parameters") is not None:
        derived.update(_lora_parameters(settings["lora_parameters"], where))
    return {**derived, **out}


def _typed(key: str, value, kind: str, source: str):
    """A file's value as the field's type (ints where floats are expected are fine;
    a list field takes a list or a comma list)."""
    if value is None and "None" in kind:
        return value
    types = ["list", "str"] if kind.startswith("tuple") else [t.strip() for t in kind.split("|")]
    accepts = {
        "bool": isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }
    if not any(accepts.get(t, False) for t in types):
        raise ConfigError(f"{source}: {key} must be {types[0]}, got {value!r}")
    return float(value) if types[0] == "float" else value


def setting_fields():
    """Every setting field of both dataclasses."""
    return fields(TrainingArgs) + fields(DRLoRAConfig)


def resolve(given: dict, file_settings: dict | None = None, source: str = "config file",
            base: dict | None = None) -> tuple[TrainingArgs, DRLoRAConfig]:
    """(TrainingArgs, DRLoRAConfig) from the command line (``given``, typed
    already), a YAML file's settings and ``base`` (a resumed run's own
    settings), over the defaults. mlx_lm.lora's own keys are read as
    ``from_mlx_lm`` says, in the file and on the command line alike."""
    kinds = {f.name: str(f.type) for f in setting_fields()}
    file_settings = file_settings or {}
    for key in file_settings:
        if key not in kinds and key not in MLX_LM_KEYS:
            close = difflib.get_close_matches(str(key).replace("-", "_"), sorted([*kinds, *MLX_LM_KEYS]), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    settings = dict(base or {})
    settings.update({k: _typed(k, v, kinds[k], source) for k, v in from_mlx_lm(file_settings, source).items()})
    settings.update(from_mlx_lm(given))
    training = {f.name for f in fields(TrainingArgs)}
    args = TrainingArgs(**{k: v for k, v in settings.items() if k in training})
    config = DRLoRAConfig(**{k: v for k, v in settings.items() if k not in training})
    return args, config


def run_settings(args: TrainingArgs, config: DRLoRAConfig) -> dict:
    """The record of a run's settings that checkpoints and adapters keep."""
    return {"training": args.to_dict(), "method": config.to_dict()}
