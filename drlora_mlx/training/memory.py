"""The peak memory of a training run, estimated before it starts.

Apple GPUs share memory with everything else and MLX gives no warning before it
runs out; a run that cannot fit should say so at the start, with the flags
that make it fit. The estimate is made from shapes only (``ModelShape``), so
one code path serves a live model before training (``estimate_peak_bytes``)
and ``drlora-mlx plan --model``, which builds the mlx-lm model from its
config.json without weights (``model_from_config``): MLX arrays are lazy and
nothing here evaluates them, so planning a 30B model allocates nothing.

Parts of the peak (bytes):
- base weights at their quantization and in the dtype they are stored in (the
  safetensors headers; config.json's dtype when there are none), as mlx-lm holds them;
- expert LoRA state, 16 bytes per trainable value (float32 value, gradient,
  two AdamW moments) and 4 per table entry. Masked layout: every module holds
  A (E, r_max, in), B (E, out, r_max), a rank mask and an importance EMA
  (E, r_max). Pooled layout: per MoE layer one pool of S + 1 rank slots,
  S = N_mod x r_target, each slot an A row and a B column (in + out = H + I
  values; slot S is an always-zero null slot), a slot table (E, r_max) int32
  per module and an importance EMA per slot; while a layer runs, its factors
  gathered at width r_max and their gradient (float32);
- the router's full weights when they train (value, gradient, two moments);
- activations kept for the backward pass and what the loss holds
  (``activation_bytes``): per token and layer, counts of values fitted to
  measured peaks of real training steps (``LAYER_VALUES``), and every token's
  logits (the plain loss) or a few chunks' (the chunked loss).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from ..config.settings import DRLoRAConfig, Ranks
from ..formats.base_model import ModelError
from ..lora.masked import ExpertLoRA
from ..lora.pooled import RankPool
from .loss import chunk_tokens, in_chunks

# A run "fits" when its estimate stays under this share of what the machine can
# give: the rest is the system, other processes and MLX's buffer cache.
FIT_SHARE = 0.9
LAYOUTS = ("pooled", "masked")
STATE_BYTES = 16  # a trainable float32 value: itself, its gradient, two AdamW moments
TABLE_BYTES = 4  # a float32 or int32 entry that does not train (mask, slot table, EMA)
GATHERED_BYTES = 2 * 4  # a gathered float32 factor value and its gradient
# safetensors names of the floating dtypes MLX holds.
SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# What a training step holds besides the weights and the LoRA state, from measured peaks of real steps
# (BENCHMARKS.md, "Where the memory estimate's counts come from"; ``scripts/memory_check.py`` measures
# them again, ``tests/test_memory.py`` checks the estimate against measured peaks). Values per token in
# the activations' dtype, per decoder layer, by what they scale with: the attention's query width
# (heads x head size), the routed experts' inputs (top-k x H) and intermediates (top-k x I), the
# attention scores (heads x T).
LAYER_VALUES = {"query": 4.0, "expert_inputs": 3.73, "expert_intermediates": 5.43, "attention_scores": 1.0}
# With gradient checkpointing every layer still keeps this share of its activations (MLX does not free
# all of a recomputed layer's forward), and this many layers' worth is alive while layers are recomputed
# and differentiated (measured on 4-32 layer models).
CHECKPOINTED_SHARE = 0.10
RECOMPUTED_LAYERS = 2.8
PLAIN_LOGITS = 4.0  # per token, x vocabulary: the logits, their softmax and gradients (measured: 4.0)
# Chunk-sized (chunk x vocabulary) float32 arrays the chunked loss holds: 12 measured for the loss
# alone, 3 to 12 inside a training step (where it overlaps less with the rest); the larger is counted.
CHUNKED_LOGITS = 12.0
# config.json keys for the experts each token is routed to, by family.
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "top_k_experts", "moe_topk", "num_experts_per_token", "moe_top_k")


def available_bytes() -> int:
    """What the machine can give: Metal's recommended working set, else the total RAM."""
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rank_flag(config: DRLoRAConfig, layout: str) -> str:
    """The flag whose rank sets the size of the expert LoRA state."""
    if config.method == "lora":
        return "--lora-rank"
    return "--r-target" if layout == "pooled" else "--r-max"


