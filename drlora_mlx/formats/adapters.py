"""Saving and loading adapters: mlx-lm's format, plus the DR-LoRA state beside it.

``<adapter-path>/adapters.safetensors`` + ``adapter_config.json`` are exactly
what ``mlx_lm.load(model, adapter_path=...)``, ``mlx_lm.generate`` and
``mlx_lm fuse`` read: every module at one rank R (mlx-lm has one rank), the
per-expert ranks expressed by zero rows and columns (A * mask, B * mask), so
the logits are DR-LoRA's. A trained router rides along as an exact rank-E LoRA
on the router when mlx-lm can express it (a linear router with E <= R);
otherwise mlx-lm cannot load it, and the save says so.

``drlora_state.safetensors`` holds DR-LoRA's own state (``state``: rank masks,
statistics, fixed ranks, routers), ``drlora_config.json`` the method and
training settings; ``load`` reads them all back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config.settings import DRLoRAConfig
from ..errors import InputError
from ..files import FileSet, storage
from ..lora import codec
from ..lora.attach import attach
from ..lora.handle import DRLoRA
from ..lora.routing import router_linear
from ..version import __version__

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_WEIGHTS = "drlora_state.safetensors"
DRLORA_CONFIG = "drlora_config.json"


class AdapterError(InputError):
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


def _router_as_lora(drlora: DRLoRA, rank: int) -> bool:
    """Whether mlx-lm can carry the trained routers as a LoRA of this rank."""
    linears = [router_linear(layer.router)[1] for layer in drlora.layers]
    return all(isinstance(l, (nn.Linear, nn.QuantizedLinear)) and l.weight.shape[0] <= rank for l in linears)


def mlx_lm_adapter(drlora: DRLoRA) -> tuple[dict, dict[str, mx.array], bool]:
    """(adapter_config, weights, router_included) in mlx-lm's LoRA format."""
    scale = drlora.config.scale
    rank = max([drlora.r_max] + [l.lora_a.shape[1] for _, l in drlora.extra_loras])
    routers = drlora.trained_routers()
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
            eye = mx.eye(delta.shape[0], dtype=delta.dtype)
            weights[f"{path}.lora_a"] = _pad(delta.T / scale, 1, rank)
            weights[f"{path}.lora_b"] = _pad(eye, 0, rank)
            keys.add(_relative(drlora, path)[1])
    layers = drlora.config.num_layers
    config = {
        "fine_tune_type": "lora",
        # mlx-lm applies the keys to the last num_layers decoder layers, as they were adapted here.
        "num_layers": len(drlora.layer_paths) if layers == -1 else layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
    }
    return config, weights, router_included


def save_adapter(drlora: DRLoRA, adapter_path: str | os.PathLike, model_path: str,
                 training: dict | None = None) -> dict:
    """Write the adapter directory (``training``: the run's training settings,
    recorded beside the method's); returns what was written, for reporting."""
    adapter_path = Path(adapter_path)
    with storage("the adapter", adapter_path):
        adapter_path.mkdir(parents=True, exist_ok=True)
    config, weights, router_included = mlx_lm_adapter(drlora)
    config["model"] = model_path
    # All four files are written before any replaces its previous version: the folder never
    # holds one run's weights beside another's state.
    files = FileSet(adapter_path, "the adapter")
    files.safetensors(adapter_path / ADAPTER_WEIGHTS, weights)
    files.json(adapter_path / ADAPTER_CONFIG, config)
    files.safetensors(adapter_path / STATE_WEIGHTS, codec.encode(drlora))
    record = {
        "drlora_mlx_version": __version__,
        "family": drlora.family_name,
        "model": model_path,
        "method": drlora.config.to_dict(),
        "routing_signal_used": drlora.routing_signal,
        "layers": [
            {"layer": layer.index, "block": layer.path, "router": layer.router_path,
             "router_extras": [f"{layer.path}.{k}" for k in drlora.family.block_router_params],
             "modules": dict(zip(drlora.targets, layer.module_paths()))}
            for layer in drlora.layers
        ],
    }
    if training is not None:
        record["training"] = training
    files.json(adapter_path / DRLORA_CONFIG, record)
    files.publish()
    return {"router_trained": bool(drlora.trained_routers()), "router_in_mlx_lm_adapter": router_included}


