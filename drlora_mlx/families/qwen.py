"""Families whose router is a plain linear layer and whose block takes the
softmax over all experts, then the chosen k (Qwen-MoE and its descendants,
OLMoE, Mellum, Hunyuan, ERNIE)."""

from __future__ import annotations

from .rules import gated, softmax_then_topk
from .spec import FUSED_ONLY, Family, HFFamily, TinyShape


def _qwen3(s: TinyShape) -> dict:
    return {
        "num_experts": s.experts,
        "moe_intermediate_size": s.expert_dim,
        "intermediate_size": 2 * s.expert_dim,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "head_dim": s.head_dim,
        "norm_topk_prob": True,
    }


def _gated_delta(s: TinyShape) -> dict:
    """Qwen3-Next / Qwen3.5: gated-delta linear attention on every other layer, then full attention."""
    return {
        "full_attention_interval": 2,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "head_dim": s.head_dim,
        "partial_rotary_factor": 0.25,
    }


def _qwen3_next(s: TinyShape) -> dict:
    return {
        **_gated_delta(s),
        "num_experts": s.experts,
        "moe_intermediate_size": s.expert_dim,
        "shared_expert_intermediate_size": s.expert_dim,
        "intermediate_size": 2 * s.expert_dim,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def _qwen3_5_moe(s: TinyShape) -> dict:
    text = _qwen3_next(s)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": text.pop("partial_rotary_factor")}
    return {"text_config": {"model_type": "qwen3_5_moe_text", **text, "rope_parameters": rope}}


def _qwen3_vl_moe(s: TinyShape) -> dict:
    return {"text_config": {"model_type": "qwen3_vl_moe_text", **_qwen3(s)}}


QWEN_SHARED_EXPERT = ("shared_expert",)
# Qwen3-Next / Qwen3.5 checkpoints store the RMSNorm weights zero-centred (the model adds 1).
ZERO_CENTRED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                      ".q_norm.weight", ".k_norm.weight")

FAMILIES = {
    "qwen3_moe": Family(
        examples="Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B",
        weights=softmax_then_topk("norm_topk_prob"),
        hf=HFFamily(),
        tiny=_qwen3,
    ),
    "qwen2_moe": Family(
        examples="Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
        weights=softmax_then_topk(),
        shared_experts=QWEN_SHARED_EXPERT,
        hf=HFFamily(per_expert_refusal=(
            "PEFT on transformers 5 converts qwen2_moe's per-expert LoRA tensors but not its config, so the expert "
            "adapter is dropped or fails to load there; use --layout fused (transformers >= 5)"
        )),
        tiny=lambda s: {
            "num_experts": s.experts,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "shared_expert_intermediate_size": 2 * s.expert_dim,
        },
    ),
    "qwen3_next": Family(
        examples="Qwen3-Next-80B-A3B, Qwen3-Coder-Next",
        weights=softmax_then_topk("norm_topk_prob"),
        shared_experts=QWEN_SHARED_EXPERT,
        hf=HFFamily(zero_centred=ZERO_CENTRED_NORMS, channels_first=("conv1d.weight",),
                    per_expert_refusal=FUSED_ONLY),
        tiny=_qwen3_next,
    ),
    "qwen3_5_moe": Family(
        examples="Qwen3.5-35B-A3B, Qwen3.5-122B-A10B, Qwen3.5-397B-A17B, Qwen3.6-35B-A3B",
        weights=softmax_then_topk("norm_topk_prob"),
        shared_experts=QWEN_SHARED_EXPERT,
        hf=HFFamily(
            storage="fused",
            # the released checkpoints are the multimodal model's; transformers' causal LM drops the wrapper
            checkpoint_renames=((".language_model.model.", ".model.language_model."),
                                (".language_model.lm_head.", ".lm_head.")),
            renames=((".language_model.model.", ".model."),),
            zero_centred=ZERO_CENTRED_NORMS,
            channels_first=("conv1d.weight",),
            per_expert_refusal=FUSED_ONLY,
        ),
        tiny=_qwen3_5_moe,
    ),
    "qwen3_vl_moe": Family(
        examples="Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B (the language model)",
        weights=softmax_then_topk("norm_topk_prob"),
        export_refusal=("transformers' Qwen3-VL applies multimodal (3-D) rotary positions, mlx-lm's language model plain ones, so the two models compute different outputs"),
        tiny=_qwen3_vl_moe,
    ),
    "olmoe": Family(
        examples="OLMoE-1B-7B",
        weights=softmax_then_topk("norm_topk_prob"),
        hf=HFFamily(),
        tiny=lambda s: {"num_experts": s.experts, "intermediate_size": s.expert_dim, "norm_topk_prob": False},
    ),
    "mellum": Family(
        examples="Mellum (JetBrains)",
        weights=softmax_then_topk("norm_topk_prob"),
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {
            "num_experts": s.experts,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "head_dim": s.head_dim,
            "norm_topk_prob": True,
            "sliding_window": 4,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.layers)],
            "rope_parameters": {t: {"rope_theta": 10000.0, "rope_type": "default"}
                                for t in ("full_attention", "sliding_attention")},
        },
    ),
    "hunyuan": Family(
        examples="Hunyuan-A13B",
        weights=gated("softmax"),
        shared_experts=("shared_mlp",),
        export_refusal=("transformers' hunyuan_v1_moe renormalises the chosen routing weights and mlx-lm's hunyuan "
                        "does not, so the two models compute different outputs"),
        tiny=lambda s: {
            "num_experts": s.experts,
            "moe_topk": s.top_k,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "num_shared_expert": 1,
            "use_mixed_mlp_moe": True,
            "use_qk_norm": True,
            "use_cla": False,
            "cla_share_factor": 2,
            "attention_bias": False,
            "rope_scaling": {"alpha": 1.0, "factor": 1.0, "type": "dynamic"},
        },
    ),
    "ernie4_5_moe": Family(
        examples="ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B",
        weights=gated("args.moe_gate_act", renorm=True, floor=1e-12),
        shared_experts=("shared_experts",),
        export_refusal=("mlx-lm drops ERNIE's e_score_correction_bias, which transformers uses to choose the "
                        "experts, so the two models route differently"),
        tiny=lambda s: {
            "moe_num_experts": s.experts,
            "moe_k": s.top_k,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "moe_layer_start_index": 1 if s.layers > 1 else 0,
            "moe_layer_end_index": s.layers - 1,
            "moe_layer_interval": 1,
            "moe_num_shared_experts": 1,
            "use_bias": False,
            "hidden_act": "silu",
        },
    ),
}
