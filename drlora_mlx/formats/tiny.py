"""Tiny MoE checkpoints of every supported family, made deterministically.

``build_tiny(family, path)`` writes a real checkpoint directory (config.json,
model.safetensors in mlx-lm's layout, a byte-level BPE tokenizer with a ChatML
template) that ``mlx_lm.load`` reads like any model from the Hub. With
``weights_format="hf"`` the weights are in the Hugging Face layout instead, which
transformers reads too (gpt-oss with MXFP4 experts, like the released models).
Tests, scripts and the built-in default of ``drlora-mlx train`` use it;
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import InputError
from ..families import FAMILIES
from ..families.mlx_lm_names import model_classes
from ..families.spec import TinyShape
from .hf_checkpoint import save_hf_checkpoint

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BUILD_VERSION = 3  # bump when the recipe changes, so caches rebuild


def family_config(family: str, s: TinyShape) -> dict:
    """config.json of a tiny ``family`` model: the keys every family shares, then the entry's own."""
    entry = FAMILIES.get(family)
    if entry is None or entry.tiny is None:
        tiny = sorted(n for n, f in FAMILIES.items() if f.tiny is not None)
        raise InputError(f"no tiny configuration for family {family!r}; choose from {', '.join(tiny)}")
    common = {
        "model_type": family,
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "num_experts_per_tok": s.top_k,
        "rms_norm_eps": 1e-6,
        "vocab_size": s.vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
    }
    own = entry.tiny(s)
    if "text_config" not in own:
        return {**common, **own}
    # A wrapper around a language model: the shared keys describe the language model.
    text = {**common, **own["text_config"]}
    return {**{k: v for k, v in own.items() if k != "text_config"}, "model_type": family, "text_config": text,
            "eos_token_id": common["eos_token_id"], "pad_token_id": common["pad_token_id"]}


TINY_FAMILIES = tuple(sorted(n for n, f in FAMILIES.items() if f.tiny is not None))


def _init_weights(model: nn.Module, seed: int) -> None:
    """Deterministic weights: N(0, 1/fan_in) for matrices, the constructor's
    values (norm scales, zero biases) for vectors."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for i, (name, p) in enumerate(params):
        if p.ndim >= 2:
            p = mx.random.normal(p.shape, key=keys[i]) * (p.shape[-1] ** -0.5)
        new.append((name, p))
    model.update(tree_unflatten(new))


def build_tokenizer(texts, vocab_size: int, path: Path, chat_template: str = CHATML_TEMPLATE) -> None:
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face
    tokenizer with ``chat_template`` (Jinja, as in ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )
    fast.save_pretrained(str(path))


def _corpus() -> list[str]:
    from ..data.loading import bundled_texts

    return bundled_texts()


def build_tiny(
    family: str,
    path: str | os.PathLike,
    shape: TinyShape = TinyShape(),
    seed: int = 0,
    quantize_bits: int | None = None,
    group_size: int = 32,
    weights_format: str = "mlx",
) -> Path:
    """Write a tiny ``family`` checkpoint to ``path`` and return the path.

    ``quantize_bits`` (4 or 8) quantizes it the way ``mlx_lm.convert -q`` does.
    ``weights_format``: "mlx" (mlx-lm's stacked experts) or "hf" (the Hugging Face
    layout that transformers also reads; float, gpt-oss experts in MXFP4).
    """
    if weights_format not in ("mlx", "hf"):
        raise InputError(f"weights_format must be 'mlx' or 'hf', got {weights_format!r}")
    if weights_format == "hf" and quantize_bits is not None:
        raise InputError("the Hugging Face layout is written in float: transformers does not read MLX quantization")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = family_config(family, shape)
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    _init_weights(model, seed)
    if quantize_bits is not None:
        from mlx_lm.utils import quantize_model

        model, config = quantize_model(model, config, group_size=group_size, bits=quantize_bits)
    if weights_format == "hf":
        if family == "gpt_oss":
            _mxfp4_experts(model, config)
        save_hf_checkpoint(path, family, dict(tree_flatten(model.parameters())), config)
    else:
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
        if "quantization" in config:
            config["quantization_config"] = config["quantization"]
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    build_tokenizer(_corpus(), shape.vocab, path)
    return path


def _mxfp4_experts(model: nn.Module, config: dict) -> None:
    """Quantize the routed experts to MXFP4, as the released gpt-oss checkpoints store them."""
    from mlx_lm.models.switch_layers import SwitchLinear

    settings = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    nn.quantize(model, **settings, class_predicate=lambda _, m: isinstance(m, SwitchLinear))
    config["quantization"] = settings


def cache_dir() -> Path:
    root = os.environ.get("DRLORA_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "drlora-mlx"
    )
    return Path(root)


def tiny_model_path(
    family: str = "qwen3_moe",
    shape: TinyShape = TinyShape(),
    seed: int = 0,
    quantize_bits: int | None = None,
    weights_format: str = "mlx",
) -> Path:
    """The cached tiny checkpoint for these settings, built on first use."""
    settings = {"v": BUILD_VERSION, "family": family, "shape": asdict(shape), "seed": seed, "q": quantize_bits,
                "layout": weights_format}
    key = json.dumps(settings, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir() / f"tiny-{family}-{digest}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so an interrupted build never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        build_tiny(family, tmp, shape, seed, quantize_bits, weights_format=weights_format)
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# The model `drlora-mlx train` trains when no --model is given.
BUILTIN_FAMILY = "qwen3_moe"
BUILTIN_SHAPE = TinyShape(hidden=128, layers=4, experts=16, top_k=4, expert_dim=64, heads=4, kv_heads=2, vocab=512)


def builtin_model_path() -> Path:
    """The built-in tiny MoE checkpoint (built on first use)."""
    return tiny_model_path(BUILTIN_FAMILY, BUILTIN_SHAPE)
