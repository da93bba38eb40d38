"""Merge a DR-LoRA adapter (and a trained router) into its base model and save it.

Every adapted layer becomes a plain layer with the update in its weight. A
quantized base keeps the merged layers in float by default, so the update is
never rounded away (mlx-lm issues #1172 and #1564); ``dequantize`` makes the
whole model float; ``requantize`` quantizes the merged layers again with the
base's settings and measures, on a few inputs, how much that changes the
logits compared to what the adapter itself changed.

The result is written in the Hugging Face layout when mlx-lm and transformers
can both read it (float weights; gpt-oss with MXFP4 experts), and in mlx-lm's
own layout otherwise (transformers does not read MLX quantization).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import InputError
from ..families import FAMILIES, family_of
from ..lora.routing import unobserve
from ..lora.tree import module_at, replace_module
from .adapters import load_into, read_adapter_config
from .hf_checkpoint import (
    copy_tokenizer,
    readable_by_both,
    save_hf_checkpoint,
    save_weights,
)

PROBE_TEXTS = 4
PROBE_TOKENS = 64


class FuseError(InputError):
    """A fuse request that cannot be carried out; the message says why."""


@dataclass
class FuseReport:
    """What a fuse wrote."""

    save_path: Path
    readers: str  # who reads the checkpoint
    merged_layers: int
    float_bytes: int  # merged layers kept in float
    quantized_bytes: int  # what those layers took quantized in the base (0 for a float base)
    total_bytes: int
    dequantized: bool = False
    requantization: dict | None = None  # logit changes measured on the probe inputs

    def summary(self) -> str:
        mb = 1 / 2**20
        lines = [f"fused the adapter into {self.merged_layers} layers and saved the model to {self.save_path}/ "
                 f"({self.total_bytes * mb:,.1f} MB; read by {self.readers})"]
        if self.dequantized:
            lines.append("  the whole model is in float (--dequantize)")
        elif self.quantized_bytes and not self.requantization:
            lines.append(f"  merged layers kept in float: {self.float_bytes * mb:,.1f} MB (quantized in the base: "
                         f"{self.quantized_bytes * mb:,.1f} MB); --requantize to quantize them again")
        if self.requantization:
            r = self.requantization
            lines.append(
                f"  re-quantizing the merged layers changes the logits by {r['mean_abs']:.4f} on average "
                f"(max {r['max_abs']:.4f}) on {r['tokens']} probe tokens, {r['relative']:.1%} of the "
                f"adapter's own effect ({r['adapter_mean_abs']:.4f}); top-1 tokens agree {r['top1_agreement']:.1%}"
            )
        return "\n".join(lines)


def _float_dtype(model: nn.Module) -> mx.Dtype:
    """The model's float dtype: the most common one among its float parameters."""
    counts = {}
    for _, p in tree_flatten(model.parameters()):
        if p.dtype in (mx.float32, mx.float16, mx.bfloat16):
            counts[p.dtype] = counts.get(p.dtype, 0) + p.size
    return max(counts, key=counts.get)


def probe_inputs(tokenizer) -> mx.array:
    """A few inputs to measure re-quantization on: the bundled texts, tokenized."""
    from ..data.loading import bundled_texts

    rows = [tokenizer.encode(t)[:PROBE_TOKENS] for t in bundled_texts()[:PROBE_TEXTS]]
    n = min(len(r) for r in rows)
    return mx.array(np.array([r[:n] for r in rows]))


