"""Families whose block chooses the top-k logits and weights them by a softmax
over the chosen ones (Mixtral and its descendants: PhiMoE, gpt-oss, Granite,
Jamba, Phixtral), and the two whose routing sits elsewhere: Llama 4 (a
sigmoid scaling the experts' input) and Gemma 4 (a router beside the experts
at decoder-layer level)."""

from __future__ import annotations

from .rules import gated, router_scores, topk_then_softmax
from .spec import (
    FUSED_IN_TRANSFORMERS_4,
    FUSED_ONLY,
    W_NAMES,
    Family,
    HFFamily,
    TinyShape,
)


def _gemma4_text(s: TinyShape) -> dict:
    return {
        "model_type": "gemma4_text",
        "intermediate_size": 2 * s.expert_dim,
        "head_dim": s.head_dim,
        "global_head_dim": 2 * s.head_dim,
        "num_key_value_heads": 1,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": s.vocab,
        "sliding_window": 8,
        # alternating, the last layer full (transformers insists on it)
        "layer_types": ["full_attention" if i % 2 or i == s.layers - 1 else "sliding_attention"
                        for i in range(s.layers)],
        "enable_moe_block": True,
        "num_experts": s.experts,
        "top_k_experts": s.top_k,
        "moe_intermediate_size": s.expert_dim,
        "use_double_wide_mlp": False,
        "attention_k_eq_v": False,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    }


def _granitemoehybrid(s: TinyShape) -> dict:
    layers = max(s.layers, 3)
    return {
        "num_hidden_layers": layers,
        "intermediate_size": s.expert_dim,
        "num_local_experts": s.experts,
        "shared_intermediate_size": 2 * s.expert_dim,
        "attention_bias": False,
        "embedding_multiplier": 1.0,
        "attention_multiplier": s.head_dim**-0.5,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "layer_types": ["mamba" if i % 2 == 0 else "attention" for i in range(layers)],
        "mamba_n_heads": 4,
        "mamba_d_head": 32,
        "mamba_proj_bias": False,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
        "position_embedding_type": "rope",
        "tie_word_embeddings": True,
    }


def _jamba(s: TinyShape) -> dict:
    layers = max(s.layers, 4)
    return {
        "num_hidden_layers": layers,
        "intermediate_size": s.expert_dim,
        "attn_layer_offset": 0,
        "attn_layer_period": 2,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 8,
        "mamba_expand": 2,
        "num_experts": s.experts,
    }


def _llama4(s: TinyShape) -> dict:
    return {"text_config": {
        "model_type": "llama4_text",
        "num_hidden_layers": max(s.layers, 4),
        "num_experts_per_tok": 1,  # mlx-lm's Llama 4 routes to one expert
        "attention_bias": False,
        "attention_chunk_size": 16,
        "head_dim": s.head_dim,
        "interleave_moe_layer_step": 2,
        "intermediate_size": s.expert_dim,
        "intermediate_size_mlp": 2 * s.expert_dim,
        "num_local_experts": s.experts,
        "rope_scaling": None,
        "use_qk_norm": True,
    }}


