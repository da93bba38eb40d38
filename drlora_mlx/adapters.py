"""Saving and loading adapters: mlx-lm's format, plus the DR-LoRA state beside it.

``<adapter-path>/adapters.safetensors`` + ``adapter_config.json`` are exactly
what ``mlx_lm.load(model, adapter_path=...)``, ``mlx_lm.generate`` and
``mlx_lm fuse`` read: every module at one rank R (mlx-lm has one rank), the
per-expert ranks expressed by zero rows and columns (A * mask, B * mask), so
the logits are DR-LoRA's. A trained router rides along as an exact rank-E LoRA
on the router when mlx-lm can express it (a linear router with E <= R);
otherwise mlx-lm cannot load it, and the save says so.

``drlora_state.safetensors`` holds the rank masks and statistics,
``router.safetensors`` the trained router weights, ``drlora_config.json`` the
method configuration; ``load`` reads them all back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import __version__
from .attach import DRLoRA, attach, router_linear, router_weight
from .config import DRLoRAConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_WEIGHTS = "drlora_state.safetensors"
ROUTER_WEIGHTS = "router.safetensors"
DRLORA_CONFIG = "drlora_config.json"


class AdapterError(ValueError):
    """An adapter directory that cannot be read; the message says why."""


def _pad(x: mx.array, axis: int, size: int) -> mx.array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return mx.pad(x, widths)


def _relative(drlora: DRLoRA, path: str) -> tuple[int, str]:
    """(layer index, path inside the decoder layer) of a full module path."""
    for i, lp in enumerate(drlora.layer_paths):
        if path.startswith(lp + "."):
            return i, path[len(lp) + 1 :]
    raise ValueError(f"{path} is not inside a decoder layer")


def trained_routers(drlora: DRLoRA) -> list[tuple[str, mx.array]]:
    """(router path, weight delta) of every router that changed in training."""
    if drlora.config.train_router == "never":
        return []
    out = []
    for layer, base in zip(drlora.layers, drlora.router_base):
        delta = router_weight(layer.router) - base
        if bool(mx.any(delta != 0)):
            out.append((f"{layer.path}.{drlora.family.router}", delta))
    return out


def _router_as_lora(drlora: DRLoRA, rank: int) -> bool:
    """Whether mlx-lm can carry the trained routers as a LoRA of this rank."""
    return all(
        isinstance(router_linear(layer.router)[1], (nn.Linear, nn.QuantizedLinear)) for layer in drlora.layers
    ) and drlora.n_experts <= rank


def mlx_lm_adapter(drlora: DRLoRA) -> tuple[dict, dict[str, mx.array], bool]:
    """(adapter_config, weights, router_included) in mlx-lm's LoRA format."""
    scale = drlora.config.scale
    rank = max([drlora.r_max] + [l.lora_a.shape[1] for _, l in drlora.extra_loras])
    routers = trained_routers(drlora)
    router_included = bool(routers) and _router_as_lora(drlora, rank)
    weights, keys = {}, set()
    for path, module in drlora.expert_modules():
        a, b = module.masked_factors()
        weights[f"{path}.lora_a"] = _pad(a, 1, rank)
        weights[f"{path}.lora_b"] = _pad(b, 2, rank)
        keys.add(_relative(drlora, path)[1])
    for path, lora in drlora.extra_loras:
        weights[f"{path}.lora_a"] = _pad(lora.lora_a, 1, rank)
        weights[f"{path}.lora_b"] = _pad(lora.lora_b, 0, rank)
        keys.add(_relative(drlora, path)[1])
    if router_included:
        # scale * A B = delta^T exactly, with B = [I_E; 0] selecting the experts.
        for (path, delta), layer in zip(routers, drlora.layers):
            inner, _ = router_linear(layer.router)
            path = f"{path}.{inner}" if inner else path
            eye = mx.eye(drlora.n_experts, dtype=delta.dtype)
            weights[f"{path}.lora_a"] = _pad(delta.T / scale, 1, rank)
            weights[f"{path}.lora_b"] = _pad(eye, 0, rank)
            keys.add(_relative(drlora, path)[1])
    config = {
        "fine_tune_type": "lora",
        "num_layers": len(drlora.layer_paths),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
    }
    return config, weights, router_included


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_safetensors(path: Path, weights: dict) -> None:
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, path)


def state_weights(drlora: DRLoRA) -> dict[str, mx.array]:
    """The DR-LoRA state: rank masks, importance EMAs, routing frequency."""
    weights = {
        "routing.frequency": drlora.state.frequency,
        "routing.seen": drlora.state.seen,
    }
    for path, module in drlora.expert_modules():
        weights[f"{path}.rank_mask"] = module.rank_mask
        weights[f"{path}.importance"] = module.importance
    return weights


