"""Export a drlora-mlx adapter to Hugging Face PEFT, and import such an export back.

``export_peft(adapter_path, out, layout)`` reads a drlora-mlx adapter directory
(no base model needed) and writes ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads on
the transformers model of the same checkpoint, plus ``drlora_export.json``:
drlora-mlx's version, the method configuration, the rank of every module, what
was written and the sha256 of the weights file. ``peft_layout`` says where each
rank goes. A trained router is a full weight (PEFT ``modules_to_save``).

``import_peft(model, peft_dir)`` attaches DR-LoRA to an mlx-lm model and loads
such an export into it: weights, ranks and router (PEFT has no place for the
growth statistics, so they start from zero).

PEFT loads tensors that match nothing with at most a warning, so every
combination that PEFT would not apply is refused here, before anything is
written.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..config.settings import DRLoRAConfig
from ..families import family_of, hf_family
from ..families.mlx_lm_names import EXPERT_PROJECTIONS
from ..families.spec import HFFamily
from ..files import write_bytes, write_json
from ..lora.attach import attach
from ..lora.handle import DRLoRA
from ..version import __version__
from .adapters import (
    ADAPTER_WEIGHTS,
    AdapterError,
    read_adapter_config,
    read_arrays,
    read_json,
    read_state,
)
from .peft_layout import (
    PREFIX,
    Module,
    Pair,
    fused_plan,
    linear_plan,
    pack,
    per_expert_plan,
    unpack,
)
from .peft_support import WRITTEN_FOR, ExportError, installed, refusal

LAYOUTS = ("fused", "per-expert")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
EXPORT_INFO = "drlora_export.json"


@dataclass
class Adapter:
    """A trained adapter as the exporter sees it: modules, factors and routers by mlx-lm path."""

    family: str
    model: str
    config: DRLoRAConfig
    layers: list[tuple[str, dict[str, Module]]]  # (MoE block path, {projection: Module})
    extras: list[Module]  # fixed-rank LoRA on attention / shared experts
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # A (E, r, in), B (E, out, r)
    routers: dict[str, np.ndarray] = field(default_factory=dict)  # trained router parameters
    router_paths: list[str] = field(default_factory=list)  # the router modules


def _numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def read_adapter(adapter_path: str | os.PathLike) -> Adapter:
    """The adapter that ``drlora-mlx train`` saved in ``adapter_path``."""
    adapter_path = Path(adapter_path)
    meta = read_adapter_config(adapter_path)
    config = DRLoRAConfig.from_dict(meta["method"])
    family = meta["family"]
    weights = read_arrays(adapter_path / ADAPTER_WEIGHTS, "adapter weights")
    blocks = [entry["block"] for entry in meta["layers"]]
    routers = [entry["router"] for entry in meta["layers"]]
    router_state = routers + [key for entry in meta["layers"] for key in entry.get("router_extras", [])]
    saved = read_state(adapter_path, router_state)
    r_max = config.ranks.r_max
    adapter = Adapter(family, meta["model"], config, [], [])
    for block, entry in zip(blocks, meta["layers"]):
        modules = {}
        for target, path in entry["modules"].items():
            a = _numpy(weights[f"{path}.lora_a"][:, :r_max])
            b = _numpy(weights[f"{path}.lora_b"][..., :r_max])
            modules[target] = Module(path, saved.expert_ranks[path], a.shape[2], b.shape[1])
            adapter.factors[path] = (a, b)
        adapter.layers.append((block, modules))
    for path, r in sorted(saved.fixed_ranks.items()):
        a = _numpy(weights[f"{path}.lora_a"][:, :r]).T[None]
        b = _numpy(weights[f"{path}.lora_b"][:r]).T[None]
        adapter.extras.append(Module(path, (r,), a.shape[2], b.shape[1]))
        adapter.factors[path] = (a, b)
    adapter.routers = {k: _numpy(v) for k, v in saved.routers.items()}
    adapter.router_paths = routers
    return adapter


# ----- layouts ------------------------------------------------------------------


def _check_layout(adapter: Adapter, layout: str, hf: HFFamily) -> None:
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout == "fused":
        return
    name = adapter.family
    if hf.per_expert_refusal:
        raise ExportError(f"{name} cannot be exported with --layout per-expert: {hf.per_expert_refusal}")
    if adapter.routers and hf.renames:
        raise ExportError(
            f"{name}: --layout per-expert cannot carry the trained router: transformers 5 renames {name}'s router "
            "module and PEFT would silently skip it; use --layout fused (transformers >= 5)"
        )


def _plan(adapter: Adapter, layout: str, hf: HFFamily) -> tuple[list[Pair], list[Pair]]:
    """(expert pairs, fixed-rank pairs) of the layout."""
    if layout == "fused":
        return fused_plan(adapter.layers, hf), linear_plan(adapter.extras, hf.fused_path, _named_like_an_expert,
                                                           hf.adapter_key)
    return per_expert_plan(adapter.layers, hf), linear_plan(adapter.extras, lambda p: p, _named_like_an_expert)


def _named_like_an_expert(path: str) -> bool:
    """PEFT's transformers-5 conversion takes every *module* target named like an expert projection
    for the fused experts; such layers (shared experts, Arcee's attention gate) are targeted by
    their ``weight`` parameter instead."""
    return path.rsplit(".", 1)[-1] in EXPERT_PROJECTIONS


def _router_key(path: str, layout: str, hf: HFFamily) -> str:
    return PREFIX + (hf.fused_path(path) if layout == "fused" else path)


def _peft_config(adapter: Adapter, experts: list[Pair], extras: list[Pair], layout: str, hf: HFFamily) -> dict:
    # r is the experts' rank: PEFT's transformers-5 conversion of per-expert adapters assumes it.
    top = max(p.rank for p in experts)
    pairs = experts + extras
    ranks = {p.target: p.rank for p in pairs if p.rank != top}
    modules = sorted(hf.fused_path(p) if layout == "fused" else p for p in adapter.router_paths) if adapter.routers else []
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.model,
        "r": top,
        "lora_alpha": top,
        # alpha == r everywhere: PEFT's scaling is 1, the LoRA scale is folded into lora_B.
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "target_modules": sorted(p.target for p in pairs if not p.is_parameter),
        "target_parameters": sorted(p.target for p in pairs if p.is_parameter) or None,
        "modules_to_save": modules or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


# ----- export -------------------------------------------------------------------


@dataclass
class ExportReport:
    """What an export wrote."""

    out: Path
    layout: str
    family: str
    lora_parameters: int
    padded_zeros: int
    router_parameters: int
    layers: list[dict]
    for_transformers: str | None = None  # the transformers version the export was checked for

    def summary(self) -> str:
        share = self.padded_zeros / max(self.lora_parameters, 1)
        lines = [
            f"exported a {self.family} adapter to {self.out}/ (PEFT LoRA, {self.layout} layout)",
            f"  LoRA parameters written: {self.lora_parameters:,}, of which {self.padded_zeros:,} ({share:.1%}) are "
            "zero padding that expresses the per-expert ranks",
        ]
        if self.router_parameters:
            lines.append(f"  trained routers (modules_to_save): {self.router_parameters:,} parameters")
        for layer in self.layers:
            ranks = ", ".join(f"{t} {r['min']}-{r['max']} (mean {r['mean']:.2f})" for t, r in layer["ranks"].items())
            lines.append(f"  {layer['block']}: ranks {ranks}; PEFT rank {layer['peft_rank']}")
        lines.append(f"  written for {WRITTEN_FOR[self.layout]}; " + (
            f"checked for transformers {self.for_transformers}" if self.for_transformers else
            "no transformers installed here to check it for (--for-transformers names the version that will load it)"))
        peft = installed("peft")
        if peft:
            lines.append(f"  PEFT {peft} is installed here")
        return "\n".join(lines)


def _layer_summaries(adapter: Adapter, pairs: list[Pair]) -> list[dict]:
    rows = []
    for block, modules in adapter.layers:
        paths = {m.path for m in modules.values()}
        peft = sorted({p.rank for p in pairs if any(s.source in paths for s in p.slots)})
        rows.append({
            "block": block,
            "ranks": {t: {"min": min(m.ranks), "max": max(m.ranks), "mean": float(np.mean(m.ranks))}
                      for t, m in modules.items()},
            "peft_rank": "/".join(map(str, peft)),
        })
    return rows


def export_peft(adapter_path: str | os.PathLike, out: str | os.PathLike, layout: str = "fused",
                for_transformers: str | None = None) -> ExportReport:
    """Write the PEFT export of the adapter in ``adapter_path`` to ``out``, for the
    transformers version ``for_transformers`` (by default the one installed, if
    any): a layout that version would load without applying is refused before
    anything is written."""
    from safetensors.numpy import save

    adapter = read_adapter(adapter_path)
    hf = hf_family(adapter.family)
    _check_layout(adapter, layout, hf)
    for_transformers = for_transformers or installed("transformers")
    why = refusal(layout, for_transformers) if for_transformers else ""
    if why:
        raise ExportError(f"cannot export {adapter.family} with --layout {layout}: {why}")
    experts, extras = _plan(adapter, layout, hf)
    pairs = experts + extras
    scale = adapter.config.scale
    tensors = pack(pairs, adapter.factors, scale)
    for path, value in adapter.routers.items():
        tensors[_router_key(path, layout, hf)] = value
    data = save(tensors, metadata={"format": "pt"})
    lora = sum(p.size for p in pairs)
    report = ExportReport(
        Path(out), layout, adapter.family, lora, lora - sum(p.active for p in pairs),
        sum(v.size for v in adapter.routers.values()), _layer_summaries(adapter, pairs), for_transformers,
    )
    info = {
        "drlora_mlx_version": __version__,
        "family": adapter.family,
        "layout": layout,
        "for_transformers": for_transformers,
        "base_model": adapter.model,
        "method": adapter.config.to_dict(),
        "lora_scale_folded_into_lora_B": scale,
        "layers": [{"block": b, "modules": {t: _module_info(m) for t, m in ms.items()}} for b, ms in adapter.layers],
        "extras": [_module_info(m) for m in adapter.extras],
        "routers": sorted(adapter.routers),
        "parameters": {"lora": report.lora_parameters, "padded_zeros": report.padded_zeros,
                       "routers": report.router_parameters},
        "adapter_model_sha256": hashlib.sha256(data).hexdigest(),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / PEFT_WEIGHTS, data)
    write_json(out / PEFT_CONFIG, _peft_config(adapter, experts, extras, layout, hf))
    write_json(out / EXPORT_INFO, info)
    return report


def _module_info(m: Module) -> dict:
    return {"path": m.path, "ranks": list(m.ranks), "in": m.in_dims, "out": m.out_dims}


def _module(info: dict) -> Module:
    return Module(info["path"], tuple(info["ranks"]), info["in"], info["out"])


# ----- import -------------------------------------------------------------------


def read_export(peft_dir: str | os.PathLike) -> dict:
    """The ``drlora_export.json`` of a PEFT export, after checking the weights are the ones exported."""
    peft_dir = Path(peft_dir)
    info = read_json(
        peft_dir / EXPORT_INFO,
        f"{peft_dir} is not a PEFT adapter exported by drlora-mlx ({EXPORT_INFO} is missing): only adapters "
        "written by `drlora-mlx export` can be imported, as their ranks are recorded there",
    )
    weights = peft_dir / PEFT_WEIGHTS
    if not weights.exists() or hashlib.sha256(weights.read_bytes()).hexdigest() != info["adapter_model_sha256"]:
        raise AdapterError(f"{weights} is missing or not the file drlora-mlx exported (sha256 differs)")
    return info


def import_peft(model, peft_dir: str | os.PathLike, info: dict | None = None) -> DRLoRA:
    """Attach DR-LoRA to ``model`` (the export's base, loaded by mlx-lm) and load a
    drlora-mlx PEFT export into it: factors, per-expert ranks and trained router.
    ``info``: the export's record as ``read_export`` returned it (read here if not given)."""
    from safetensors.numpy import load_file

    peft_dir = Path(peft_dir)
    info = info if info is not None else read_export(peft_dir)
    if family_of(model) != info["family"]:
        raise AdapterError(f"{peft_dir} was exported from a {info['family']} model, not {family_of(model)}")
    config = DRLoRAConfig.from_dict(info["method"])
    drlora = attach(model, config)
    hf = hf_family(info["family"])
    layers = [(entry["block"], {t: _module(m) for t, m in entry["modules"].items()}) for entry in info["layers"]]
    adapter = Adapter(info["family"], info["base_model"], config, layers, [_module(m) for m in info["extras"]])
    expected = {m.path for _, ms in layers for m in ms.values()} | {m.path for m in adapter.extras}
    found = {p for p, _ in drlora.expert_modules()} | {p for p, _ in drlora.extra_loras}
    if expected != found:
        raise AdapterError(f"{peft_dir} does not fit this model: its modules differ from the model's adapted layers")
    for _, modules in layers:
        for m in modules.values():
            adapter.factors[m.path] = (np.zeros((len(m.ranks), config.ranks.r_max, m.in_dims), np.float32),
                                       np.zeros((len(m.ranks), m.out_dims, config.ranks.r_max), np.float32))
    for m in adapter.extras:
        adapter.factors[m.path] = (np.zeros((1, m.ranks[0], m.in_dims), np.float32),
                                   np.zeros((1, m.out_dims, m.ranks[0]), np.float32))
    tensors = load_file(str(peft_dir / PEFT_WEIGHTS))
    experts, extras = _plan(adapter, info["layout"], hf)
    unpack(experts + extras, tensors, adapter.factors, info["lora_scale_folded_into_lora_B"])
    ranks = {m.path: m.ranks for _, ms in layers for m in ms.values()}
    for path, module in drlora.expert_modules():
        a, b = adapter.factors[path]
        module.load_factors(mx.array(a), mx.array(b), ranks[path])
    drlora.fit_width()
    for path, lora in drlora.extra_loras:
        a, b = adapter.factors[path]
        lora.lora_a, lora.lora_b = mx.array(a[0].T), mx.array(b[0].T)
    if info["routers"]:
        current = dict(tree_flatten(model.parameters()))
        routers = [(p, mx.array(tensors[_router_key(p, info["layout"], hf)]).astype(current[p].dtype))
                   for p in info["routers"]]
        model.load_weights(routers, strict=False)
    mx.eval(model.parameters())
    return drlora
