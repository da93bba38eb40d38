"""Attach DR-LoRA to an mlx-lm MoE model, in place.

``attach(model, config)`` finds every MoE block by type (``SwitchGLU`` /
``SwitchMLP``), replaces the target expert projections with
``MaskedLoRASwitchLinear``, swaps the experts and the router for observing
subclasses (see ``routing``), optionally adds fixed-rank LoRA to shared experts
and attention, and freezes everything else. It returns the ``DRLoRA`` handle
that the trainer, the growth events and the savers use.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP
from mlx_lm.tuner.lora import LoRALinear

from .config import DRLoRAConfig
from .drlora import DRLoRA, MoELayer, RoutingState
from .families import UnsupportedModelError, lookup
from .masked_lora import MaskedLoRASwitchLinear, dequantized_weight
from .routing import RoutingRecorder, RoutingSite, observe, router_weight
from .tree import child_modules, module_at, replace_module

# SwitchMLP names its two projections fc1 / fc2.
_SWITCH_MLP_NAMES = {"up_proj": "fc1", "down_proj": "fc2"}


def _as_float_linear(linear: nn.Module) -> nn.Linear:
    """A float ``nn.Linear`` equal to ``linear`` (dequantized when quantized)."""
    weight = dequantized_weight(linear)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in linear)
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
    for child_name, child in child_modules(router):
        if isinstance(child, nn.QuantizedLinear):
            setattr(router, child_name, _as_float_linear(child))
    return router


def _lora_linears(module: nn.Module, rank: int, scale: float) -> list[tuple[str, LoRALinear]]:
    """Wrap every (quantized) linear inside ``module`` in mlx-lm's LoRALinear."""
    wrapped = [(path, LoRALinear.from_base(m, r=rank, scale=scale))
               for path, m in module.named_modules() if path and type(m) in (nn.Linear, nn.QuantizedLinear)]
    for path, lora in wrapped:
        replace_module(module, path, lora)
    return wrapped


def _find_layers(drlora: DRLoRA) -> None:
    """Every MoE block: its experts (found by type) and its router (by the family's table)."""
    model, family = drlora.model, drlora.family
    paths = {id(m): p for p, m in model.named_modules()}
    drlora.layer_paths = [paths[id(layer)] for layer in model.layers]
    for i, layer in enumerate(model.layers):
        for path, experts in layer.named_modules():
            if not isinstance(experts, (SwitchGLU, SwitchMLP)):
                continue
            block_path, _, experts_name = path.rpartition(".")
            block = module_at(layer, block_path)
            router = getattr(block, family.router, None)
            if router is None:
                raise UnsupportedModelError(
                    f"{drlora.family_name}: MoE block at layer {i} has no router attribute {family.router!r}"
                )
            full = paths[id(block)]
            drlora.layers.append(MoELayer(i, full, block, experts, experts_name, router, f"{full}.{family.router}"))
    if not drlora.layers:
        raise UnsupportedModelError(
            f"{drlora.family_name}: no MoE expert layers (SwitchGLU / SwitchMLP) found; drlora-mlx adapts MoE "
            "models only"
        )


def _adapt_experts(drlora: DRLoRA, layer: MoELayer) -> None:
    """Replace the target projections of one block's experts with rank-masked LoRA."""
    config = drlora.config
    r_init, _, r_max = config.ranks
    for target in config.targets:
        name = target
        if isinstance(layer.experts, SwitchMLP):
            if target not in _SWITCH_MLP_NAMES:
                raise UnsupportedModelError(
                    f"{drlora.family_name}: experts are SwitchMLP (fc1, fc2); target {target!r} does not exist, "
                    "use up_proj (fc1) and down_proj (fc2)"
                )
            name = _SWITCH_MLP_NAMES[target]
        base = layer.experts[name]
        if not isinstance(base, (SwitchLinear, QuantizedSwitchLinear)):
            raise UnsupportedModelError(
                f"{drlora.family_name}: {layer.path}.{layer.experts_name}.{name} is {type(base).__name__}, "
                "not a SwitchLinear"
            )
        module = MaskedLoRASwitchLinear.from_base(base, r_max=r_max, rank=r_init, scale=config.scale)
        setattr(layer.experts, name, module)
        layer.modules.append(module)
        layer.module_names.append(name)


def _prepare_router(drlora: DRLoRA, layer: MoELayer) -> None:
    """A router that may train is made float; its weight at attach time is kept."""
    if drlora.config.train_router != "never":
        layer.router = _dequantize_router(layer.block, drlora.family.router)
    drlora.router_base.append(mx.array(router_weight(layer.router)))


def _adapt_fixed_rank(drlora: DRLoRA) -> None:
    """Fixed-rank LoRA on the shared experts and the attention projections, outside the growth pool."""
    config, family = drlora.config, drlora.family
    if config.shared_expert_rank:
        for layer in drlora.layers:
            for attr in family.shared_experts:
                if isinstance(getattr(layer.block, attr, None), nn.Module):
                    for sub, lora in _lora_linears(layer.block[attr], config.shared_expert_rank, config.scale):
                        drlora.extra_loras.append((f"{layer.path}.{attr}.{sub}", lora))
        if not drlora.extra_loras:
            raise UnsupportedModelError(
                f"{drlora.family_name}: --shared-expert-rank given, but this model has no shared experts"
            )
    if config.attention_rank:
        for layer_path, layer in zip(drlora.layer_paths, drlora.model.layers):
            attn = getattr(layer, "self_attn", None)
            if isinstance(attn, nn.Module):
                for sub, lora in _lora_linears(attn, config.attention_rank, config.scale):
                    drlora.extra_loras.append((f"{layer_path}.self_attn.{sub}", lora))


def _observe_routing(drlora: DRLoRA) -> None:
    """Routing statistics: the experts and the router of every block report to one recorder."""
    family = drlora.family
    signal = drlora.config.routing_signal
    if signal == "weight" and family.weights is None:
        signal = "count"
        drlora.notes.append(f"{family.note}; using the 'count' signal instead of 'weight'")
    drlora.routing_signal = signal
    sites = [RoutingSite(l.block, drlora.n_experts, family.weights) for l in drlora.layers]
    drlora.recorder = RoutingRecorder(sites, signal)
    for site, layer in enumerate(drlora.layers):
        observe(layer.experts, drlora.recorder, site, "experts")
        observe(layer.router, drlora.recorder, site, "router")
    drlora.state = RoutingState(drlora.n_layers, drlora.n_experts)


def attach(model: nn.Module, config: DRLoRAConfig | None = None, seed: int | None = None) -> DRLoRA:
    """Attach DR-LoRA (or uniform LoRA, ``config.method == 'lora'``) to an
    mlx-lm MoE model in place, freeze everything but the adapters, and return
    the ``DRLoRA`` handle. ``seed`` makes the A initialisation reproducible."""
    config = config or DRLoRAConfig()
    family_name, family = lookup(model)
    if seed is not None:
        mx.random.seed(seed)
    drlora = DRLoRA(model, config, family_name, family)
    _find_layers(drlora)
    model.freeze()
    for layer in drlora.layers:
        _adapt_experts(drlora, layer)
        _prepare_router(drlora, layer)
    if len({m.num_experts for _, m in drlora.expert_modules()}) != 1:
        raise UnsupportedModelError(f"{family_name}: MoE layers with different expert counts are not supported")
    _adapt_fixed_rank(drlora)
    _observe_routing(drlora)
    drlora.set_router_trainable(config.train_router == "always")
    drlora.fit_width(config.ranks.r_init)
    mx.eval(model.parameters())
    return drlora
