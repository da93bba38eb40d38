"""Where each trained rank goes in a PEFT LoRA adapter, and back (numpy, no MLX).

A PEFT LoRA pair is ``lora_A`` (E*R, in) and ``lora_B`` (out, R*E) with
E experts (1 for an ordinary linear layer) and one rank R: row e*R+k of A is
rank k of expert e, column k*E+e of B likewise (PEFT 0.21's ``ParamWrapper``;
for E = 1 the usual ``lora.Linear``). DR-LoRA modules have a rank per expert,
so a pair holds *slots*: the first ``rank`` ranks of one expert of one
drlora-mlx module, placed at a rank offset and on some output rows of the
pair. Everything else is zero, so PEFT computes exactly DR-LoRA's update.
PEFT's scaling is alpha / R with alpha = R (scale 1): the LoRA scale is folded
into B.

Two layouts (``fused_plan``, ``per_expert_plan``):

- fused (transformers >= 5): one pair per MoE layer for ``gate_up_proj``
  (expert e: gate ranks, then up ranks; B block-diagonal, gate rows then up rows,
  or interleaved for gpt-oss) and one for ``down_proj``; R per pair is the
  largest number of ranks one expert needs.
- per-expert (transformers 4): one pair per expert projection, one rank for all
  of them (PEFT's transformers-5 conversion stacks them), and a zero gate (or up)
  partner where only one of the two is adapted, as that conversion fuses both.

Fixed-rank LoRA on attention or shared experts is one pair per linear layer.
Shared experts are targeted through their ``weight`` parameter: PEFT's
transformers-5 conversion maps every *module* target named like an expert
projection (``gate_proj``, ...) onto the fused experts, and loading fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..families.mlx_lm_names import EXPERT_PROJECTIONS
from ..families.spec import HFFamily

PREFIX = "base_model.model."


class LayoutError(InputError):
    """PEFT tensors that do not have the shapes their plan says."""


@dataclass(frozen=True)
class Slot:
    """The first ``rank`` ranks of expert ``expert`` of module ``source``, at rank
    ``offset`` of pair expert ``e``, updating output rows ``rows``."""

    source: str
    expert: int
    rank: int
    e: int = 0
    offset: int = 0
    rows: slice = field(default_factory=lambda: slice(None))


@dataclass
class Pair:
    """One PEFT lora_A / lora_B pair: a targeted module or expert parameter."""

    key: str  # state-dict prefix, without "base_model.model."
    target: str  # what the config targets: a module name or an expert parameter name
    is_parameter: bool
    experts: int
    rank: int
    in_dims: int
    out_dims: int
    slots: list[Slot] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.rank * self.experts * (self.in_dims + self.out_dims)

    @property
    def active(self) -> int:
        """Parameters that carry trained values (the rest is zero padding)."""
        return sum(s.rank * (self.in_dims + len(range(self.out_dims)[s.rows])) for s in self.slots)


@dataclass(frozen=True)
class Module:
    """A drlora-mlx LoRA module as the plans need it: ranks per expert and shape."""

    path: str  # mlx-lm module path
    ranks: tuple[int, ...]  # one per expert (one entry for a linear layer)
    in_dims: int
    out_dims: int


def _rows(part: int, parts: int, out_dims: int, interleave: bool) -> slice:
    if interleave:
        return slice(part, None, parts)
    return slice(part * out_dims, (part + 1) * out_dims)


def fused_plan(layers: list[tuple[str, dict[str, Module]]], hf: HFFamily) -> list[Pair]:
    """Pairs for transformers 5's fused experts. ``layers``: (MoE block path,
    {projection: Module}) per layer, in mlx-lm names."""
    pairs = []
    for block, modules in layers:
        experts = hf.fused_path(block) + ".experts"
        gate_up = [modules.get("gate_proj"), modules.get("up_proj")]
        fused = []
        if any(gate_up):
            some = next(m for m in gate_up if m)
            n_experts = len(some.ranks)
            slots, need = [], 0
            for e in range(n_experts):
                offset = 0
                for part, module in enumerate(gate_up):
                    if module is None:
                        continue
                    rows = _rows(part, 2, some.out_dims, hf.gate_up == "interleave")
                    slots.append(Slot(module.path, e, module.ranks[e], e, offset, rows))
                    offset += module.ranks[e]
                need = max(need, offset)
            if hf.gated_experts:
                fused.append(Pair("", f"{experts}.gate_up_proj", True, n_experts, need, some.in_dims,
                                  2 * some.out_dims, slots))
            else:  # ReLU^2 experts (Nemotron-H): experts.up_proj alone
                slots = [Slot(s.source, s.expert, s.rank, s.e, s.offset) for s in slots]
                fused.append(Pair("", f"{experts}.up_proj", True, n_experts, need, some.in_dims, some.out_dims,
                                  slots))
        down = modules.get("down_proj")
        if down is not None:
            slots = [Slot(down.path, e, r, e) for e, r in enumerate(down.ranks)]
            fused.append(Pair("", f"{experts}.down_proj", True, len(down.ranks), max(down.ranks), down.in_dims,
                              down.out_dims, slots))
        # PEFT nests one wrapper per parameter: the first (gate_up or up) inside, as ``base_layer``.
        for pair in fused:
            pair.key = f"{experts}.base_layer" if len(fused) == 2 and pair is fused[0] else experts
        pairs += fused
    return pairs


def per_expert_plan(layers: list[tuple[str, dict[str, Module]]], hf: HFFamily) -> list[Pair]:
    """Pairs for per-expert modules (transformers 4 in memory, every Hugging Face checkpoint)."""
    rank = max(r for _, modules in layers for m in modules.values() for r in m.ranks)
    pairs = []
    for block, modules in layers:
        present = dict(modules)
        for a, b in (("gate_proj", "up_proj"), ("up_proj", "gate_proj")):
            if a not in present and b in present:
                m = present[b]
                present[a] = Module("", (0,) * len(m.ranks), m.in_dims, m.out_dims)  # a zero partner
        n_experts = len(next(iter(present.values())).ranks)
        for e in range(n_experts):
            for proj in EXPERT_PROJECTIONS:
                if proj not in present:
                    continue
                m = present[proj]
                name = f"{block}.experts.{e}.{hf.expert_name(proj)}"
                slots = [Slot(m.path, e, m.ranks[e])] if m.path else []
                pairs.append(Pair(name, name, False, 1, rank, m.in_dims, m.out_dims, slots))
    return pairs


def linear_plan(modules: list[Module], rename, as_parameter, key_rename=None) -> list[Pair]:
    """One pair per fixed-rank LoRA linear layer, targeted as a module, or as its
    ``weight`` parameter where ``as_parameter(path)`` says so (same tensors and keys).
    ``rename`` gives the target's name, ``key_rename`` (default ``rename``) its tensors'."""
    key_rename = key_rename or rename
    pairs = []
    for m in modules:
        name = rename(m.path)
        parameter = as_parameter(m.path)
        target = f"{name}.weight" if parameter else name
        pairs.append(Pair(key_rename(m.path), target, parameter, 1, m.ranks[0], m.in_dims, m.out_dims,
                          [Slot(m.path, 0, m.ranks[0])]))
    return pairs


def pack(pairs: list[Pair], factors: dict[str, tuple[np.ndarray, np.ndarray]], scale: float) -> dict[str, np.ndarray]:
    """PEFT tensors from drlora-mlx factors: path -> (A (E, r, in), B (E, out, r)), unscaled."""
    tensors = {}
    for pair in pairs:
        E, R = pair.experts, pair.rank
        lora_a = np.zeros((E * R, pair.in_dims), np.float32)
        lora_b = np.zeros((pair.out_dims, R * E), np.float32)
        for s in pair.slots:
            a, b = factors[s.source]
            ks = np.arange(s.offset, s.offset + s.rank)
            lora_a[s.e * R + ks] = a[s.expert, : s.rank]
            lora_b[s.rows, ks * E + s.e] = b[s.expert, :, : s.rank] * np.float32(scale)
        tensors[f"{PREFIX}{pair.key}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{pair.key}.lora_B.weight"] = lora_b
    return tensors


def unpack(pairs: list[Pair], tensors: dict[str, np.ndarray], factors: dict[str, tuple[np.ndarray, np.ndarray]],
           scale: float) -> None:
    """The inverse of ``pack``: fill ``factors`` (zeroed arrays of the modules' shapes) in place."""
    for pair in pairs:
        E, R = pair.experts, pair.rank
        keys = [f"{PREFIX}{pair.key}.lora_{x}.weight" for x in "AB"]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise LayoutError(f"the PEFT adapter has no tensor {missing[0]}; it was not written for this layout")
        lora_a, lora_b = (tensors[k] for k in keys)
        expected = {(E * R, pair.in_dims), (pair.out_dims, R * E)}
        if {lora_a.shape, lora_b.shape} != expected:
            raise LayoutError(f"{pair.key}: PEFT tensors {lora_a.shape} / {lora_b.shape}, expected {sorted(expected)}")
        for s in pair.slots:
            a, b = factors[s.source]
            ks = np.arange(s.offset, s.offset + s.rank)
            a[s.expert, : s.rank] = lora_a[s.e * R + ks]
            b[s.expert, :, : s.rank] = lora_b[s.rows, ks * E + s.e] / np.float32(scale)