# ----- shapes -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes a run's memory depends on, read from a model's parameter shapes."""

    family: str
    layers: int  # decoder layers
    targets: tuple[tuple[tuple[int, int, int], ...], ...]  # per MoE layer, per target: (experts, in, out)
    hidden: int  # H: the experts' input
    expert_dim: int  # I: an expert's intermediate size
    top_k: int
    heads: int
    query_width: int  # attention heads x head size
    vocab: int
    base_weight_bytes: int
    dtype: mx.Dtype  # of the activations: the embedding's output

    @property
    def moe_layers(self) -> int:
        return len(self.targets)

    @property
    def experts(self) -> int:
        return self.targets[0][0][0]


def _bytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def _base_weight_bytes(model: nn.Module) -> int:
    """Every parameter, less the LoRA arrays of adapter layers wrapped around a
    base layer and the pooled layout's rank pools."""
    total = _bytes(model.parameters())
    for _, module in model.named_modules():
        if isinstance(module, RankPool):
            total -= _bytes(module.parameters())
        elif isinstance(module, ExpertLoRA) or "lora_a" in module and isinstance(module.get("linear"), nn.Module):
            total -= _bytes(module.parameters()) - _bytes(module.linear.parameters())
    return total


def _settings(config: dict) -> dict:
    """config.json keys, those of a wrapped language model's ``text_config`` first."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _top_k(settings: dict) -> int:
    """Experts per token; a per-layer list counts its largest, a config that names none one."""
    value = next((settings[k] for k in TOP_K_KEYS if settings.get(k)), 1)
    return max(value) if isinstance(value, list) else int(value)


def _query_width(settings: dict, hidden: int) -> int:
    """Attention heads x head size (the head size: config.json's, else hidden / heads)."""
    heads = settings.get("num_attention_heads") or 0
    return heads * (settings.get("head_dim") or hidden // max(1, heads))


def model_shape(model: nn.Module, targets: tuple[str, ...], config: dict) -> ModelShape:
    """The shape of ``model`` (live, or built by ``model_from_config``) for LoRA on
    ``targets``; ``config``: its config.json keys (top-k, attention heads)."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    from ..families import UnsupportedModelError, family_of
    from ..families.mlx_lm_names import projection_name

    layers = []
    hidden = expert_dim = 0
    for layer in model.layers:
        for _, experts in layer.named_modules():
            if not isinstance(experts, (SwitchGLU, SwitchMLP)):
                continue
            missing = [t for t in targets if projection_name(experts, t) not in experts]
            if missing:
                raise UnsupportedModelError(f"{family_of(model)}: target {missing[0]!r} is not one of the experts' "
                                            "projections; use up_proj and down_proj")
            modules = [experts[projection_name(experts, t)] for t in targets]
            layers.append(tuple((m.num_experts, m.input_dims, m.output_dims) for m in modules))
            up = experts[projection_name(experts, "up_proj")]
            hidden, expert_dim = up.input_dims, up.output_dims
    if not layers:
        raise UnsupportedModelError(
            f"{family_of(model)}: no MoE expert layers (SwitchGLU / SwitchMLP) found; drlora-mlx adapts MoE models only"
        )
    embedding = next(m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
    settings = _settings(config)
    return ModelShape(
        family=family_of(model),
        layers=len(model.layers),
        targets=tuple(layers),
        hidden=hidden,
        expert_dim=expert_dim,
        top_k=_top_k(settings),
        heads=settings.get("num_attention_heads", 0),
        query_width=_query_width(settings, hidden),
        vocab=embedding.weight.shape[0],
        base_weight_bytes=_base_weight_bytes(model),
        dtype=embedding.scales.dtype if "scales" in embedding else embedding.weight.dtype,
    )


# ----- the parts of the peak -------------------------------------------------------------


def lora_state_bytes(shape: ModelShape, ranks: Ranks, layout: str) -> int:
    """Expert LoRA state that lives through the run (see the module docstring)."""
    total = 0
    for modules in shape.targets:
        if layout == "masked":
            total += sum(e * ranks.r_max * ((i + o) * STATE_BYTES + 2 * TABLE_BYTES) for e, i, o in modules)
        else:
            slots = sum(e for e, _, _ in modules) * ranks.r_target + 1
            _, i, o = modules[0]  # every target of a block has in + out = H + I
            total += slots * ((i + o) * STATE_BYTES + TABLE_BYTES)
            total += sum(e * ranks.r_max * TABLE_BYTES for e, _, _ in modules)
    return total


def uniform_lora_state_bytes(shape: ModelShape, rank: int) -> int:
    """mlx-lm's LoRA at ``rank`` on the same expert projections: A and B per expert, nothing else."""
    return sum(e * rank * (i + o) * STATE_BYTES for modules in shape.targets for e, i, o in modules)


def gathered_bytes(shape: ModelShape, ranks: Ranks, layout: str) -> int:
    """The pooled layout's dense factors of one layer at width r_max, and their gradient."""
    if layout == "masked":
        return 0
    return max(sum(e * ranks.r_max * (i + o) * GATHERED_BYTES for e, i, o in modules) for modules in shape.targets)


def router_state_bytes(shape: ModelShape, config: DRLoRAConfig) -> int:
    """The routers' full (experts x hidden) weights in float32, when they train."""
    if config.train_router == "never":
        return 0
    return sum(modules[0][0] for modules in shape.targets) * shape.hidden * STATE_BYTES


def layer_values(shape: ModelShape, seq_len: int) -> float:
    """Values per token that one decoder layer keeps for its backward pass (``LAYER_VALUES``)."""
    c = LAYER_VALUES
    return (c["query"] * shape.query_width + c["expert_inputs"] * shape.top_k * shape.hidden
            + c["expert_intermediates"] * shape.top_k * shape.expert_dim
            + c["attention_scores"] * shape.heads * seq_len)


def logits_bytes(shape: ModelShape, tokens: int, chunk_tokens: int) -> int:
    """What the loss holds: every token's logits and their gradient (the plain loss, mlx-lm's), or a
    constant number of chunks' worth (the chunked loss, float32) when the batch has more than
    ``CHUNKS_THAT_PAY`` chunks."""
    if in_chunks(tokens, chunk_tokens):
        return int(CHUNKED_LOGITS * chunk_tokens * shape.vocab * 4)
    return int(PLAIN_LOGITS * tokens * shape.vocab * shape.dtype.size)


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, grad_checkpoint: bool,
                     chunk_tokens: int = 0) -> int:
    """Activations kept for the backward pass and what the loss holds (``chunk_tokens`` 0: the plain
    loss). Without gradient checkpointing every layer keeps its activations; with it, a share of
    them (``CHECKPOINTED_SHARE``) and a few layers' worth while they are recomputed."""
    tokens = batch_size * seq_len
    layers = shape.layers
    if grad_checkpoint:
        layers = min(layers, CHECKPOINTED_SHARE * shape.layers + RECOMPUTED_LAYERS)
    values = layers * layer_values(shape, seq_len)
    return int(tokens * values * shape.dtype.size) + logits_bytes(shape, tokens, chunk_tokens)


class PeakEstimate(int):
    """A peak-memory estimate in bytes (an int) that keeps its parts, so that a
    warning can say which part does not fit and which flag shrinks it."""

    def __new__(cls, parts: dict[str, int], lora_parts: tuple[str, ...], rank_flag: str):
        estimate = super().__new__(cls, sum(parts.values()))
        estimate.parts = parts
        estimate.lora_bytes = sum(parts[p] for p in lora_parts)
        estimate.rank_flag = rank_flag
        return estimate


def peak_estimate(shape: ModelShape, config: DRLoRAConfig, layout: str, batch_size: int, seq_len: int,
                  grad_checkpoint: bool, ranks: Ranks | None = None, fixed_rank_lora: int = 0,
                  chunk_tokens: int = 0) -> PeakEstimate:
    """The peak of a run of ``config`` on a model of ``shape`` in ``layout``, at
    ``ranks`` (default: the config's); ``fixed_rank_lora``: trainable values of
    the LoRA outside the growth pool (shared experts, attention); ``chunk_tokens``:
    of the chunked loss (0: the plain loss)."""
    ranks = ranks or config.ranks
    parts = {
        "base weights": shape.base_weight_bytes,
        "expert LoRA state": lora_state_bytes(shape, ranks, layout),
        "fixed-rank LoRA state": fixed_rank_lora * STATE_BYTES,
        "gathered LoRA factors": gathered_bytes(shape, ranks, layout),
        "router": router_state_bytes(shape, config),
        "activations": activation_bytes(shape, batch_size, seq_len, grad_checkpoint, chunk_tokens),
    }
    lora = ("expert LoRA state", "fixed-rank LoRA state", "gathered LoRA factors")
    return PeakEstimate(parts, lora, rank_flag(config, layout))


def estimate_peak_bytes(model, drlora, batch_size: int, seq_len: int, grad_checkpoint: bool,
                        loss_chunk_size: int | None = None) -> PeakEstimate:
    """The peak of training ``model`` with ``drlora`` attached (in its layout) at
    ``batch_size`` x ``seq_len`` tokens, with the loss ``loss_chunk_size`` makes."""
    args = getattr(model, "args", None)
    shape = model_shape(model, drlora.targets, vars(args) if args is not None else {})
    fixed = sum(lora.lora_a.size + lora.lora_b.size for _, lora in drlora.extra_loras)
    chunk = chunk_tokens(shape.vocab, loss_chunk_size) if drlora.head is not None else 0
    return peak_estimate(shape, drlora.config, drlora.config.resolved_lora_layout, batch_size, seq_len, grad_checkpoint,
                         fixed_rank_lora=fixed, chunk_tokens=chunk)


def mlx_lm_peak_bytes(shape: ModelShape, rank: int, batch_size: int, seq_len: int, grad_checkpoint: bool) -> int:
    """The peak of mlx-lm's own LoRA trainer at ``rank`` on the same expert projections: its LoRA
    state, every token's logits (its loss), the same activations."""
    return (shape.base_weight_bytes + uniform_lora_state_bytes(shape, rank)
            + activation_bytes(shape, batch_size, seq_len, grad_checkpoint))


def memory_warning(estimate: int, available: int) -> str | None:
    """A one-line warning when the estimate passes ``FIT_SHARE`` of what is
    available; when only the LoRA state does not fit, it names the rank flag."""
    if estimate <= FIT_SHARE * available:
        return None
    text = (f"warning: this run may need about {estimate / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB this "
            "machine can give; ")
    if isinstance(estimate, PeakEstimate) and estimate - estimate.lora_bytes <= FIT_SHARE * available:
        text += (f"its LoRA state ({estimate.lora_bytes / 1e9:.1f} GB) is what does not fit: lower "
                 f"{estimate.rank_flag}, or ")
    return text + "lower --batch-size or --max-seq-length, add --grad-checkpoint, or use a quantized model"


def largest_rank(peak_at, budget: int, cap: int) -> int:
    """The largest rank r <= ``cap`` with ``peak_at(r) <= budget`` (0: none), for a
    peak that grows linearly with the rank."""
    step = peak_at(1) - peak_at(0)
    return max(0, min(cap, math.floor((budget - peak_at(0)) / step)))


# ----- a model from its config.json alone ---------------------------------------------------


def config_file(model: str) -> Path:
    """The config.json of a local model folder or of a Hugging Face id (only that file is fetched)."""
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.exists():
            raise ModelError(f"{path} has no config.json: give a model folder in the Hugging Face / mlx-lm layout")
        return file
    if path.exists():
        raise ModelError(f"{path} is a file: give the model folder that holds its config.json")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelError(f"model {model!r} does not exist: give a local model folder or a Hugging Face id (org/name)")
    return _hub_config(model)


def read_model_config(model: str) -> dict:
    """config.json of a local model folder or of a Hugging Face id, as a dict."""
    return _read_config(config_file(model))


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file} is not a JSON object")
    return config