def _nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _merge(drlora, dtype: mx.Dtype) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every adapted layer by its merged float layer; returns (parent, name, base layer)."""
    merged = []
    for layer in drlora.layers:
        for name, module in zip(layer.module_names, layer.modules):
            setattr(layer.experts, name, module.fuse(dtype=dtype))
            merged.append((layer.experts, name, module.linear))
        if layer.pool is not None:  # merged into the weights: the rank slots go
            layer.experts.pop("lora_pool")
        unobserve(layer.experts)
        unobserve(layer.router)
    for path, lora in drlora.extra_loras:
        parent_path, _, name = path.rpartition(".")
        replace_module(drlora.model, path, lora.fuse(dequantize=True))
        merged.append((module_at(drlora.model, parent_path), name, lora.linear))
    return merged


def _requantize(merged) -> None:
    for parent, name, base in merged:
        if "scales" in base:
            setattr(parent, name, parent[name].to_quantized(group_size=base.group_size, bits=base.bits, mode=base.mode))


def _logit_change(new: mx.array, old: mx.array, base: mx.array) -> dict:
    diff = mx.abs(new - old)
    effect = mx.abs(old - base).mean().item()
    return {
        "tokens": int(np.prod(new.shape[:2])),
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "adapter_mean_abs": effect,
        "relative": diff.mean().item() / max(effect, 1e-12),
        "top1_agreement": (new.argmax(-1) == old.argmax(-1)).astype(mx.float32).mean().item(),
    }


def fuse(model: str | None, adapter_path: str, save_path: str, dequantize: bool = False,
         requantize: bool = False) -> FuseReport:
    """Merge the adapter in ``adapter_path`` into ``model`` (default: the model it
    was trained on) and save the result to ``save_path``."""
    from mlx_lm.utils import dequantize_model

    from .base_model import load_base, model_dir

    if dequantize and requantize:
        raise FuseError("--dequantize and --requantize exclude each other")
    meta = read_adapter_config(adapter_path)
    model = model or meta["model"]
    base, tokenizer = load_base(model)
    if family_of(base) != meta["family"]:
        raise FuseError(f"{adapter_path} was trained on a {meta['family']} model; {model} is {family_of(base)}")
    quantized = any("scales" in m for _, m in base.named_modules())
    if requantize and not quantized:
        raise FuseError(f"{model} is not quantized: there is nothing to re-quantize")
    dtype = _float_dtype(base)
    base.eval()
    probe = probe_inputs(tokenizer) if requantize else None
    base_logits = base(probe) if requantize else None
    drlora = load_into(base, adapter_path)
    base.eval()
    adapted_logits = base(probe) if requantize else None
    merged = _merge(drlora, dtype)
    report = FuseReport(Path(save_path), "", len(merged), sum(_nbytes(p[n]) for p, n, _ in merged),
                        sum(_nbytes(b) for _, _, b in merged if "scales" in b), 0)
    if requantize:
        _requantize(merged)
        report.requantization = _logit_change(base(probe), adapted_logits, base_logits)
    if dequantize:
        dequantize_model(base)
        report.dequantized = quantized
    weights = dict(tree_flatten(base.parameters()))
    report.total_bytes = sum(v.nbytes for v in weights.values())
    config = json.loads((model_dir(model) / "config.json").read_text())
    report.readers = _save(Path(save_path), meta["family"], weights, config)
    copy_tokenizer(model_dir(model), Path(save_path))
    return report


def _save(path: Path, family: str, weights: dict[str, mx.array], config: dict) -> str:
    """Write the checkpoint in the layout the most readers read; returns who reads it."""
    path.mkdir(parents=True, exist_ok=True)
    if not any(k.endswith(".scales") for k in weights):
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    q = config.get("quantization_config") or {}
    if "quantization" not in config and q.get("quant_method") == "mxfp4":  # as mlx-lm reads MXFP4 checkpoints
        config = {**config, "quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    if readable_by_both(family, weights, config):
        save_hf_checkpoint(path, family, weights, config)
        return "mlx-lm and transformers"
    quantization = config.get("quantization")
    if quantization:
        # Per-layer settings of layers that are float now (merged, or a trained router) must say so.
        config["quantization"] = {k: False if isinstance(v, dict) and f"{k}.scales" not in weights else v
                                  for k, v in quantization.items()}
        if "quant_method" not in q:
            config["quantization_config"] = config["quantization"]
    save_weights(path, weights, "mlx")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return f"mlx-lm only ({_why_mlx_lm_only(family)})"


def _why_mlx_lm_only(family: str) -> str:
    entry = FAMILIES[family]
    if entry.hf is None:
        return f"drlora-mlx writes {family} in mlx-lm's layout only"
    if entry.export_refusal:
        return f"transformers computes {family} differently: {entry.export_refusal}"
    if family == "gpt_oss":
        return ("mlx-lm reads float gpt-oss experts only in its own layout, transformers only in the Hugging Face "
                "one; MXFP4 experts (--requantize on an MXFP4 base) both read")
    return "transformers does not read MLX quantization; --dequantize writes a float model both read"