def read_json(path: Path, missing: str) -> dict:
    """A JSON record of an adapter or export; ``missing`` is the error when it is absent."""
    if not path.exists():
        raise AdapterError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({e.msg})") from None


def read_adapter_config(adapter_path: str | os.PathLike) -> dict:
    adapter_path = Path(adapter_path)
    return read_json(
        adapter_path / DRLORA_CONFIG,
        f"{adapter_path} is not a drlora-mlx adapter directory ({DRLORA_CONFIG} is missing); "
        "give the --adapter-path a drlora-mlx train run wrote",
    )


def read_arrays(path: Path, what: str) -> dict[str, mx.array]:
    """A safetensors file of an adapter directory; ``what`` names it in the error."""
    if not path.exists():
        raise AdapterError(f"{path.parent} is not a complete drlora-mlx adapter directory ({what} {path.name} is missing)")
    return mx.load(str(path))


def read_state(adapter_path: str | os.PathLike, router_paths=()) -> codec.AdapterState:
    """The decoded DR-LoRA state of a saved adapter."""
    return codec.decode(read_arrays(Path(adapter_path) / STATE_WEIGHTS, "DR-LoRA state"), router_paths)


def read_ranks(adapter_path: str | os.PathLike) -> dict:
    """The active rank of every expert module of a saved adapter (and, for a
    routed run, the experts each layer chose)."""
    meta = read_adapter_config(adapter_path)
    config = DRLoRAConfig.from_dict(meta["method"])
    ranks = read_state(adapter_path).expert_ranks
    layers = [{"layer": entry["layer"], **{t: list(ranks[p]) for t, p in entry["modules"].items()}}
              for entry in meta["layers"]]
    r = config.ranks
    info = {"method": config.method, "r_init": r.r_init, "r_max": r.r_max, "r_target": r.r_target,
            "targets": list(config.targets), "layers": layers}
    if config.method == "routed":  # the experts it chose: those holding ranks in any projection
        info["chosen"] = [sorted({e for t in config.targets for e, rank in enumerate(layer[t]) if rank})
                          for layer in layers]
    return info


def load_into(model: nn.Module, adapter_path: str | os.PathLike) -> DRLoRA:
    """Attach the adapter saved in ``adapter_path`` to ``model`` (its base model)."""
    adapter_path = Path(adapter_path)
    config = DRLoRAConfig.from_dict(read_adapter_config(adapter_path)["method"])
    drlora = attach(model, config)
    weights = read_arrays(adapter_path / ADAPTER_WEIGHTS, "adapter weights")
    codec.restore(drlora, read_arrays(adapter_path / STATE_WEIGHTS, "DR-LoRA state"))
    for path, module in drlora.expert_modules():
        r_max = module.r_max
        module.load_factors(weights[f"{path}.lora_a"][:, :r_max], weights[f"{path}.lora_b"][..., :r_max],
                            module.ranks())
    for path, lora in drlora.extra_loras:
        r = lora.lora_a.shape[1]
        lora.lora_a = weights[f"{path}.lora_a"][:, :r]
        lora.lora_b = weights[f"{path}.lora_b"][:r]
    mx.eval(model.parameters(), drlora.routing.parameters())
    return drlora


def load(model: str, adapter_path: str | os.PathLike | None = None):
    """(model, tokenizer, drlora) like ``mlx_lm.load``, with the DR-LoRA adapter
    (masks, routers and all) applied when ``adapter_path`` is given."""
    from .base_model import load_base

    base, tokenizer = load_base(model)
    drlora = load_into(base, adapter_path) if adapter_path is not None else None
    base.eval()
    return base, tokenizer, drlora