def save_adapter(drlora: DRLoRA, adapter_path: str | os.PathLike, model_path: str, extra: dict | None = None) -> dict:
    """Write the adapter directory; returns what was written, for reporting."""
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    config, weights, router_included = mlx_lm_adapter(drlora)
    config["model"] = model_path
    if extra:
        config.update(extra)
    _write_safetensors(adapter_path / ADAPTER_WEIGHTS, weights)
    _write_json(adapter_path / ADAPTER_CONFIG, config)
    _write_safetensors(adapter_path / STATE_WEIGHTS, state_weights(drlora))
    routers = {
        f"{layer.path}.{drlora.family.router}.{name}": value
        for layer in drlora.layers
        for name, value in tree_flatten(layer.router.parameters())
    }
    router_file = adapter_path / ROUTER_WEIGHTS
    if trained_routers(drlora):
        _write_safetensors(router_file, routers)
    elif router_file.exists():
        router_file.unlink()
    _write_json(
        adapter_path / DRLORA_CONFIG,
        {
            "drlora_mlx_version": __version__,
            "family": drlora.family_name,
            "model": model_path,
            "method": drlora.config.to_dict(),
            "routing_signal_used": drlora.routing_signal,
            "layers": [
                {
                    "layer": layer.index,
                    "modules": {
                        t: f"{layer.path}.{layer.experts_name}.{name}"
                        for t, name in zip(drlora.targets, layer.module_names)
                    },
                }
                for layer in drlora.layers
            ],
        },
    )
    return {"router_trained": router_file.exists(), "router_in_mlx_lm_adapter": router_included}


def read_json(path: Path, missing: str) -> dict:
    """A JSON record of an adapter or export; ``missing`` is the error when it is absent."""
    if not path.exists():
        raise AdapterError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({e.msg})") from None


def read_config(adapter_path: str | os.PathLike) -> dict:
    adapter_path = Path(adapter_path)
    return read_json(
        adapter_path / DRLORA_CONFIG,
        f"{adapter_path} is not a drlora-mlx adapter directory ({DRLORA_CONFIG} is missing); "
        "give the --adapter-path a drlora-mlx train run wrote",
    )


def read_ranks(adapter_path: str | os.PathLike) -> dict:
    """The active rank of every expert module of a saved adapter."""
    adapter_path = Path(adapter_path)
    meta = read_config(adapter_path)
    config = DRLoRAConfig.from_dict(meta["method"])
    state = mx.load(str(adapter_path / STATE_WEIGHTS))
    r_init, r_target, r_max = config.ranks
    layers = []
    for entry in meta["layers"]:
        row = {"layer": entry["layer"]}
        for target, path in entry["modules"].items():
            row[target] = [int(r) for r in np.asarray(state[f"{path}.rank_mask"].sum(axis=-1))]
        layers.append(row)
    return {"r_init": r_init, "r_max": r_max, "r_target": r_target, "targets": list(config.targets), "layers": layers}


def load_into(model: nn.Module, adapter_path: str | os.PathLike) -> DRLoRA:
    """Attach the adapter saved in ``adapter_path`` to ``model`` (its base model)."""
    adapter_path = Path(adapter_path)
    meta = read_config(adapter_path)
    config = DRLoRAConfig.from_dict(meta["method"])
    drlora = attach(model, config)
    weights = mx.load(str(adapter_path / ADAPTER_WEIGHTS))
    state = mx.load(str(adapter_path / STATE_WEIGHTS))
    for path, module in drlora.expert_modules():
        ranks = np.asarray(state[f"{path}.rank_mask"].sum(axis=-1)).astype(np.int64)
        module.load_factors(weights[f"{path}.lora_a"][:, : module.r_max], weights[f"{path}.lora_b"][..., : module.r_max],
                            ranks)
        module.importance = state[f"{path}.importance"]
    for path, lora in drlora.extra_loras:
        r = lora.lora_a.shape[1]
        lora.lora_a = weights[f"{path}.lora_a"][:, :r]
        lora.lora_b = weights[f"{path}.lora_b"][:r]
    drlora.fit_width()
    drlora.state.frequency = state["routing.frequency"]
    drlora.state.seen = state["routing.seen"]
    router_file = adapter_path / ROUTER_WEIGHTS
    if router_file.exists():
        model.load_weights(list(mx.load(str(router_file)).items()), strict=False)
    mx.eval(model.parameters(), drlora.state.parameters())
    return drlora


def load(model: str, adapter_path: str | os.PathLike | None = None):
    """(model, tokenizer, drlora) like ``mlx_lm.load``, with the DR-LoRA adapter
    (masks, routers and all) applied when ``adapter_path`` is given."""
    from .modelio import load_base

    base, tokenizer = load_base(model)
    drlora = load_into(base, adapter_path) if adapter_path is not None else None
    base.eval()
    return base, tokenizer, drlora
