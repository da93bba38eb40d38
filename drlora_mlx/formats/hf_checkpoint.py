"""Writing mlx-lm models as Hugging Face checkpoints that transformers and mlx-lm both read.

mlx-lm reads Hugging Face checkpoints through each model's ``sanitize``; this
module writes the inverse: per-expert weights (``experts.{e}.up_proj``,
Mixtral's ``w1/w2/w3``), Granite's ``input_linear`` / ``output_linear``,
gpt-oss's fused experts, DeepSeek-V3's ``kv_b_proj`` (which mlx-lm splits into
``embed_q`` / ``unembed_out``). Float weights only, with one exception:
gpt-oss experts in MXFP4, stored as the ``_blocks`` / ``_scales`` pairs of the
original checkpoints, the only gpt-oss expert format both libraries read
(mlx-lm reads float gpt-oss experts only in its own layout).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from ..errors import InputError
from ..families import FAMILIES, hf_family
from ..families.mlx_lm_names import PROJECTION_OF
from ..families.spec import HFFamily

_EXPERT_KEY = re.compile(
    r"^(?P<block>.+)\.(?:switch_mlp|experts)\.(?P<proj>gate_proj|up_proj|down_proj|fc1|fc2)"
    r"\.(?P<kind>weight|bias|scales|biases)$"
)
# What transformers keeps in float when it loads a gpt-oss MXFP4 checkpoint (as the released models say).
_GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


class HFLayoutError(InputError):
    """A model that cannot be written as a Hugging Face checkpoint; the message says why."""


def _quantized(weights: dict[str, mx.array]) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}


def _mxfp4_experts(family: str, weights: dict[str, mx.array], config: dict) -> bool:
    """gpt-oss with exactly its routed experts in MXFP4, as the released checkpoints."""
    quantized = _quantized(weights)
    experts = {k.rsplit(".", 1)[0] for k in weights if _EXPERT_KEY.match(k)}
    mode = (config.get("quantization") or {}).get("mode")
    return family == "gpt_oss" and bool(quantized) and quantized == experts and mode == "mxfp4"


def readable_by_both(family: str, weights: dict[str, mx.array], config: dict) -> bool:
    """Whether mlx-lm and transformers both read the Hugging Face checkpoint of these weights:
    a family drlora-mlx can write in the Hugging Face layout, float weights (gpt-oss: MXFP4
    experts, as mlx-lm reads no float gpt-oss experts in this layout)."""
    entry = FAMILIES.get(family)
    if entry is None or entry.hf is None or entry.export_refusal:
        return False
    if family == "gpt_oss":
        return _mxfp4_experts(family, weights, config)
    return not _quantized(weights)


def _interleave(a: mx.array, b: mx.array, axis: int) -> mx.array:
    """Rows of a and b alternating along ``axis`` (a first): gpt-oss's gate/up order."""
    shape = list(a.shape)
    shape[axis] *= 2
    return mx.stack([a, b], axis=axis + 1).reshape(shape)


def _per_expert(block: str, projs: dict, hf: HFFamily) -> dict:
    out = {}
    for proj, arrays in projs.items():
        name = hf.expert_name(proj)
        for kind, v in arrays.items():
            for e in range(v.shape[0]):
                out[f"{block}.experts.{e}.{name}.{kind}"] = v[e]
    return out


def _fused(block: str, projs: dict, hf: HFFamily) -> dict:
    """transformers 5's own layout: experts.gate_up_proj (E, 2I, H), gate rows first, and experts.down_proj."""
    out = {f"{block}.experts.down_proj": projs["down_proj"]["weight"]}
    if "gate_proj" in projs:
        out[f"{block}.experts.gate_up_proj"] = mx.concatenate([projs["gate_proj"]["weight"], projs["up_proj"]["weight"]],
                                                              axis=1)
    else:
        out[f"{block}.experts.up_proj"] = projs["up_proj"]["weight"]
    return out


def _fused_transposed(block: str, projs: dict, hf: HFFamily) -> dict:
    """The original Qwen3-VL / Llama 4 checkpoints: experts.gate_up_proj (E, H, 2I) and down_proj (E, I, H)."""
    return {k: v.swapaxes(1, 2) for k, v in _fused(block, projs, hf).items()}


def _granite(block: str, projs: dict, hf: HFFamily) -> dict:
    gate_up = mx.concatenate([projs["gate_proj"]["weight"], projs["up_proj"]["weight"]], axis=1)
    return {f"{block}.input_linear.weight": gate_up, f"{block}.output_linear.weight": projs["down_proj"]["weight"]}


