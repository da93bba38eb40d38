"""DR-LoRA's own state as named arrays: one codec for checkpoints, saved adapters and exports.

What LoRA factors do not say: the rank mask and the per-rank importance EMAs
of every expert module, the routing frequency, the rank of every fixed-rank
LoRA layer (attention, shared experts), and the routers once training has changed them.

    <expert module path>.rank_mask      (E, r_max) float32, prefix-shaped
    <expert module path>.importance     (E, r_max) float32
    <expert module path>.slots          (E, r_max) int32, pooled layout: the slot of every rank
    <fixed-rank LoRA path>.rank         () int32
    routing.frequency                   (MoE layers, E)
    routing.seen                        ()
    <router path>.<parameter>           the router's parameters (as mlx-lm names them)

``encode`` makes the arrays, ``decode`` reads them without a model (the
exporter), ``restore`` puts them into an attached model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .masked import ranks_of

FREQUENCY = "routing.frequency"
SEEN = "routing.seen"


def encode(drlora) -> dict[str, mx.array]:
    """The state of ``drlora`` as named arrays."""
    arrays = {FREQUENCY: drlora.routing.frequency, SEEN: drlora.routing.seen}
    for path, module in drlora.expert_modules():
        arrays[f"{path}.rank_mask"] = module.active_mask()
        arrays[f"{path}.importance"] = module.rank_importance()
        if "slots" in module:  # where each rank lives in the pool, so a resumed run continues exactly
            arrays[f"{path}.slots"] = module.slots
    for path, lora in drlora.extra_loras:
        arrays[f"{path}.rank"] = mx.array(lora.lora_a.shape[1], dtype=mx.int32)
    if drlora.trained_routers():  # an unchanged router is the base model's own
        for layer in drlora.layers:
            arrays.update({f"{layer.router_path}.{k}": v for k, v in tree_flatten(layer.router.parameters())})
            arrays.update({f"{layer.path}.{k}": layer.block[k] for k in drlora.family.block_router_params})
    return arrays


@dataclass
class AdapterState:
    """The decoded state: what a reader without the model needs."""

    expert_ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module path -> rank per expert
    fixed_ranks: dict[str, int] = field(default_factory=dict)  # LoRA layer path -> rank
    importance: dict[str, mx.array] = field(default_factory=dict)
    slots: dict[str, mx.array] = field(default_factory=dict)  # pooled layout: module path -> slot table
    frequency: mx.array | None = None
    seen: mx.array | None = None
    routers: dict[str, mx.array] = field(default_factory=dict)  # full parameter path -> value


def decode(arrays: dict[str, mx.array], router_paths=()) -> AdapterState:
    """The state in ``arrays``; ``router_paths`` says which keys (or prefixes of keys) are routers'."""
    state = AdapterState(frequency=arrays.get(FREQUENCY), seen=arrays.get(SEEN))
    for key, value in arrays.items():
        if key.endswith(".rank_mask"):
            state.expert_ranks[key[: -len(".rank_mask")]] = tuple(int(r) for r in ranks_of(value))
        elif key.endswith(".importance"):
            state.importance[key[: -len(".importance")]] = value
        elif key.endswith(".slots"):
            state.slots[key[: -len(".slots")]] = value
        elif key.endswith(".rank") and value.ndim == 0:
            state.fixed_ranks[key[: -len(".rank")]] = int(value.item())
        elif any(key == p or key.startswith(p + ".") for p in router_paths):
            state.routers[key] = value
    return state


def restore(drlora, arrays: dict[str, mx.array]) -> None:
    """Put encoded state into ``drlora`` (attached with the same settings)."""
    state = decode(arrays, [layer.router_path for layer in drlora.layers]
                   + [f"{layer.path}.{k}" for layer in drlora.layers for k in drlora.family.block_router_params])
    for layer in drlora.layers:
        paths = layer.module_paths()
        if layer.pool is not None and all(p in state.slots for p in paths):
            layer.pool.set_tables([(m, state.slots[p]) for p, m in zip(paths, layer.modules)])
        else:  # a masked-layout state, or one without slots: ranks alone
            layer.set_ranks(np.concatenate([state.expert_ranks[p] for p in paths]).astype(np.int64))
        for path, module in zip(paths, layer.modules):
            module.set_rank_importance(state.importance[path])
    drlora.routing.frequency = state.frequency
    drlora.routing.seen = state.seen
    if state.routers:
        drlora.model.load_weights(list(state.routers.items()), strict=False)
    drlora.fit_width()
