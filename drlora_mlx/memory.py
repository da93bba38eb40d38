"""A peak-memory estimate made before training, to warn instead of running out.

Apple GPUs share memory with everything else and MLX gives no warning before it
runs out; a run that cannot fit should say so at the start, with the flags
that make it fit.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx.utils import tree_flatten


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


def estimate_peak_bytes(model, drlora, batch_size: int, seq_len: int, grad_checkpoint: bool) -> int:
    """Weights, trainable state (parameter, gradient, two AdamW moments) and
    activations kept for the backward pass, roughly: per token and layer the
    residual stream and attention projections (~12 H), the chosen experts'
    intermediate activations (~4 K I), attention scores (heads x T); only one
    layer's worth when gradient checkpointing recomputes the rest."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    state = trainable * 4 * 4
    base = drlora.layers[0].modules[0].linear
    hidden, expert_dim = base.input_dims, base.output_dims
    if drlora.targets[0] == "down_proj":
        hidden, expert_dim = expert_dim, hidden
    args = getattr(model, "args", None)
    top_k = getattr(args, "num_experts_per_tok", 2)
    heads = getattr(args, "num_attention_heads", 8)
    per_token_layer = 4 * (12 * hidden + 4 * top_k * expert_dim + heads * seq_len)
    layers = len(model.layers)
    kept_layers = 1 + (layers if not grad_checkpoint else layers ** 0.5)
    activations = batch_size * seq_len * per_token_layer * kept_layers
    logits = batch_size * seq_len * getattr(args, "vocab_size", 32000) * 4 * 3
    return int(weights + state + activations + logits)


def memory_warning(estimate: int, available: int) -> str | None:
    """A one-line warning when the estimate passes 90% of what is available."""
    if estimate <= 0.9 * available:
        return None
    return (
        f"warning: this run may need about {estimate / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB this "
        "machine can give; lower --batch-size or --max-seq-length, add --grad-checkpoint, or use a quantized model"
    )
