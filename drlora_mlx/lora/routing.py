"""Routing statistics (docs/METHOD.md, section 3: Eq. 5): what each expert receives.

The experts module and the router of every MoE block get a subclass of their
own class (same parameters, same paths) that reports its inputs or outputs to
a ``RoutingRecorder`` while one is capturing. The recorder turns them into a
per-expert sum over the loss tokens of a batch:

- ``count``: how many of the loss tokens were routed to the expert (top-k
  membership, read from the indices the experts receive; any family);
- ``weight``: the routing weight the block applied to the expert, summed over
  the loss tokens (from the router's own output, by the family's rule).

Divided by the number of loss tokens of the optimizer step, these are the
fraction of tokens and the mean applied weight per expert. Only the forward
pass inside ``capture`` records, so a forward re-run by gradient
checkpointing during the backward pass is never counted twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .masked import dequantized_weight

_OBSERVED_CLASSES: dict[type, type] = {}


def _observed_class(cls: type) -> type:
    """A subclass of ``cls`` whose instances report each call to their recorder."""
    if getattr(cls, "_drlora_observed", False):
        return cls
    if cls not in _OBSERVED_CLASSES:

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            self._drlora_recorder._observe(self._drlora_site, self._drlora_role, args, out)
            return out

        _OBSERVED_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_drlora_observed": True})
    return _OBSERVED_CLASSES[cls]


def observe(module: nn.Module, recorder: "RoutingRecorder", site: int, role: str) -> None:
    """Swap ``module``'s class for its observed subclass, in place."""
    module.__class__ = _observed_class(type(module))
    module._drlora_recorder = recorder
    module._drlora_site = site
    module._drlora_role = role


def unobserve(module: nn.Module) -> None:
    """Give ``module`` its own class back."""
    if getattr(type(module), "_drlora_observed", False):
        module.__class__ = type(module).__mro__[1]
        for attr in ("_drlora_recorder", "_drlora_site", "_drlora_role"):
            object.__delattr__(module, attr)


def router_linear(router: nn.Module) -> tuple[str, nn.Module]:
    """The linear map inside a router, with its path relative to the router:
    the router itself ("") for linear gates and for DeepSeek-style gates that
    hold a bare ``weight``, else its one linear child, whatever its name
    (Granite's ``layer``, ``gate_proj``, ``wg``, ``gate``, ``proj``, ``classifier``)."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)) or isinstance(router.get("weight"), mx.array):
        return "", router
    linears = [(k, v) for k, v in router.children().items() if isinstance(v, (nn.Linear, nn.QuantizedLinear))]
    if len(linears) != 1:
        raise ValueError(f"{type(router).__name__} has {len(linears)} linear layers; expected one")
    return linears[0]


def router_weight(router: nn.Module) -> mx.array:
    """The router's (experts x hidden) weight as float."""
    return dequantized_weight(router_linear(router)[1])


@dataclass
class RoutingSite:
    """One MoE block: its experts, its router and how it weights experts."""

    block: nn.Module
    n_experts: int
    weights_rule: Optional[Callable]
    routed: Optional[Callable] = None  # which slots reached a real expert (all when None)


class RoutingRecorder:
    """Collects per-expert routing sums over the loss tokens of a forward pass."""

    def __init__(self, sites: list[RoutingSite], signal: str):
        if signal not in ("weight", "count"):
            raise ValueError(f"routing signal must be 'weight' or 'count', got {signal!r}")
        if signal == "weight" and any(s.weights_rule is None for s in sites):
            raise ValueError("this family has no routing-weight rule; use the 'count' signal")
        self.sites = sites
        self.signal = signal
        self._token_mask = None
        self._router_out: dict[int, object] = {}
        self._sums: dict[int, mx.array] = {}

    @contextmanager
    def capture(self, token_mask: mx.array):
        """Record while the body runs; ``token_mask`` (batch, seq) marks loss tokens."""
        self._token_mask = mx.stop_gradient(token_mask)
        self._router_out, self._sums = {}, {}
        try:
            yield self
        finally:
            self._token_mask = None
            self._router_out = {}

    def _observe(self, site: int, role: str, args, out) -> None:
        if self._token_mask is None:
            return
        if role == "router":
            self._router_out[site] = out
            return
        indices = mx.stop_gradient(args[1])
        mask = self._token_mask.reshape(indices.shape[:-1]).astype(mx.float32)
        spec = self.sites[site]
        values = mx.broadcast_to(mask[..., None], indices.shape)
        if spec.routed is not None:
            values = values * spec.routed(self._router_out[site], indices, spec.block).astype(mx.float32)
        if self.signal == "weight":
            weights = spec.weights_rule(self._router_out[site], indices, spec.block, args[0])
            values = mx.stop_gradient(weights) * values
        sums = mx.zeros((spec.n_experts,), dtype=mx.float32)
        self._sums[site] = sums.at[indices.reshape(-1)].add(values.reshape(-1))

    def sums(self) -> mx.array:
        """(sites, experts): the sums of the last capture, in site order."""
        missing = [i for i in range(len(self.sites)) if i not in self._sums]
        if missing:
            raise RuntimeError(f"MoE blocks {missing} were not called in the captured forward pass")
        return mx.stack([self._sums[i] for i in range(len(self.sites))])


def update_frequency(frequency: mx.array, observed: mx.array, seen: mx.array, beta: float) -> mx.array:
    """f <- beta f + (1 - beta) w, where the first observation initialises f (Eq. 5).

    ``seen`` is a 0-d array: 0 before the first observation, 1 after.
    """
    ema = beta * frequency + (1.0 - beta) * observed
    return mx.where(seen > 0, ema, observed)
