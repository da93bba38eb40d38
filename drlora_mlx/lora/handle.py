"""The ``DRLoRA`` handle: DR-LoRA as attached to one model.

``attach`` builds it. It holds the MoE layers and their rank-masked expert
modules, the fixed-rank LoRA layers, the routing statistics and the routers,
and answers what the trainer, the growth events and the savers ask: the active
ranks, the LoRA widths, the statistics update inside the compiled step.
Growth is in ``growth``, reporting in ``report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config.settings import DRLoRAConfig
from ..method.importance import update_importance
from .head import Head
from .pooled import RankPool
from .routing import RoutingRecorder, router_weight, update_frequency
from .summary import describe, parameter_counts


@dataclass
class MoELayer:
    """One MoE block of the model and its adapted expert projections."""

    index: int  # position in model.layers
    path: str  # dotted path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    experts: nn.Module
    experts_name: str  # path of the experts below the block, e.g. "switch_mlp" (Gemma 4: "experts.switch_glu")
    router: nn.Module
    router_path: str  # dotted path of the router, e.g. "model.layers.3.mlp.gate"
    decoder: nn.Module | None = None  # the decoder layer that holds the block (or is it)
    modules: list = field(default_factory=list)  # ExpertLoRA (masked or pooled), one per target
    module_names: list = field(default_factory=list)  # attribute names inside ``experts``
    pool: RankPool | None = None  # the pooled layout's rank slots (``experts.lora_pool``)

    def module_paths(self) -> list[str]:
        return [f"{self.path}.{self.experts_name}.{name}" for name in self.module_names]

    @property
    def pool_path(self) -> str:
        return f"{self.path}.{self.experts_name}.lora_pool"

    def lora_arrays(self) -> list[mx.array]:
        """The trainable expert LoRA arrays of this layer, as allocated."""
        if self.pool is not None:
            return [self.pool.hidden, self.pool.inner]
        return [a for m in self.modules for a in (m.lora_a, m.lora_b)]

    def set_ranks(self, ranks: np.ndarray) -> None:
        """Every module's ranks from one row (module m = p * E + e); the caller fits the widths."""
        E = self.modules[0].num_experts
        new = [(m, ranks[p * E : (p + 1) * E]) for p, m in enumerate(self.modules)]
        if self.pool is not None:  # one call, so that ranks one module gives back can go to another
            self.pool.set_ranks(new)
            return
        for module, r in new:
            module.set_ranks(r)


class RoutingState(nn.Module):
    """Routing frequency f (MoE layers x experts), the method's only state
    outside the adapted layers. A module, so compiled steps carry it."""

    def __init__(self, n_layers: int, n_experts: int):
        super().__init__()
        self.frequency = mx.zeros((n_layers, n_experts))
        self.seen = mx.array(0.0)
        self.freeze()


class DRLoRA:
    """DR-LoRA attached to one model: layers, ranks, statistics, router."""

    def __init__(self, model: nn.Module, config: DRLoRAConfig, family_name: str, family, seed: int = 0):
        self.model = model
        self.seed = seed  # the pooled layout's A initialisation keys
        self.config = config
        self.family_name = family_name
        self.family = family
        self.layers: list[MoELayer] = []
        self.extra_loras: list[tuple[str, nn.Module]] = []  # (full path, mlx-lm LoRALinear)
        self.layer_paths: list[str] = []  # dotted path of every model.layers entry
        self.router_base: list[mx.array] = []  # router weights at attach time, per MoE layer
        self.routing_signal = config.routing_signal
        self.notes: list[str] = []
        self.routing: RoutingState | None = None
        self.head: Head | None = None  # the model's decoder and head apart (lora/head.py), when they check out
        self.recorder: RoutingRecorder | None = None

    # ----- shape ----------------------------------------------------------------

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
        return self.config.ranks.r_max

    def expert_modules(self):
        """Every expert LoRA module (``ExpertLoRA``) with its dotted path."""
        for layer in self.layers:
            yield from zip(layer.module_paths(), layer.modules)

    def schedule(self, total_steps: int):
        return self.config.schedule(total_steps, self.n_modules)

    # ----- ranks (layers x modules, module m = p * E + e) -------------------------

    def ranks(self) -> np.ndarray:
        return np.stack([np.concatenate([m.ranks() for m in layer.modules]) for layer in self.layers])

    def set_ranks(self, ranks: np.ndarray) -> None:
        ranks = np.asarray(ranks)
        for l, layer in enumerate(self.layers):
            layer.set_ranks(ranks[l])
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

    # ----- inside the compiled training step ------------------------------------

    def update_statistics(self, grads: dict, routing_sums: mx.array, n_tokens: mx.array) -> None:
        """Importance EMAs from the step's (accumulated) gradients and routing
        frequency from its routing sums. Call once per optimizer step, before
        the optimizer changes A and B."""
        beta = self.config.ema_beta
        flat = dict(tree_flatten(grads))
        for layer in self.layers:
            if layer.pool is not None:
                path = layer.pool_path
                layer.pool.update_importance(flat[f"{path}.hidden"], flat[f"{path}.inner"], beta)
                continue
            for path, module in zip(layer.module_paths(), layer.modules):
                update_importance(module, flat[f"{path}.lora_a"], flat[f"{path}.lora_b"], beta)
        observed = routing_sums / mx.maximum(n_tokens.astype(mx.float32), 1.0)
        self.routing.frequency = update_frequency(self.routing.frequency, observed, self.routing.seen, beta)
        self.routing.seen = mx.array(1.0)

    def factors(self) -> dict[str, tuple[mx.array, mx.array]]:
        return {path: (m.lora_a, m.lora_b) for path, m in self.expert_modules()}

    def keep_masked_ranks(self, before: dict[str, tuple[mx.array, mx.array]]) -> None:
        """Undo any optimizer change to inactive ranks (weight decay would shrink
        them). Masked layout only: a pool's unused slots are zero and stay zero."""
        for path, module in self.expert_modules():
            a, b = before[path]
            m = module.rank_mask
            module.lora_a = mx.where(m[..., None] > 0, module.lora_a, a)
            module.lora_b = mx.where(m[:, None, :] > 0, module.lora_b, b)

    # ----- router ---------------------------------------------------------------

    def set_router_trainable(self, trainable: bool) -> None:
        for layer in self.layers:
            if trainable:
                layer.router.unfreeze()
                if self.family.frozen_router_params:
                    layer.router.freeze(keys=list(self.family.frozen_router_params), strict=False)
            else:
                layer.router.freeze()

    def trained_routers(self) -> list[tuple[str, mx.array]]:
        """(router path, weight change) of every router that training has changed."""
        if self.config.train_router == "never":
            return []
        changed = [(layer.router_path, router_weight(layer.router) - base)
                   for layer, base in zip(self.layers, self.router_base)]
        return [(path, delta) for path, delta in changed if bool(mx.any(delta != 0))]

    # ----- what it is -------------------------------------------------------------

    def parameter_counts(self) -> dict:
        """Allocated, active and uniform-LoRA-at-r_target parameter counts (see ``report``)."""
        return parameter_counts(self)

    def report(self) -> str:
        """What was adapted, in a few lines (see ``report``)."""
        return describe(self)
