"""What one family entry says: the mlx-lm side, the Hugging Face side, the tiny test model.

mlx-lm side (``Family``): where the router is and how its output becomes the
weight the block applies; shared experts, attention, parameters that stay
frozen. Experts and MoE blocks themselves are found by type (``SwitchGLU`` /
``SwitchMLP``).

Hugging Face side (``HFFamily``): mlx-lm stacks the routed experts of a block
into one ``switch_mlp`` with ``gate_proj`` / ``up_proj`` / ``down_proj`` of
shape (experts, out, in). Hugging Face checkpoints, and transformers 4 in
memory, often keep one module per expert (``experts.{e}.up_proj``; Mixtral
and PhiMoE: ``w1`` gate, ``w3`` up, ``w2`` down), some store them fused.
transformers 5 fuses them in memory into ``experts.gate_up_proj`` (E, 2I, H;
rows [:I] gate) and ``experts.down_proj`` (E, H, I), and renames a few blocks
and routers. gpt-oss is fused in both versions, transposed (E, in, out), with
gate and up interleaved (even / odd outputs).

Tiny side (``TinyShape`` and the entry's ``tiny``): the config.json of a small
model of the family, for the tests and the built-in default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

STANDARD_NAMES = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))
W_NAMES = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
FUSED_IN_TRANSFORMERS_4 = (
    "transformers 4 already keeps these experts as fused parameters, so there is no per-expert module "
    "for PEFT to adapt; use --layout fused"
)
FUSED_ONLY = (
    "this family is exported in the fused layout only, for transformers >= 5 (the per-expert layout is for the "
    "families transformers 4 already had); use --layout fused"
)


@dataclass(frozen=True)
class TinyShape:
    """The sizes of a tiny model; every family maps them onto its own config keys."""

    hidden: int = 64
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    expert_dim: int = 32
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 384

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class HFFamily:
    """The Hugging Face side of one family: checkpoint and transformers 5 names."""

    # mlx-lm projection -> per-expert module name in checkpoints and transformers 4
    expert_names: tuple[tuple[str, str], ...] = STANDARD_NAMES
    # how the checkpoint stores routed experts: "per-expert" (experts.{e}.<name>), "fused"
    # (experts.gate_up_proj (E, 2I, H) and experts.down_proj), "fused-transposed" ((E, H, 2I) and
    # (E, I, H)), "granite" (input_linear / output_linear) or "gpt_oss" (fused, MXFP4 blocks or
    # transposed float)
    storage: str = "per-expert"
    # the experts' attribute in checkpoint paths, where it is not mlx-lm's own
    experts: str = "experts"
    # (old, new) substrings, dot-delimited: mlx-lm / checkpoint paths -> transformers 5 paths
    renames: tuple[tuple[str, str], ...] = ()
    # the renames of LoRA tensor keys in a PEFT file, where not ``renames``: PEFT passes those keys through
    # transformers' own checkpoint conversion, so a rename that conversion makes itself must not be made twice
    adapter_key_renames: Optional[tuple[tuple[str, str], ...]] = None
    # (old, new) substrings: mlx-lm parameter paths -> checkpoint paths (the inverse of mlx-lm's sanitize)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # the fused gate_up_proj output rows: "concat" ([gate; up]) or "interleave" (gpt-oss)
    gate_up: str = "concat"
    # transformers' fused experts have a gate_up_proj (False: up_proj and down_proj only, ReLU^2 experts)
    gated_experts: bool = True
    # checkpoint weights stored zero-centred (w - 1; the model adds 1): their key suffixes
    zero_centred: tuple[str, ...] = ()
    # depthwise convolutions the checkpoint stores (channels, 1, kernel), mlx-lm (channels, kernel, 1):
    # their key suffixes
    channels_first: tuple[str, ...] = ()
    # config.json keys transformers needs where its defaults differ from mlx-lm's
    config: dict = field(default_factory=dict)
    # why the per-expert adapter layout cannot work for this family ("" when it can): it must load
    # on transformers 4 and, through PEFT's conversion, on transformers 5
    per_expert_refusal: str = ""

    def expert_name(self, projection: str) -> str:
        return dict(self.expert_names)[projection]

    def fused_path(self, path: str) -> str:
        """A module or parameter path as transformers 5 names it."""
        return _rename(path, self.renames)

    def adapter_key(self, path: str) -> str:
        """A LoRA module path as a PEFT file names its tensors (before transformers' conversion)."""
        return _rename(path, self.renames if self.adapter_key_renames is None else self.adapter_key_renames)

    def checkpoint_path(self, path: str) -> str:
        """An mlx-lm parameter path as the family's Hugging Face checkpoints name it."""
        return _rename(path, self.checkpoint_renames)


def _rename(path: str, renames) -> str:
    path = "." + path + "."
    for old, new in renames:
        path = path.replace(old, new)
    return path[1:-1]


@dataclass(frozen=True)
class Family:
    """What drlora-mlx knows about one mlx-lm MoE family (one model file)."""

    examples: str  # real models of the family, for the README and error messages
    # the block's attribute that holds the router; the block is the nearest module above the
    # experts that has it (for Gemma 4 the decoder layer itself)
    router: str = "gate"
    # routing-weight rule (see ``rules``); None: only the ``count`` signal
    weights: Optional[Callable] = None
    # (router output, indices, block) -> which slots reached a real expert (None: all of them)
    routed: Optional[Callable] = None
    # the routing weight scales the experts' input, not their output (Llama 4)
    input_scaled: bool = False
    # where the weighted sum of the experts can be read for the attach-time check: None for the
    # block's output, else (path below the block, "input" or "output")
    readout: Optional[tuple[str, str]] = None
    # attributes of shared experts, looked up on the block, then on the decoder layer
    shared_experts: tuple[str, ...] = ()
    # router parameters that never train (selection-only biases, scales kept as the model has them)
    frozen_router_params: tuple[str, ...] = ()
    # block parameters that transformers keeps inside the router module (saved and exported with it)
    block_router_params: tuple[str, ...] = ()
    # decoder-layer attributes that may hold attention (full attention only; hybrid layers differ)
    attention: tuple[str, ...] = ("self_attn",)
    # why routing weights are not available (with ``weights`` None)
    note: str = ""
    # the Hugging Face side; None: transformers has no such model, so there is no PEFT export
    hf: Optional[HFFamily] = None
    # why the PEFT export cannot be exact, where transformers has the model but computes it otherwise
    export_refusal: str = ""
    # the module whose output is the last hidden state, where it is not the one that holds the decoder
    # layers (the rest of the model's __call__ is its head: see lora/head.py)
    body: str = ""
    # TinyShape -> the family-specific config.json keys of a tiny model
    tiny: Optional[Callable[[TinyShape], dict]] = None
    # config.json -> why this configuration of the family cannot be trained faithfully ("" if it can)
    check: Optional[Callable[[dict], str]] = None