def _hub_config(model: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(model, "config.json"))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"the config.json of {model!r} is not in the local Hugging Face cache and "
                             "HF_HUB_OFFLINE is set; download it first or unset HF_HUB_OFFLINE") from None
        raise ModelError(f"the config.json of {model!r} could not be fetched from the Hugging Face Hub; check the "
                         "connection, or give a local model folder") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelError(f"model {model!r} is neither a local folder nor a Hugging Face repository") from None
    except EntryNotFoundError:
        raise ModelError(f"the Hugging Face repository {model!r} has no config.json") from None


def config_dtype(config: dict) -> str | None:
    """The dtype config.json gives the weights (None: it names none)."""
    settings = _settings(config)
    dtype = settings.get("torch_dtype") or settings.get("dtype")
    return str(dtype) if dtype else None


def _header_bytes(file: Path) -> dict[str, int]:
    """Bytes per safetensors dtype name ("F32", "BF16", ...) in one file, read from its header only."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    counts: dict[str, int] = {}
    for name, tensor in header.items():
        if name != "__metadata__":
            start, end = tensor["data_offsets"]
            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + end - start
    return counts


def _hub_header_bytes(model: str) -> dict[str, int]:
    """Bytes per floating dtype of a Hub model's safetensors, from their headers (two small requests);
    {} offline."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return {}
    try:
        counts = HfApi().get_safetensors_metadata(model).parameter_count
    except Exception:  # not a safetensors repository, or the Hub cannot be reached: the config decides
        return {}
    return {d: n * getattr(mx, SAFETENSORS_FLOATS[d]).size for d, n in counts.items() if d in SAFETENSORS_FLOATS}