def _gpt_oss(block: str, projs: dict, hf: HFFamily) -> dict:
    gate, up, down = projs["gate_proj"], projs["up_proj"], projs["down_proj"]
    prefix = f"{block}.experts"
    out = {
        f"{prefix}.gate_up_proj_bias": _interleave(gate["bias"], up["bias"], 1),
        f"{prefix}.down_proj_bias": down["bias"],
    }
    if "scales" in gate:  # MXFP4: 16 bytes of 32 four-bit values per block, as the released checkpoints
        def blocks(w):
            return w.view(mx.uint8).reshape(*w.shape[:2], -1, 16)

        out[f"{prefix}.gate_up_proj_blocks"] = blocks(_interleave(gate["weight"], up["weight"], 1))
        out[f"{prefix}.gate_up_proj_scales"] = _interleave(gate["scales"], up["scales"], 1)
        out[f"{prefix}.down_proj_blocks"] = blocks(down["weight"])
        out[f"{prefix}.down_proj_scales"] = down["scales"]
    else:  # transformers' float layout: (E, in, out)
        out[f"{prefix}.gate_up_proj"] = _interleave(gate["weight"], up["weight"], 1).swapaxes(1, 2)
        out[f"{prefix}.down_proj"] = down["weight"].swapaxes(1, 2)
    return out


_STORAGE = {"per-expert": _per_expert, "fused": _fused, "fused-transposed": _fused_transposed, "granite": _granite,
            "gpt_oss": _gpt_oss}


def _kv_b_proj(embed_q: mx.array, unembed_out: mx.array) -> mx.array:
    """DeepSeek's kv_b_proj (heads * (nope + v), kv_lora_rank) from mlx-lm's per-head halves."""
    per_head = mx.concatenate([embed_q.swapaxes(-1, -2), unembed_out], axis=1)
    return per_head.reshape(-1, per_head.shape[-1])


def hf_weights(family: str, weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """The Hugging Face checkpoint tensors of an mlx-lm model's parameters."""
    hf = hf_family(family)
    if _quantized(weights) and not _mxfp4_experts(family, weights, config):
        raise HFLayoutError(
            f"{family}: quantized weights cannot be written in the Hugging Face layout (transformers does not read "
            "MLX quantization); dequantize first"
        )
    out, experts = {}, {}
    for key, value in weights.items():
        if key.endswith(".embed_q.weight"):
            key, value = key.replace("embed_q", "kv_b_proj"), _kv_b_proj(value, weights[key.replace("embed_q", "unembed_out")])
        elif key.endswith(".unembed_out.weight"):
            continue
        elif value.ndim == 3 and any(key.endswith(s) for s in hf.channels_first):
            value = value.moveaxis(2, 1)
        elif value.ndim == 1 and any(key.endswith(s) for s in hf.zero_centred):
            value = value - 1.0
        key = hf.checkpoint_path(key)
        m = _EXPERT_KEY.match(key)
        if m:
            proj = PROJECTION_OF[m["proj"]]
            experts.setdefault(m["block"], {}).setdefault(proj, {})[m["kind"]] = value
        else:
            out[key] = value
    for block, projs in experts.items():
        out.update(_STORAGE[hf.storage](block, projs, hf))
    return out


def hf_config(family: str, config: dict, weights: dict[str, mx.array]) -> dict:
    """config.json for the checkpoint: mlx-lm's settings plus what transformers needs."""
    mxfp4 = _mxfp4_experts(family, weights, config)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    for key, value in hf_family(family).config.items():
        config.setdefault(key, value)
    if mxfp4:
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": _GPT_OSS_NOT_CONVERTED}
    return config


def save_weights(path: Path, weights: dict[str, mx.array], fmt: str) -> None:
    """model.safetensors, or shards with an index, as mlx-lm and transformers both find them."""
    from mlx_lm.utils import make_shards

    shards = make_shards(dict(sorted(weights.items())))
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        file = name.format(i + 1, len(shards))
        mx.save_safetensors(str(path / file), shard, metadata={"format": fmt})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_tokenizer(source: Path, path: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            (path / name).write_bytes((source / name).read_bytes())


def save_hf_checkpoint(path: str | Path, family: str, weights: dict[str, mx.array], config: dict) -> Path:
    """Write config.json and the weights of an mlx-lm model in the Hugging Face layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path, hf_weights(family, weights, config), "pt")
    (path / "config.json").write_text(json.dumps(hf_config(family, config, weights), indent=2, sort_keys=True))
    return path
