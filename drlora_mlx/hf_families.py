"""How each supported family is named in Hugging Face checkpoints and transformers.

mlx-lm stacks the routed experts of a block into one ``switch_mlp`` (gpt-oss:
``experts``) with ``gate_proj`` / ``up_proj`` / ``down_proj`` of shape
(experts, out, in). Hugging Face checkpoints, and transformers 4 in memory,
keep one module per expert (``experts.{e}.up_proj``; Mixtral and PhiMoE:
``w1`` gate, ``w3`` up, ``w2`` down). transformers 5 fuses them in memory into
``experts.gate_up_proj`` (E, 2I, H; rows [:I] gate) and ``experts.down_proj``
(E, H, I), and renames a few blocks and routers. gpt-oss is fused in both
versions, transposed (E, in, out), with gate and up interleaved (even / odd
outputs). One table entry per family says what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .families import UnsupportedModelError

_STANDARD_NAMES = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))
_W_NAMES = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))


@dataclass(frozen=True)
class HFFamily:
    """The Hugging Face side of one mlx-lm MoE family."""

    # mlx-lm projection -> per-expert module name in checkpoints and transformers 4
    expert_names: tuple[tuple[str, str], ...] = _STANDARD_NAMES
    # how the checkpoint stores routed experts: "per-expert", "granite" (input_linear /
    # output_linear) or "gpt_oss" (fused, MXFP4 blocks or transposed float)
    storage: str = "per-expert"
    # (old, new) substrings, dot-delimited: mlx-lm / checkpoint paths -> transformers 5 paths
    renames: tuple[tuple[str, str], ...] = ()
    # the fused gate_up_proj output rows: "concat" ([gate; up]) or "interleave" (gpt-oss)
    gate_up: str = "concat"
    # config.json keys transformers needs where its defaults differ from mlx-lm's
    config: dict = field(default_factory=dict)
    # why the per-expert adapter layout cannot work for this family ("" when it can): it must load
    # on transformers 4 and, through PEFT's conversion, on transformers 5
    per_expert_refusal: str = ""

    def expert_name(self, projection: str) -> str:
        return dict(self.expert_names)[projection]

    def fused_path(self, path: str) -> str:
        """A module or parameter path as transformers 5 names it."""
        path += "."
        for old, new in self.renames:
            path = path.replace(old, new)
        return path[:-1]


_FUSED_IN_TRANSFORMERS_4 = (
    "transformers 4 already keeps these experts as fused parameters, so there is no per-expert module "
    "for PEFT to adapt; use --layout fused"
)

HF_FAMILIES: dict[str, HFFamily] = {
    "qwen3_moe": HFFamily(),
    "qwen2_moe": HFFamily(
        per_expert_refusal=(
            "PEFT on transformers 5 converts qwen2_moe's per-expert LoRA tensors but not its config, so the expert "
            "adapter is dropped or fails to load there; use --layout fused (transformers >= 5)"
        )
    ),
    "olmoe": HFFamily(),
    "mixtral": HFFamily(expert_names=_W_NAMES, renames=((".block_sparse_moe.", ".mlp."),)),
    "phimoe": HFFamily(
        expert_names=_W_NAMES,
        renames=((".block_sparse_moe.", ".mlp."), (".mlp.gate.", ".mlp.router.")),
        config={"attention_bias": True, "lm_head_bias": True},
        per_expert_refusal=(
            "PEFT on transformers 5 does not convert phimoe's per-expert LoRA config, so loading fails there; "
            "use --layout fused (transformers >= 5)"
        ),
    ),
    "deepseek_v2": HFFamily(),
    "deepseek_v3": HFFamily(),
    "glm4_moe": HFFamily(),
    "gpt_oss": HFFamily(
        storage="gpt_oss",
        gate_up="interleave",
        config={"rope_scaling": {"rope_type": "default"}},
        per_expert_refusal=_FUSED_IN_TRANSFORMERS_4,
    ),
    "granitemoe": HFFamily(
        storage="granite",
        renames=((".router.layer.", ".router."),),
        per_expert_refusal=_FUSED_IN_TRANSFORMERS_4,
    ),
}


def hf_family(name: str) -> HFFamily:
    if name not in HF_FAMILIES:
        raise UnsupportedModelError(
            f"family {name!r} has no Hugging Face counterpart drlora-mlx knows; "
            f"exportable families: {', '.join(sorted(HF_FAMILIES))}"
        )
    return HF_FAMILIES[name]