def disk_dtype(model: str, folder: Path | None) -> str | None:
    """The floating dtype that most of a checkpoint's floating-point bytes are stored in, read from
    the safetensors headers of ``folder`` (a local model, or the Hub cache's snapshot of one), else
    of the Hub repository ``model``; mlx-lm holds the weights in the dtype they are stored in,
    whatever config.json says. None: no headers could be read."""
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    counts: dict[str, int] = {}
    for file in files:
        for dtype, n in _header_bytes(file).items():
            counts[dtype] = counts.get(dtype, 0) + n
    if not files and not Path(model).expanduser().exists():
        counts = _hub_header_bytes(model)
    floating = {SAFETENSORS_FLOATS[d]: n for d, n in counts.items() if d in SAFETENSORS_FLOATS}
    return max(floating, key=floating.get) if floating else None


def _quantization(config: dict) -> tuple[dict | None, bool]:
    """(quantization parameters or None, whether only the routed experts are quantized),
    as mlx-lm reads config.json: its own ``quantization``, else the checkpoint's
    ``quantization_config``."""
    if config.get("quantization"):
        return config["quantization"], False
    hf = config.get("quantization_config") or _settings(config).get("quantization_config")
    if not hf:
        return None, False
    method = hf.get("quant_method")
    if method == "mxfp4":  # gpt-oss checkpoints: only the experts are MXFP4
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}, True
    if method == "fp8" and not (hf.get("scale_fmt") == "ue8m0" and list(hf.get("weight_block_size", ())) == [32, 32]):
        return None, False  # mlx-lm dequantizes these when it loads them
    raise ModelError(f"config.json: weights quantized with {method!r}; plan counts mlx-lm's own quantization "
                     "(mlx_lm.convert -q), MXFP4 and float weights; give the model's float or mlx-lm version")


