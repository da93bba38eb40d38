"""Attach DR-LoRA to an mlx-lm MoE model, in place, and hold the method's state.

``attach(model, config)`` finds every MoE block by type (``SwitchGLU`` /
``SwitchMLP``), replaces the target expert projections with
``MaskedLoRASwitchLinear``, swaps the experts and the router for observing
subclasses (see ``routing``), optionally adds fixed-rank LoRA to shared experts
and attention, and freezes everything else. It returns a ``DRLoRA`` object: the
view of all that the trainer, the growth events and the exporters use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP
from mlx_lm.tuner.lora import LoRALinear

from .config import DRLoRAConfig
from .families import Family, UnsupportedModelError, lookup
from .importance import update_importance
from .masked_lora import MaskedLoRASwitchLinear, dequantized_weight
from .routing import RoutingRecorder, RoutingSite, observe, update_frequency
from .saliency import module_importance, saliency
from .schedule import GrowthSchedule, grow

# SwitchMLP names its two projections fc1 / fc2.
_SWITCH_MLP_NAMES = {"up_proj": "fc1", "down_proj": "fc2"}


@dataclass
class MoELayer:
    """One MoE block of the model and its adapted expert projections."""

    index: int  # position in model.layers
    path: str  # dotted path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    experts: nn.Module
    experts_name: str
    router: nn.Module
    modules: list = field(default_factory=list)  # MaskedLoRASwitchLinear, one per target
    module_names: list = field(default_factory=list)  # attribute names inside ``experts``


class RoutingState(nn.Module):
    """Routing frequency f (MoE layers x experts), the method's only state
    outside the adapted layers. A module, so compiled steps carry it."""

    def __init__(self, n_layers: int, n_experts: int):
        super().__init__()
        self.frequency = mx.zeros((n_layers, n_experts))
        self.seen = mx.array(0.0)
        self.freeze()


@dataclass
class GrowthEvent:
    """What one growth event did."""

    step: int
    grown: np.ndarray  # (layers, modules) ranks added

    @property
    def total(self) -> int:
        return int(self.grown.sum())

    def summary(self, drlora: "DRLoRA") -> str:
        parts = []
        for l, row in enumerate(self.grown):
            picks = [f"{drlora.module_label(m)}+{int(n)}" for m in np.flatnonzero(row) for n in [row[m]]]
            if picks:
                parts.append(f"L{drlora.layers[l].index}: " + " ".join(picks))
        return f"step {self.step}: grew {self.total} ranks | " + "; ".join(parts)


def router_linear(router: nn.Module) -> tuple[str, nn.Module]:
    """The linear map inside a router, with its path relative to the router:
    the router itself ("") for linear gates, ``layer`` for Granite's gating,
    and the router for DeepSeek-style gates that hold a bare ``weight``."""
    if "layer" in router and isinstance(router["layer"], nn.Module):
        return "layer", router["layer"]
    return "", router


def router_weight(router: nn.Module) -> mx.array:
    """The router's (experts x hidden) weight as float."""
    return dequantized_weight(router_linear(router)[1])


def _named_children(module: nn.Module):
    return [(k, v) for k, v in module.children().items() if isinstance(v, nn.Module)]


def _find_experts(layer: nn.Module):
    """(block path, block, experts name, experts) for every MoE block of a decoder layer."""
    found = []
    for path, m in layer.named_modules():
        if isinstance(m, (SwitchGLU, SwitchMLP)):
            parent_path, _, name = path.rpartition(".")
            parent = layer
            for part in parent_path.split(".") if parent_path else []:
                parent = parent[part] if not part.isdigit() else parent[int(part)]
            found.append((parent_path, parent, name, m))
    return found


def _as_float_linear(linear: nn.Module) -> nn.Linear:
    """A float ``nn.Linear`` equal to ``linear`` (dequantized when quantized)."""
    out_dims, _ = linear.weight.shape
    weight = dequantized_weight(linear)
    new = nn.Linear(weight.shape[1], out_dims, bias="bias" in linear)
    new.weight = weight
    if "bias" in linear:
        new.bias = linear.bias
    return new


def _dequantize_router(block: nn.Module, name: str) -> nn.Module:
    """Replace every quantized linear in the router by a float one, so it can train."""
    router = block[name]
    if isinstance(router, nn.QuantizedLinear):
        router = _as_float_linear(router)
        setattr(block, name, router)
        return router
    for child_name, child in _named_children(router):
        if isinstance(child, nn.QuantizedLinear):
            setattr(router, child_name, _as_float_linear(child))
    return router