FAMILIES = {
    "mixtral": Family(
        examples="Mixtral-8x7B, Mixtral-8x22B",
        weights=topk_then_softmax,
        hf=HFFamily(expert_names=W_NAMES, renames=((".block_sparse_moe.", ".mlp."),)),
        tiny=lambda s: {"num_local_experts": s.experts, "intermediate_size": s.expert_dim},
    ),
    "phimoe": Family(
        examples="Phi-3.5-MoE, Phi-mini-MoE",
        note="sparsemixer routing weights are computed inside the block; routing frequency uses token counts",
        hf=HFFamily(
            expert_names=W_NAMES,
            renames=((".block_sparse_moe.", ".mlp."), (".mlp.gate.", ".mlp.router.")),
            config={"attention_bias": True, "lm_head_bias": True},
            per_expert_refusal=(
                "PEFT on transformers 5 does not convert phimoe's per-expert LoRA config, so loading fails there; "
                "use --layout fused (transformers >= 5)"
            ),
        ),
        tiny=lambda s: {"num_local_experts": s.experts, "intermediate_size": s.expert_dim, "rope_scaling": None,
                        "router_jitter_noise": 0.01},
    ),
    "gpt_oss": Family(
        examples="gpt-oss-20b, gpt-oss-120b",
        router="router",
        weights=topk_then_softmax,
        frozen_router_params=("bias",),
        hf=HFFamily(storage="gpt_oss", gate_up="interleave", config={"rope_scaling": {"rope_type": "default"}},
                    per_expert_refusal=FUSED_IN_TRANSFORMERS_4),
        tiny=lambda s: {"num_local_experts": s.experts, "intermediate_size": s.expert_dim, "head_dim": s.head_dim,
                        "sliding_window": 16,
                        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(s.layers)]},
    ),
    "granitemoe": Family(
        examples="Granite 3.x MoE (1B-A400M, 3B-A800M)",
        router="router",
        weights=router_scores,
        hf=HFFamily(storage="granite", renames=((".router.layer.", ".router."),),
                    per_expert_refusal=FUSED_IN_TRANSFORMERS_4),
        tiny=lambda s: {"num_local_experts": s.experts, "intermediate_size": s.expert_dim, "logits_scaling": 1.0,
                        "attention_multiplier": s.head_dim**-0.5, "embedding_multiplier": 1.0,
                        "residual_multiplier": 1.0, "attention_bias": False, "tie_word_embeddings": True},
    ),
    "granitemoehybrid": Family(
        examples="Granite 4.0-H Tiny, Granite 4.0-H Small",
        router="router",
        weights=router_scores,
        shared_experts=("shared_mlp",),
        hf=HFFamily(storage="granite", renames=((".router.layer.", ".router."),), channels_first=("conv1d.weight",),
                    per_expert_refusal=FUSED_IN_TRANSFORMERS_4),
        tiny=_granitemoehybrid,
    ),
    "jamba": Family(
        examples="Jamba Mini 1.6, Jamba Large",
        router="router",
        weights=topk_then_softmax,
        export_refusal=("mlx-lm's Jamba renormalises the chosen routing weights and transformers' does not, so the "
                        "two models compute different outputs"),
        tiny=_jamba,
    ),
    "phixtral": Family(
        examples="phixtral-4x2_8, phixtral-2x2_8",
        weights=topk_then_softmax,
        attention=("mixer",),
        tiny=lambda s: {"num_vocab": s.vocab, "model_dim": s.hidden, "num_heads": s.heads, "num_layers": s.layers,
                        "rotary_dim": 8, "num_local_experts": s.experts},
    ),
    "llama4": Family(
        examples="Llama 4 Scout 17B-16E, Llama 4 Maverick 17B-128E",
        router="router",
        weights=gated("sigmoid"),
        input_scaled=True,
        shared_experts=("shared_expert",),
        export_refusal=("transformers keeps Llama 4's fused experts transposed, (experts, in, out), and PEFT 0.21 "
                        "adapts a fused expert parameter as (experts, out, in), so its LoRA would not be this one"),
        tiny=_llama4,
    ),
    "gemma4": Family(
        examples="Gemma 4 26B-A4B (in its multimodal wrapper)",
        router="router",
        weights=router_scores,
        readout=("experts", "output"),
        frozen_router_params=("scale", "per_expert_scale"),
        hf=HFFamily(storage="fused",
                    checkpoint_renames=((".language_model.model.", ".model.language_model."),
                                        (".experts.switch_glu.", ".experts.")),
                    renames=((".language_model.model.", ".model.language_model."), (".experts.switch_glu.", ".experts.")),
                    per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {"vocab_size": s.vocab, "text_config": _gemma4_text(s)},
    ),
    "gemma4_text": Family(
        examples="Gemma 4 26B-A4B (the language model alone)",
        router="router",
        weights=router_scores,
        readout=("experts", "output"),
        frozen_router_params=("scale", "per_expert_scale"),
        hf=HFFamily(storage="fused", checkpoint_renames=((".experts.switch_glu.", ".experts."),),
                    renames=((".experts.switch_glu.", ".experts."),), per_expert_refusal=FUSED_ONLY),
        tiny=_gemma4_text,
    ),
}