def model_from_config(config: dict, dtype: str | None = None) -> nn.Module:
    """The mlx-lm model ``config`` describes, in the quantization its weights
    would load with and in ``dtype`` (default: the config's, else bfloat16),
    but without weights: nothing is evaluated."""
    from mlx_lm.models.switch_layers import SwitchLinear

    from ..families import lookup
    from ..families.mlx_lm_names import model_classes

    if "model_type" not in config:
        raise ModelError("config.json has no model_type: give the config.json of a Hugging Face / mlx-lm model")
    try:
        model_class, args_class = model_classes(config)
        model = model_class(args_class.from_dict(config))
    except Exception as e:  # an unknown model type or a config its model file cannot read: say so in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"mlx-lm cannot build a {config['model_type']!r} model from this config.json: {first}") from None
    lookup(model)
    dtype = getattr(mx, dtype or config_dtype(config) or "bfloat16", None)
    if isinstance(dtype, mx.Dtype) and mx.issubdtype(dtype, mx.floating):
        keep = getattr(model, "cast_predicate", lambda _: True)  # parameters the model keeps in float32
        model.update(tree_map_with_path(
            lambda k, v: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters()))
    quantization, experts_only = _quantization(config)
    if quantization is not None:
        group_size = quantization.get("group_size", 64)
        own = getattr(model, "quant_predicate", None)

        def quantized(path, module):
            # mlx_lm.convert's choice: layers it could quantize, less those the model's own predicate keeps
            # in float; per-layer settings written in the config win
            if path in quantization:
                return quantization[path]
            if experts_only and not isinstance(module, SwitchLinear):
                return False
            if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
                return False
            return own is None or own(path, module) is not False

        nn.quantize(model, group_size=group_size, bits=quantization.get("bits", 4),
                    mode=quantization.get("mode", "affine"), class_predicate=quantized)
    return model