def _lora_linears(module: nn.Module, rank: int, scale: float) -> list[tuple[str, LoRALinear]]:
    """Wrap every (quantized) linear inside ``module`` in mlx-lm's LoRALinear."""
    wrapped = []
    for path, m in module.named_modules():
        if path and type(m) in (nn.Linear, nn.QuantizedLinear):
            wrapped.append((path, LoRALinear.from_base(m, r=rank, scale=scale)))
    for path, lora in wrapped:
        *parents, last = path.split(".")
        parent = module
        for p in parents:
            parent = parent[int(p)] if p.isdigit() else parent[p]
        setattr(parent, last, lora)
    return wrapped


class DRLoRA:
    """DR-LoRA attached to one model: layers, ranks, statistics, growth."""

    def __init__(self, model: nn.Module, config: DRLoRAConfig, family_name: str, family: Family):
        self.model = model
        self.config = config
        self.family_name = family_name
        self.family = family
        self.layers: list[MoELayer] = []
        self.extra_loras: list[tuple[str, LoRALinear]] = []  # (full path, layer)
        self.layer_paths: list[str] = []  # dotted path of every model.layers entry
        self.router_base: list[mx.array] = []  # router weights at attach time, per MoE layer
        self.routing_signal = config.routing_signal
        self.notes: list[str] = []
        self.state: RoutingState | None = None
        self.recorder: RoutingRecorder | None = None

    # ----- shape of the adapter -------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_experts(self) -> int:
        return self.layers[0].modules[0].num_experts

    @property
    def targets(self) -> tuple[str, ...]:
        return self.config.targets

    @property
    def n_modules(self) -> int:
        """Modules per layer: N_mod = targets x experts."""
        return len(self.targets) * self.n_experts

    @property
    def r_max(self) -> int:
        return self.config.ranks[2]

    def module_label(self, m: int) -> str:
        """'e5.up' for module index m = p * E + e."""
        p, e = divmod(m, self.n_experts)
        return f"e{e}.{self.targets[p].replace('_proj', '')}"

    def expert_modules(self):
        """Every MaskedLoRASwitchLinear with its dotted path."""
        for layer in self.layers:
            for name, module in zip(layer.module_names, layer.modules):
                yield f"{layer.path}.{layer.experts_name}.{name}", module

    def schedule(self, total_steps: int) -> GrowthSchedule:
        return self.config.schedule(total_steps, self.n_modules)

    # ----- ranks and statistics as numpy (layers x modules) ---------------------

    def ranks(self) -> np.ndarray:
        return np.stack([np.concatenate([m.ranks() for m in layer.modules]) for layer in self.layers])

    def set_ranks(self, ranks: np.ndarray) -> None:
        ranks = np.asarray(ranks)
        E = self.n_experts
        for l, layer in enumerate(self.layers):
            for p, module in enumerate(layer.modules):
                module.set_ranks(ranks[l, p * E : (p + 1) * E])
        self.fit_width(int(ranks.max()))

    def fit_width(self, max_rank: int | None = None) -> int:
        """Narrow the LoRA product of every expert module to the smallest
        r_init * 2^k (at most r_max) that covers ``max_rank`` (default: the
        largest active rank), so early steps pay only for the ranks in use
        while the number of distinct compiled shapes stays at most
        ceil(log2(r_max / r_init)) + 1. Returns the width."""
        r_init, _, r_max = self.config.ranks
        if max_rank is None:
            max_rank = int(self.ranks().max())
        width = r_max
        if self.config.active_width:
            width = max(r_init, 1)
            while width < max_rank:
                width *= 2
            width = min(width, r_max)
        for _, module in self.expert_modules():
            module.width = width
        return width

    @property
    def width(self) -> int:
        """The widest LoRA product of any expert module."""
        return max(self.widths())

    def widths(self) -> tuple[int, ...]:
        """Every expert module's LoRA width (a compiled step is made for one such tuple)."""
        return tuple(m.width for _, m in self.expert_modules())

    def rank_importance(self) -> np.ndarray:
        """Per-rank importance EMAs: (layers, modules, r_max)."""
        return np.stack(
            [np.concatenate([np.asarray(m.importance) for m in layer.modules]) for layer in self.layers]
        )

    def frequency(self) -> np.ndarray:
        """Routing frequency per module (layers x modules): f of the module's expert."""
        return np.tile(np.asarray(self.state.frequency), (1, len(self.targets)))

    def saliency(self) -> np.ndarray:
        ranks = self.ranks()
        g = module_importance(self.rank_importance(), ranks)
        return saliency(self.frequency(), g, ranks, self.config.rank_penalty, self.config.saliency)

    # ----- inside the compiled training step ------------------------------------

    def update_statistics(self, grads: dict, routing_sums: mx.array, n_tokens: mx.array) -> None:
        """Importance EMAs from the step's (accumulated) gradients and routing
        frequency from its routing sums. Call once per optimizer step, before
        the optimizer changes A and B."""
        beta = self.config.ema_beta
        flat = dict(tree_flatten(grads))
        for path, module in self.expert_modules():
            update_importance(module, flat[f"{path}.lora_a"], flat[f"{path}.lora_b"], beta)
        observed = routing_sums / mx.maximum(n_tokens.astype(mx.float32), 1.0)
        self.state.frequency = update_frequency(self.state.frequency, observed, self.state.seen, beta)
        self.state.seen = mx.array(1.0)

    def keep_masked_ranks(self, before: dict[str, tuple[mx.array, mx.array]]) -> None:
        """Undo any optimizer change to inactive ranks (weight decay would shrink them)."""
        for path, module in self.expert_modules():
            a, b = before[path]
            m = module.rank_mask
            module.lora_a = mx.where(m[..., None] > 0, module.lora_a, a)
            module.lora_b = mx.where(m[:, None, :] > 0, module.lora_b, b)

    def factors(self) -> dict[str, tuple[mx.array, mx.array]]:
        return {path: (m.lora_a, m.lora_b) for path, m in self.expert_modules()}

    # ----- growth ---------------------------------------------------------------

    def grow(self, step: int, schedule: GrowthSchedule) -> GrowthEvent | None:
        """Run the growth event of ``step``, if there is one (Algorithm 1)."""
        if not schedule.is_event(step):
            return None
        ranks = self.ranks()
        new = grow(ranks, self.saliency(), schedule, step, self.config.allocation)
        grown = new - ranks
        if grown.any():
            self.set_ranks(new)
            self.reset_importance(grown > 0)
        return GrowthEvent(step=step, grown=grown)

    def reset_importance(self, modules: np.ndarray) -> None:
        """Zero the importance EMAs of the given modules (layers x modules bool)."""
        E = self.n_experts
        for l, layer in enumerate(self.layers):
            for p, module in enumerate(layer.modules):
                keep = mx.array(~modules[l, p * E : (p + 1) * E])[:, None]
                module.importance = mx.where(keep, module.importance, 0.0)

    # ----- router ---------------------------------------------------------------

    def set_router_trainable(self, trainable: bool) -> None:
        for layer in self.layers:
            if trainable:
                layer.router.unfreeze()
                if self.family.frozen_router_params:
                    layer.router.freeze(keys=list(self.family.frozen_router_params), strict=False)
            else:
                layer.router.freeze()

    # ----- reporting ------------------------------------------------------------

    def parameter_counts(self) -> dict:
        """Allocated, active and uniform-LoRA-at-r_target parameter counts of the expert LoRA."""
        allocated = active = uniform = 0
        r_target = self.config.ranks[1]
        for _, m in self.expert_modules():
            per_rank = m.lora_a.shape[-1] + m.lora_b.shape[-2]
            allocated += m.lora_a.size + m.lora_b.size
            active += int(m.ranks().sum()) * per_rank
            uniform += m.num_experts * r_target * per_rank
        extra = sum(l.lora_a.size + l.lora_b.size for _, l in self.extra_loras)
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return {
            "expert_lora_allocated": allocated,
            "expert_lora_active": active,
            "expert_lora_uniform_r_target": uniform,
            "fixed_rank_lora": extra,
            "trainable": trainable,
        }

    def report(self) -> str:
        r_init, r_target, r_max = self.config.ranks
        counts = self.parameter_counts()
        n_mod = self.n_layers * self.n_modules
        ranks = (
            f"rank {r_init}"
            if self.config.method == "lora"
            else f"ranks {r_init} -> {r_target} on average (max {r_max})"
        )
        lines = [
            f"{self.config.method} on {self.family_name}: {self.n_layers} MoE layers x {self.n_experts} experts x "
            f"{len(self.targets)} projections ({', '.join(self.targets)}) = {n_mod} expert modules, {ranks}",
            f"  expert LoRA parameters: {counts['expert_lora_allocated']:,} allocated, "
            f"{counts['expert_lora_active']:,} active now",
        ]
        if self.extra_loras:
            lines.append(
                f"  fixed-rank LoRA: {len(self.extra_loras)} linear layers, {counts['fixed_rank_lora']:,} parameters"
            )
        lines.append(
            f"  router: {'trained ' + self.config.train_router if self.config.train_router != 'never' else 'frozen'}; "
            f"routing signal: {self.routing_signal}"
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def attach(model: nn.Module, config: DRLoRAConfig | None = None, seed: int | None = None) -> DRLoRA:
    """Attach DR-LoRA (or uniform LoRA, ``config.method == 'lora'``) to an
    mlx-lm MoE model in place, freeze everything but the adapters, and return
    the ``DRLoRA`` handle. ``seed`` makes the A initialisation reproducible."""
    config = config or DRLoRAConfig()
    family_name, family = lookup(model)
    if seed is not None:
        mx.random.seed(seed)
    r_init, _, r_max = config.ranks
    drlora = DRLoRA(model, config, family_name, family)
    layers = model.layers
    paths = {id(m): p for p, m in model.named_modules()}
    drlora.layer_paths = [paths[id(layer)] for layer in layers]
    for i, layer in enumerate(layers):
        for block_path, block, experts_name, experts in _find_experts(layer):
            router = getattr(block, family.router, None)
            if router is None:
                raise UnsupportedModelError(
                    f"{family_name}: MoE block at layer {i} has no router attribute {family.router!r}"
                )
            drlora.layers.append(MoELayer(i, paths[id(block)], block, experts, experts_name, router))
    if not drlora.layers:
        raise UnsupportedModelError(
            f"{family_name}: no MoE expert layers (SwitchGLU / SwitchMLP) found; drlora-mlx adapts MoE models only"
        )

    model.freeze()
    for layer in drlora.layers:
        for target in config.targets:
            name = target
            if isinstance(layer.experts, SwitchMLP):
                if target not in _SWITCH_MLP_NAMES:
                    raise UnsupportedModelError(
                        f"{family_name}: experts are SwitchMLP (fc1, fc2); target {target!r} does not exist, "
                        "use up_proj (fc1) and down_proj (fc2)"
                    )
                name = _SWITCH_MLP_NAMES[target]
            base = layer.experts[name]
            if not isinstance(base, (SwitchLinear, QuantizedSwitchLinear)):
                raise UnsupportedModelError(
                    f"{family_name}: {layer.path}.{layer.experts_name}.{name} is {type(base).__name__}, "
                    "not a SwitchLinear"
                )
            module = MaskedLoRASwitchLinear.from_base(base, r_max=r_max, rank=r_init, scale=config.scale)
            setattr(layer.experts, name, module)
            layer.modules.append(module)
            layer.module_names.append(name)
        if config.train_router != "never":
            layer.router = _dequantize_router(layer.block, family.router)
        drlora.router_base.append(mx.array(router_weight(layer.router)))
        if config.shared_expert_rank:
            for attr in family.shared_experts:
                if isinstance(getattr(layer.block, attr, None), nn.Module):
                    for sub, lora in _lora_linears(layer.block[attr], config.shared_expert_rank, config.scale):
                        drlora.extra_loras.append((f"{layer.path}.{attr}.{sub}", lora))
    if config.shared_expert_rank and not drlora.extra_loras:
        raise UnsupportedModelError(f"{family_name}: --shared-expert-rank given, but this model has no shared experts")
    if config.attention_rank:
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if isinstance(attn, nn.Module):
                for sub, lora in _lora_linears(attn, config.attention_rank, config.scale):
                    drlora.extra_loras.append((f"{paths[id(attn)]}.{sub}", lora))

    signal = config.routing_signal
    if signal == "weight" and family.weights is None:
        signal = "count"
        drlora.notes.append(f"{family.note}; using the 'count' signal instead of 'weight'")
    drlora.routing_signal = signal
    if len({m.num_experts for _, m in drlora.expert_modules()}) != 1:
        raise UnsupportedModelError(f"{family_name}: MoE layers with different expert counts are not supported")
    sites = [RoutingSite(l.block, drlora.n_experts, family.weights) for l in drlora.layers]
    drlora.recorder = RoutingRecorder(sites, signal)
    for site, layer in enumerate(drlora.layers):
        observe(layer.experts, drlora.recorder, site, "experts")
        observe(layer.router, drlora.recorder, site, "router")
    drlora.state = RoutingState(drlora.n_layers, drlora.n_experts)
    drlora.set_router_trainable(config.train_router == "always")
    drlora.fit_width(r_init)
    mx.eval(model.parameters())
    return drlora

