"""Shared pieces of the model-level tests."""

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_lm_load

from drlora_mlx.lora.attach import attach
from drlora_mlx.config.settings import DRLoRAConfig
from drlora_mlx.formats.tiny import TinyShape

# Three decoder layers, so DeepSeek-style models (first layer dense) keep two MoE layers.
SHAPE = TinyShape(layers=3)


def padded_batch(vocab: int, seed: int = 0, rows: int = 3, width: int = 17, prompt: bool = True):
    """Token rows of different lengths padded with zeros, and their (offset, length)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(width // 2, width + 1, size=rows)
    lengths[0] = width
    tokens = np.zeros((rows, width), np.int32)
    offsets = []
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, vocab, size=n)
        offsets.append(int(rng.integers(1, n // 2)) if prompt else 0)
    return mx.array(tokens), mx.array(np.stack([offsets, lengths], axis=1).astype(np.int32))


def loss_token_mask(lengths, width: int) -> np.ndarray:
    """The loss-token mask over input positions, recomputed in numpy: position
    p (predicting token p + 1) counts when token p + 1 is a real token after the prompt."""
    lengths = np.asarray(lengths)
    predicted = np.arange(1, width)[None, :]
    return (predicted >= lengths[:, :1]) & (predicted < lengths[:, 1:])


def attached(tiny_models, family: str, shape=SHAPE, quantize_bits=None, seed: int = 0, **config):
    """(model, tokenizer, drlora) for a freshly loaded tiny checkpoint."""
    model, tokenizer = mlx_lm_load(str(tiny_models(family, shape=shape, quantize_bits=quantize_bits)))
    drlora = attach(model, DRLoRAConfig(**config), seed=seed)
    return model, tokenizer, drlora


def randomize_b(drlora, seed: int = 0, std: float = 0.05):
    """Give every active rank a non-zero B (as after some training), in either layout."""
    key = mx.random.key(seed)
    for i, (_, m) in enumerate(drlora.expert_modules()):
        a, b = m.masked_factors()
        b = mx.random.normal(b.shape, key=mx.random.split(key, 1000)[i]) * std
        m.load_factors(a, b * m.active_mask()[:, None, :], m.ranks())
    mx.eval(drlora.model.parameters())


def budget_ranks(drlora, seed: int = 0) -> np.ndarray:
    """Random ranks in [r_init, r_max] whose per-layer mean is at most r_target:
    any rank pattern a per-layer run can reach, in either layout."""
    rng = np.random.default_rng(seed)
    r_init, r_target, r_max = drlora.config.ranks
    ranks = rng.integers(r_init, r_max + 1, size=(drlora.n_layers, drlora.n_modules))
    for row in ranks:
        while row.sum() > r_target * row.size:
            row[rng.choice(np.flatnonzero(row > r_init))] -= 1
    return ranks


def heterogeneous_ranks(drlora, seed: int = 0) -> np.ndarray:
    ranks = budget_ranks(drlora, seed)
    drlora.set_ranks(ranks)
    return ranks