def memory_plan(model: str, config: DRLoRAConfig, batch_size: int, seq_len: int, grad_checkpoint: bool,
                loss_chunk_size: int | None = None) -> dict:
    """The memory a run of ``config`` on ``model`` (a folder or a Hugging Face id,
    of which only config.json and the safetensors headers are read) needs, in both
    layouts, against what this machine can give; for ``drlora-mlx plan --model``."""
    file = config_file(model)
    settings = _read_config(file)
    on_disk = disk_dtype(model, file.parent)
    dtype = on_disk or config_dtype(settings)
    shape = model_shape(model_from_config(settings, dtype), config.targets, settings)
    quantization = _quantization(settings)[0] or {}
    layout = config.resolved_lora_layout
    available = available_bytes()
    budget = int(FIT_SHARE * available)
    chunk = chunk_tokens(shape.vocab, loss_chunk_size)

    def peak(layout: str, ranks: Ranks | None = None, chunk: int = chunk) -> PeakEstimate:
        return peak_estimate(shape, config, layout, batch_size, seq_len, grad_checkpoint, ranks, chunk_tokens=chunk)

    estimates = {l: peak(l) for l in LAYOUTS}
    r_init, r_target, r_max = config.ranks
    used = estimates[layout]
    return {
        "family": shape.family,
        "moe_layers": shape.moe_layers,
        "experts": shape.experts,
        "hidden": shape.hidden,
        "expert_dim": shape.expert_dim,
        "top_k": shape.top_k,
        "dtype": dtype or "bfloat16",
        "dtype_from": "safetensors headers" if on_disk else "config.json" if dtype else "assumed: no dtype given",
        "quantization": {k: v for k, v in quantization.items() if k in ("group_size", "bits", "mode")} or None,
        "batch_size": batch_size,
        "max_seq_length": seq_len,
        "grad_checkpoint": grad_checkpoint,
        "lora_layout": layout,
        "loss_chunk_tokens": chunk if in_chunks(batch_size * seq_len, chunk) else 0,
        "peak_bytes": int(used),
        "base_weight_bytes": shape.base_weight_bytes,
        "lora_state_bytes": used.parts["expert LoRA state"],
        "gathered_factor_bytes": used.parts["gathered LoRA factors"],
        "router_state_bytes": used.parts["router"],
        "activation_bytes": used.parts["activations"],
        "logits_bytes": logits_bytes(shape, batch_size * seq_len, chunk),
        "plain_loss_peak_bytes": int(peak(layout, chunk=0)),
        "uniform_lora_state_bytes": uniform_lora_state_bytes(shape, r_target),
        "mlx_lm_peak_bytes": mlx_lm_peak_bytes(shape, r_target, batch_size, seq_len, grad_checkpoint),
        "layouts": {l: {"peak_bytes": int(e), "lora_state_bytes": e.parts["expert LoRA state"],
                        "gathered_factor_bytes": e.parts["gathered LoRA factors"]} for l, e in estimates.items()},
        "available_bytes": available,
        "fits": used <= budget,
        "largest_r_max": largest_rank(lambda r: peak("masked", Ranks(r_init, r_target, r)), budget,
                                      min(shape.hidden, shape.expert_dim)),
        "largest_r_target": largest_rank(lambda r: peak("pooled", Ranks(r_init, r, r_max)), budget, r_max),
        "warning": memory_warning(used, available),
    }
