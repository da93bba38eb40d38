"""Attach DR-LoRA to an mlx-lm MoE model, in place.

``attach(model, config)`` finds every MoE block by type (``SwitchGLU`` /
``SwitchMLP``), replaces the target expert projections with
``MaskedLoRASwitchLinear``, swaps the experts and the router for observing
subclasses (see ``routing``), optionally adds fixed-rank LoRA to shared experts,
attention and the linear modules named by ``lora_keys``, and freezes everything
else. With ``num_layers`` N only the last N decoder layers are adapted. It returns the ``DRLoRA`` handle
that the trainer, the growth events and the savers use.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)
from mlx_lm.tuner.lora import LoRALinear

from ..config.settings import ConfigError, DRLoRAConfig
from ..families import UnsupportedModelError, lookup
from ..families.mlx_lm_names import SWITCH_MLP_NAMES, projection_name
from .handle import DRLoRA, MoELayer, RoutingState
from .head import split_head
from .masked import MaskedLoRASwitchLinear, dequantized_weight
from .pooled import PooledLoRASwitchLinear, RankPool
from .probe import applied_weights
from .routing import RoutingRecorder, RoutingSite, observe, router_weight
from .tree import child_modules, module_at, replace_module


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


def _block_of(layer: nn.Module, experts_path: str, router_attr: str) -> str:
    """The path (below the decoder layer) of the MoE block of the experts at
    ``experts_path``: the nearest module above them that holds the router."""
    path = experts_path
    while path:
        path = path.rpartition(".")[0]
        if isinstance(getattr(module_at(layer, path), router_attr, None), nn.Module):
            return path
    return None


def _adapted(drlora: DRLoRA) -> list[tuple[int, str, nn.Module]]:
    """(index, path, layer) of the decoder layers ``num_layers`` adapts: the last N, or all."""
    n, total = drlora.config.num_layers, len(drlora.layer_paths)
    if n > total:
        raise ConfigError(f"num_layers {n}: the model has {total} decoder layers; give at most {total}, or -1 for all")
    first = 0 if n == -1 else total - n
    return [(i, drlora.layer_paths[i], drlora.model.layers[i]) for i in range(first, total)]


def _find_layers(drlora: DRLoRA) -> None:
    """Every MoE block of the adapted layers: its experts (found by type) and its router (by the family's table)."""
    model, family = drlora.model, drlora.family
    paths = {id(m): p for p, m in model.named_modules()}
    drlora.layer_paths = [paths[id(layer)] for layer in model.layers]
    for i, layer_path, layer in _adapted(drlora):
        for path, experts in layer.named_modules():
            if not isinstance(experts, (SwitchGLU, SwitchMLP)):
                continue
            block_path = _block_of(layer, path, family.router)
            if block_path is None:
                raise UnsupportedModelError(
                    f"{drlora.family_name}: the experts at layer {i} ({path}) have no router {family.router!r} "
                    "above them"
                )
            block = module_at(layer, block_path)
            full = ".".join(p for p in (layer_path, block_path) if p)
            experts_name = path[len(block_path) + 1:] if block_path else path
            drlora.layers.append(MoELayer(i, full, block, experts, experts_name, block[family.router],
                                          f"{full}.{family.router}", layer))
    if not drlora.layers and drlora.config.num_layers != -1:
        raise ConfigError(f"num_layers {drlora.config.num_layers}: none of the last {drlora.config.num_layers} "
                          "decoder layers is an MoE layer; give a larger num_layers, or -1 for all")
    if not drlora.layers:
        raise UnsupportedModelError(
            f"{drlora.family_name}: no MoE expert layers (SwitchGLU / SwitchMLP) found; drlora-mlx adapts MoE "
            "models only"
        )


def _projection(drlora: DRLoRA, layer: MoELayer, target: str) -> tuple[str, nn.Module]:
    """(attribute name, switch layer) of one target projection of a block's experts."""
    if isinstance(layer.experts, SwitchMLP) and target not in SWITCH_MLP_NAMES:
        raise UnsupportedModelError(
            f"{drlora.family_name}: experts are SwitchMLP (fc1, fc2); target {target!r} does not exist, "
            "use up_proj (fc1) and down_proj (fc2)"
        )
    name = projection_name(layer.experts, target)
    base = layer.experts[name]
    if not isinstance(base, (SwitchLinear, QuantizedSwitchLinear)):
        raise UnsupportedModelError(
            f"{drlora.family_name}: {layer.path}.{layer.experts_name}.{name} is {type(base).__name__}, "
            "not a SwitchLinear"
        )
    return name, base


def _rank_pool(drlora: DRLoRA, layer: MoELayer, bases: list[nn.Module]) -> RankPool:
    """The layer's pool of N_mod x r_target rank slots, beside its experts (``lora_pool``)."""
    up = layer.experts[projection_name(layer.experts, "up_proj")]
    hidden, inner = up.input_dims, up.output_dims
    for base in bases:
        if sorted((base.input_dims, base.output_dims)) != sorted((hidden, inner)):
            raise UnsupportedModelError(
                f"{drlora.family_name}: an expert projection maps {base.input_dims} -> {base.output_dims}, not "
                f"between the experts' {hidden} and {inner}, so its ranks cannot share the layer's pool; use "
                "--lora-layout masked"
            )
    capacity = sum(base.num_experts for base in bases) * drlora.config.ranks.r_target
    pool = RankPool(capacity, hidden, inner, layer=layer.index, seed=drlora.seed)
    layer.experts.lora_pool = pool
    layer.pool = pool
    return pool


def _adapt_experts(drlora: DRLoRA, layer: MoELayer) -> None:
    """Replace the target projections of one block's experts with LoRA in the
    configured layout: rank-masked, or drawing on the layer's rank pool."""
    config = drlora.config
    r_init, _, r_max = config.ranks
    projections = [_projection(drlora, layer, target) for target in config.targets]
    pool = _rank_pool(drlora, layer, [base for _, base in projections]) if config.resolved_lora_layout == "pooled" else None
    for name, base in projections:
        if pool is None:
            module = MaskedLoRASwitchLinear.from_base(base, r_max=r_max, rank=r_init, scale=config.scale)
        else:
            module = PooledLoRASwitchLinear(base, pool, r_max=r_max, scale=config.scale)
        setattr(layer.experts, name, module)
        layer.modules.append(module)
        layer.module_names.append(name)
    if pool is not None:
        pool.set_ranks([(module, np.full(module.num_experts, r_init)) for module in layer.modules])


def _prepare_router(drlora: DRLoRA, layer: MoELayer) -> None:
    """A router that may train is made float; its weight at attach time is kept."""
    if drlora.config.train_router != "never":
        layer.router = _dequantize_router(layer.block, drlora.family.router)
    drlora.router_base.append(mx.array(router_weight(layer.router)))


def _shared_experts(drlora: DRLoRA, layer: MoELayer):
    """(path, module) of the layer's shared experts: attributes of the block, else of the decoder layer."""
    owners = ((layer.block, layer.path), (layer.decoder, drlora.layer_paths[layer.index]))
    for attr in drlora.family.shared_experts:
        for owner, path in owners:
            module = getattr(owner, attr, None)
            if isinstance(module, nn.Module):
                yield f"{path}.{attr}", module
                break


# Linear projections that mark a module as attention (Mamba and convolution mixers have none of them).
_ATTENTION_PROJECTIONS = ("q_proj", "q_a_proj", "query_key_value", "qkv_proj", "Wqkv", "qkvg_proj")


def _attention_modules(drlora: DRLoRA):
    """(path, module) of every attention module the family keeps at one of its attention attributes."""
    for _, layer_path, layer in _adapted(drlora):
        for attr in drlora.family.attention:
            found = getattr(layer, attr, None)
            # LongCat keeps two attention modules per layer, in a list.
            entries = [(f"{attr}.{i}", m) for i, m in enumerate(found)] if isinstance(found, list) else [(attr, found)]
            for path, module in entries:
                if isinstance(module, nn.Module) and any(p in module for p in _ATTENTION_PROJECTIONS):
                    yield f"{layer_path}.{path}", module


def _adapt_fixed_rank(drlora: DRLoRA) -> None:
    """Fixed-rank LoRA on the shared experts and the attention projections, outside the growth pool."""
    config = drlora.config
    if config.shared_expert_rank:
        for layer in drlora.layers:
            for path, module in _shared_experts(drlora, layer):
                for sub, lora in _lora_linears(module, config.shared_expert_rank, config.scale):
                    drlora.extra_loras.append((f"{path}.{sub}", lora))
        if not drlora.extra_loras:
            raise UnsupportedModelError(
                f"{drlora.family_name}: --shared-expert-rank given, but this model has no shared experts"
            )
    if config.attention_rank:
        found = list(_attention_modules(drlora))
        if not found:
            raise UnsupportedModelError(
                f"{drlora.family_name}: --attention-rank given, but no attention module was found at "
                f"{' or '.join(drlora.family.attention)} of the decoder layers"
            )
        for path, module in found:
            for sub, lora in _lora_linears(module, config.attention_rank, config.scale):
                drlora.extra_loras.append((f"{path}.{sub}", lora))


def _in_router(path: str, routers: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in routers)


def _key_names(layer: nn.Module, layer_path: str, routers: tuple[str, ...]) -> list[str]:
    """The paths in ``layer`` that lora_keys can name: its linear modules, less routers and adapted ones."""
    modules = dict(layer.named_modules())
    return sorted(p for p, m in modules.items()
                  if type(m) in (nn.Linear, nn.QuantizedLinear) and not _in_router(f"{layer_path}.{p}", routers)
                  and not isinstance(modules.get(p.rpartition(".")[0]), LoRALinear))


def _adapt_keys(drlora: DRLoRA) -> None:
    """Fixed-rank LoRA at lora_rank on the linear modules ``lora_keys`` names, in every adapted
    decoder layer that has them (as mlx-lm's ``lora_parameters.keys``)."""
    config = drlora.config
    if not config.lora_keys:
        return
    layers = _adapted(drlora)
    routers = tuple(layer.router_path for layer in drlora.layers)
    valid = _key_names(layers[-1][2], layers[-1][1], routers)
    for key in config.lora_keys:
        found = 0
        for _, layer_path, layer in layers:
            try:
                module = module_at(layer, key)
            except (KeyError, IndexError, ValueError, TypeError):
                continue
            full = f"{layer_path}.{key}"
            if _in_router(full, routers):
                raise ConfigError(f"lora_keys: {key} is the MoE router, whose full weights train (see "
                                  "train_router); leave it out of the keys")
            if isinstance(module, LoRALinear):
                raise ConfigError(f"lora_keys: {key} is adapted already (attention_rank or shared_expert_rank); "
                                  "name it in one place only")
            if type(module) not in (nn.Linear, nn.QuantizedLinear):
                raise ConfigError(f"lora_keys: {key} is a {type(module).__name__}, not a linear layer (expert "
                                  f"projections are chosen with targets); linear modules: {', '.join(valid[:6])}")
            lora = LoRALinear.from_base(module, r=config.lora_rank, scale=config.scale)
            replace_module(layer, key, lora)
            drlora.extra_loras.append((full, lora))
            found += 1
        if not found:
            raise ConfigError(f"lora_keys: {key!r} matches no module of the adapted decoder layers; their linear "
                              f"modules include {', '.join(valid[:6])}")


def _rule_holds(drlora: DRLoRA) -> str:
    """Check the family's routing-weight rule against the weight the first MoE
    block really applies (``probe``); returns why it does not hold ("" if it does)."""
    family, layer = drlora.family, drlora.layers[0]
    experts = layer.experts
    out_dims = (experts.down_proj if isinstance(experts, SwitchGLU) else experts.fc2).output_dims
    hidden = router_weight(layer.router).shape[1]
    try:
        indices, measured, router_out, x = applied_weights(layer.block, layer.experts_name, out_dims, hidden,
                                                           mx.float32, family.readout, layer.router,
                                                           family.input_scaled)
        expected = family.weights(router_out, indices, layer.block, x)
        if family.routed is not None:
            expected = expected * family.routed(router_out, indices, layer.block)
        mx.eval(measured, expected)
    except Exception as e:  # a block this check cannot run is a block whose rule is unverified
        return f"the check could not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if measured.shape != expected.shape or not mx.allclose(measured, expected, rtol=1e-3, atol=1e-4).item():
        return "the weights its MoE blocks apply differ from the family's routing-weight rule"
    return ""


def _observe_routing(drlora: DRLoRA) -> None:
    """Routing statistics: the experts and the router of every block report to one recorder."""
    family = drlora.family
    signal = drlora.config.routing_signal
    if signal == "weight" and family.weights is None:
        signal = "count"
        drlora.notes.append(f"{family.note}; using the 'count' signal instead of 'weight'")
    elif signal == "weight":
        why = _rule_holds(drlora)
        if why:
            signal = "count"
            drlora.notes.append(f"{drlora.family_name}: {why} (mlx-lm {mlx_lm_version()}); routing frequency "
                                "uses the 'count' signal instead of 'weight'")
    drlora.routing_signal = signal
    sites = [RoutingSite(l.block, drlora.n_experts, family.weights, family.routed) for l in drlora.layers]
    drlora.recorder = RoutingRecorder(sites, signal)
    for site, layer in enumerate(drlora.layers):
        observe(layer.experts, drlora.recorder, site, "experts")
        observe(layer.router, drlora.recorder, site, "router")
    drlora.routing = RoutingState(drlora.n_layers, drlora.n_experts)


def mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def attach(model: nn.Module, config: DRLoRAConfig | None = None, seed: int | None = None) -> DRLoRA:
    """Attach DR-LoRA (or uniform LoRA, ``config.method == 'lora'``) to an
    mlx-lm MoE model in place, freeze everything but the adapters, and return
    the ``DRLoRA`` handle. ``seed`` makes the A initialisation reproducible."""
    config = config or DRLoRAConfig()
    family_name, family = lookup(model)
    if seed is not None:
        mx.random.seed(seed)
    # The pooled layout draws each new rank's A from a key made of this seed (random without one).
    pool_seed = seed if seed is not None else int(mx.random.randint(0, 2**31 - 1, ()).item())
    drlora = DRLoRA(model, config, family_name, family, seed=pool_seed)
    _find_layers(drlora)
    model.freeze()
    for layer in drlora.layers:
        _adapt_experts(drlora, layer)
        _prepare_router(drlora, layer)
    if len({m.num_experts for _, m in drlora.expert_modules()}) != 1:
        raise UnsupportedModelError(f"{family_name}: MoE layers with different expert counts are not supported")
    _adapt_fixed_rank(drlora)
    _adapt_keys(drlora)
    drlora.head, why = split_head(model, family.body)
    if why:
        drlora.notes.append(f"{family_name}: {why} (mlx-lm {mlx_lm_version()}); the loss holds every token's "
                            "logits at once, as mlx-lm's does")
    _observe_routing(drlora)
    drlora.set_router_trainable(config.train_router == "always")
    drlora.fit_width(config.ranks.r_init)
    mx.eval(model.parameters())
    return drlora
