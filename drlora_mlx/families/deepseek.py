"""Families whose router scores experts itself, DeepSeek-V3 style: a sigmoid (or
softmax) of the logits, a selection-only bias, group-limited top-k,
renormalisation and a routed scaling factor (DeepSeek, GLM, Kimi, Mistral 4,
dots, EXAONE, MiMo, LongCat, Ling/Bailing, Laguna, Nemotron-H, LFM2, AFMoE,
Step, Klear, MiniMax)."""

from __future__ import annotations

import mlx.core as mx

from .rules import gated, real_experts, router_scores, scaled
from .spec import FUSED_ONLY, W_NAMES, Family, HFFamily, TinyShape

# A selection-only bias, balanced outside gradient descent: never trained.
SELECTION_BIAS = ("e_score_correction_bias",)
SHARED = ("shared_experts",)


def _mla(s: TinyShape) -> dict:
    """DeepSeek's multi-head latent attention and MoE layout, scaled down (layer 0 dense)."""
    return {
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": s.experts,
        "moe_intermediate_size": s.expert_dim,
        "intermediate_size": 2 * s.expert_dim,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1 if s.layers > 1 else 0,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096},
    }


def _v3(s: TinyShape, **extra) -> dict:
    return {**_mla(s), "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
            "routed_scaling_factor": 2.5, **extra}


def _glm4_moe_lite(s: TinyShape) -> dict:
    """The newer MLA configs (q LoRA, two expert groups) of GLM-4.7-Flash, DeepSeek-V3.2, Kimi."""
    c = _v3(s, q_lora_rank=32, qk_nope_head_dim=16, n_group=2, topk_group=1, attention_bias=False,
            num_key_value_heads=s.heads)
    c.pop("rope_scaling")
    return c


def _deepseek_v32(s: TinyShape) -> dict:
    # index_topk above the test sequences' length: the indexer keeps every key, as both libraries agree
    # there (for shorter budgets mlx-lm's and transformers' sparse attention differ)
    return {**_glm4_moe_lite(s), "index_head_dim": 16, "index_n_heads": 2, "index_topk": 64}


def _glm_moe_dsa(s: TinyShape) -> dict:
    return {**_deepseek_v32(s), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def _kimi(model_type: str):
    def tiny(s: TinyShape) -> dict:
        return {"text_config": {"model_type": model_type, **_glm4_moe_lite(s)}}

    return tiny


def _mistral4(s: TinyShape) -> dict:
    c = _glm4_moe_lite(s)
    for key in ("topk_method", "scoring_func", "moe_layer_freq", "attention_bias"):
        c.pop(key)
    return {**c, "routed_scaling_factor": 1.0, "rope_interleave": True,
            # YaRN at factor 1 (plain RoPE): transformers' default RoPE for Mistral 4 ignores the partial rotary factor
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
                                "original_max_position_embeddings": 4096, "max_position_embeddings": 4096,
                                "partial_rotary_factor": c["qk_rope_head_dim"] / (c["qk_rope_head_dim"] + c["qk_nope_head_dim"])}}


def _bailing(s: TinyShape, **extra) -> dict:
    """Ling / Ring; an ``extra`` key set to None is left out."""
    config = {
        "num_experts": s.experts,
        "moe_intermediate_size": s.expert_dim,
        "intermediate_size": 2 * s.expert_dim,
        "num_shared_experts": 1,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1 if s.layers > 1 else 0,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
        "partial_rotary_factor": 0.5,
        **extra,
    }
    return {k: v for k, v in config.items() if v is not None}


def _nemotron_pattern(s: TinyShape) -> str:
    """Mamba, MoE, attention, MoE, ...: at least two MoE layers and one of each other kind."""
    kinds = "ME*E-"
    return "".join(kinds[i % len(kinds)] for i in range(max(s.layers, 5)))


def _nemotron_h(s: TinyShape) -> dict:
    pattern = _nemotron_pattern(s)
    return {
        "num_hidden_layers": len(pattern),
        "hybrid_override_pattern": pattern,
        "head_dim": s.head_dim,
        "attention_bias": False,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 2,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "intermediate_size": 2 * s.expert_dim,
        "moe_intermediate_size": s.expert_dim,
        "moe_shared_expert_intermediate_size": s.expert_dim,
        "n_routed_experts": s.experts,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    }


def _lfm2_moe(s: TinyShape) -> dict:
    layers = max(s.layers, 3)
    return {
        "num_hidden_layers": layers,
        "num_experts": s.experts,
        "moe_intermediate_size": s.expert_dim,
        "intermediate_size": 2 * s.expert_dim,
        "norm_topk_prob": True,
        "use_expert_bias": True,
        "num_dense_layers": 1,
        "routed_scaling_factor": 1.5,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "tie_word_embeddings": True,  # mlx-lm's LFM2 always ties them
        "layer_types": ["conv" if i % 2 == 0 else "full_attention" for i in range(layers)],
    }


def _minimax(s: TinyShape) -> dict:
    return {
        "model_type": "minimax_m2",
        "num_local_experts": s.experts,
        "intermediate_size": s.expert_dim,
        "shared_intermediate_size": 0,
        "head_dim": s.head_dim,
        "rotary_dim": 8,
        "use_qk_norm": True,
        "scoring_func": "sigmoid",
    }


def _minimax_m3_vl(s: TinyShape) -> dict:
    layers = max(s.layers, 3)
    text = {
        "model_type": "minimax_m3_vl_text",
        "num_hidden_layers": layers,
        "num_local_experts": s.experts,
        "intermediate_size": s.expert_dim,
        "dense_intermediate_size": 2 * s.expert_dim,
        "shared_intermediate_size": s.expert_dim,
        "head_dim": s.head_dim,
        "rotary_dim": 8,
        "routed_scaling_factor": 2.0,
        "moe_layer_freq": [0] + [1] * (layers - 1),
    }
    return {"text_config": text}


def _klear_weights(logits, indices, block, x):
    """Klear scales the routed output by softmax(coefficient(x))[0] of each token."""
    w = gated("sigmoid", renorm="norm_topk_prob")(logits, indices, block)
    coefficient = mx.softmax(block.coefficient(x).astype(mx.float32), axis=-1, precise=True)
    return w * coefficient[..., :1]


def _longcat(s: TinyShape) -> dict:
    return {
        "attention_method": "MLA",
        "zero_expert_type": "identity",
        "ffn_hidden_size": 2 * s.expert_dim,
        "moe_topk": s.top_k,
        "expert_ffn_hidden_size": s.expert_dim,
        "n_routed_experts": s.experts,
        "zero_expert_num": 2,
        "num_layers": s.layers,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "routed_scaling_factor": 1.0,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "attention_bias": False,
    }


FAMILIES = {
    "deepseek": Family(
        examples="DeepSeekMoE-16B",
        weights=router_scores,
        shared_experts=SHARED,
        tiny=lambda s: {"n_routed_experts": s.experts, "moe_intermediate_size": s.expert_dim,
                        "intermediate_size": 2 * s.expert_dim, "n_shared_experts": 1, "moe_layer_freq": 1,
                        "first_k_dense_replace": 1 if s.layers > 1 else 0, "num_key_value_heads": s.heads},
    ),
    "deepseek_v2": Family(
        examples="DeepSeek-V2-Lite, DeepSeek-Coder-V2-Lite",
        weights=router_scores,
        shared_experts=SHARED,
        hf=HFFamily(),
        tiny=lambda s: {**_mla(s), "topk_method": "greedy", "routed_scaling_factor": 1.0},
    ),
    "deepseek_v3": Family(
        examples="DeepSeek-V3, DeepSeek-R1, Kimi-K2 (model_type kimi_k2)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(),
        tiny=_v3,
    ),
    "deepseek_v32": Family(
        examples="DeepSeek-V3.2",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=_deepseek_v32,
    ),
    "glm_moe_dsa": Family(
        examples="GLM-5",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=_glm_moe_dsa,
    ),
    "glm4_moe": Family(
        examples="GLM-4.5, GLM-4.5-Air, GLM-4.6",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(),
        tiny=lambda s: {
            "n_routed_experts": s.experts,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1 if s.layers > 1 else 0,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "head_dim": s.head_dim,
            "rope_scaling": None,
            "use_qk_norm": True,
            "attention_bias": False,
            "partial_rotary_factor": 0.5,
        },
    ),
    "glm4_moe_lite": Family(
        examples="GLM-4.7-Flash",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=_glm4_moe_lite,
    ),
    "kimi_vl": Family(
        examples="Kimi-VL-A3B (the language model)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        tiny=_kimi("deepseek_v3"),
    ),
    "kimi_k25": Family(
        examples="Kimi-K2.5 (the language model)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(renames=((".language_model.model.", ".model.language_model."),
                             (".language_model.lm_head.", ".lm_head.")),
                    per_expert_refusal=FUSED_ONLY),
        tiny=_kimi("kimi_k2"),
    ),
    "mistral4": Family(
        examples="Mistral Small 4",
        weights=gated("softmax", renorm="args.norm_topk_prob", eps=1e-20, scale="args.routed_scaling_factor"),
        shared_experts=SHARED,
        hf=HFFamily(storage="fused", per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {**_mistral4(s), "architectures": ["Mistral4ForCausalLM"]},
    ),
    "mistral3": Family(
        examples="Mistral Small 4 in its multimodal wrapper (model_type mistral3, text model mistral4)",
        weights=gated("softmax", renorm="args.norm_topk_prob", eps=1e-20, scale="args.routed_scaling_factor"),
        shared_experts=SHARED,
        hf=HFFamily(storage="fused", checkpoint_renames=((".language_model.model.", ".model.language_model."),
                                                         (".language_model.lm_head.", ".lm_head.")),
                    renames=((".language_model.model.", ".model.language_model."),
                             (".language_model.lm_head.", ".lm_head.")),
                    per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {"text_config": {"model_type": "mistral4", **_mistral4(s)}},
    ),
    "dots1": Family(
        examples="dots.llm1",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {"first_k_dense_replace": 1 if s.layers > 1 else 0, "moe_intermediate_size": s.expert_dim,
                        "intermediate_size": 2 * s.expert_dim, "n_routed_experts": s.experts, "n_shared_experts": 1,
                        "norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                        "head_dim": s.head_dim},
    ),
    "exaone_moe": Family(
        examples="K-EXAONE",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {"num_experts": s.experts, "moe_intermediate_size": s.expert_dim,
                        "intermediate_size": 2 * s.expert_dim, "num_shared_experts": 1, "head_dim": s.head_dim,
                        "sliding_window": 4, "routed_scaling_factor": 1.0,
                        "layer_types": ["sliding_attention"] * (s.layers - 1) + ["full_attention"],
                        "is_moe_layer": [i > 0 for i in range(s.layers)],
                        "mlp_layer_types": ["dense" if i == 0 else "sparse" for i in range(s.layers)]},
    ),
    "mimo_v2_flash": Family(
        examples="MiMo-V2-Flash",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        export_refusal=("transformers' MiMo-V2-Flash sizes its sliding-window attention from other configuration keys and scales the attention values (attention_value_scale), so the two models compute different outputs"),
        tiny=lambda s: {
            "hybrid_layer_pattern": [i % 2 for i in range(s.layers)],
            "moe_layer_freq": [int(i > 0) for i in range(s.layers)],
            "add_swa_attention_sink_bias": True,
            "add_full_attention_sink_bias": False,
            "sliding_window_size": 4,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "n_shared_experts": None,
            "n_routed_experts": s.experts,
            "routed_scaling_factor": None,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "n_group": 1,
            "topk_group": 1,
            "layernorm_epsilon": 1e-5,
            "swa_rope_theta": 10000.0,
            "swa_num_attention_heads": s.heads,
            "swa_num_key_value_heads": s.kv_heads,
            "head_dim": 24,
            "v_head_dim": 16,
            "swa_head_dim": 24,
            "swa_v_head_dim": 16,
            "partial_rotary_factor": 0.334,
        },
    ),
    "longcat_flash": Family(
        examples="LongCat-Flash",
        router="router",
        weights=router_scores,
        routed=real_experts,
        frozen_router_params=SELECTION_BIAS,
        export_refusal=("transformers 5 sizes LongCat's fused gate_up_proj for the zero experts too, so it does not "
                        "load a checkpoint of the real experts alone"),
        tiny=_longcat,
    ),
    "bailing_moe": Family(
        examples="Ling-lite, Ling-plus, Ring-lite (Ling 1.x / 2.0)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=("expert_bias",),
        attention=("attention",),
        tiny=_bailing,
    ),
    "bailing_moe_linear": Family(
        examples="Ring-mini-linear-2.0, Ling-flash-linear",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=("expert_bias",),
        attention=("attention",),
        tiny=lambda s: _bailing(s, num_hidden_layers=max(s.layers, 4), layer_group_size=2, group_norm_size=2,
                                num_key_value_heads=s.heads),
    ),
    "bailing_hybrid": Family(
        examples="Ling 2.5 / Ring 2.5 (MLA and lightning linear attention)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=("expert_bias",),
        attention=("attention",),
        tiny=lambda s: _bailing(s, architectures=["BailingMoeV2_5ForCausalLM"], num_hidden_layers=max(s.layers, 4),
                                layer_group_size=2, group_norm_size=2, num_key_value_heads=s.heads, head_dim=16,
                                kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                q_lora_rank=32, use_qk_norm=None, partial_rotary_factor=None),
    ),
    "bailing_moe_v3": Family(
        examples="Ling 3 / Ring 3 (model_type bailing_hybrid, BailingMoeV3ForCausalLM: MLA and KDA)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=("expert_bias",),
        attention=("attention",),
        export_refusal=("transformers' bailing_hybrid reads this configuration differently from mlx-lm's bailing_moe_v3 (head size, expert counts, layer kinds), so the two models compute different outputs"),
        tiny=lambda s: {
            "model_type": "bailing_hybrid",
            "architectures": ["BailingMoeV3ForCausalLM"],
            "num_hidden_layers": max(s.layers, 4),
            "num_experts": s.experts,
            "moe_intermediate_size": s.expert_dim,
            "moe_shared_expert_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "num_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "layer_group_size": 2,
            "head_dim": 16,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    "laguna": Family(
        examples="Laguna",
        weights=scaled(router_scores, "routed_scaling_factor"),
        shared_experts=("shared_expert",),
        frozen_router_params=SELECTION_BIAS,
        hf=HFFamily(checkpoint_renames=((".mlp.gate.proj.", ".mlp.gate."), (".mlp.gate.e_score_correction_bias.", ".mlp.experts.e_score_correction_bias.")), renames=((".mlp.gate.proj.", ".mlp.gate."), (".mlp.shared_expert.", ".mlp.shared_experts.")), adapter_key_renames=((".mlp.gate.proj.", ".mlp.gate."),), per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {
            "num_experts": s.experts,
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "shared_expert_intermediate_size": s.expert_dim,
            "head_dim": s.head_dim,
            "sliding_window": 4,
            "layer_types": ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(s.layers)],
            "mlp_layer_types": ["dense" if i == 0 else "sparse" for i in range(s.layers)],
            "rope_parameters": {t: {"rope_theta": 10000.0, "rope_type": "default"}
                                for t in ("full_attention", "sliding_attention")},
        },
    ),
    "nemotron_h": Family(
        examples="Nemotron 3 Nano 30B-A3B, Nemotron 3 Super (latent MoE)",
        weights=router_scores,
        shared_experts=SHARED,
        frozen_router_params=SELECTION_BIAS,
        attention=("mixer",),
        hf=HFFamily(channels_first=("conv1d.weight",), renames=((".backbone.", ".model."),), gated_experts=False,
                    per_expert_refusal=FUSED_ONLY),
        tiny=_nemotron_h,
    ),
    "lfm2_moe": Family(
        examples="LFM2-8B-A1B, LFM2-24B-A2B",
        weights=gated("sigmoid", renorm="norm_topk_prob", eps=1e-6, scale="routed_scaling_factor"),
        attention=("self_attn",),
        hf=HFFamily(expert_names=W_NAMES, channels_first=(".conv.conv.weight",),
                    checkpoint_renames=tuple((f".feed_forward.{p}.", f".feed_forward.{w}.") for p, w in W_NAMES),
                    per_expert_refusal=FUSED_ONLY),
        tiny=_lfm2_moe,
    ),
    "afmoe": Family(
        examples="Arcee Trinity",
        router="router",
        weights=gated("score_func", renorm="route_norm", renorm_single=False, scale="route_scale"),
        shared_experts=SHARED,
        hf=HFFamily(per_expert_refusal=FUSED_ONLY),
        tiny=lambda s: {
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(max(s.layers, 2))],
            "num_hidden_layers": max(s.layers, 2),
            "moe_intermediate_size": s.expert_dim,
            "intermediate_size": 2 * s.expert_dim,
            "num_experts": s.experts,
            "num_shared_experts": 1,
            "num_dense_layers": 1,
            "route_norm": True,
            "route_scale": 1.0,
            "sliding_window": 4,
            "mup_enabled": False,
            "head_dim": s.head_dim,
        },
    ),
    "step3p5": Family(
        examples="Step-3.5-Flash",
        weights=router_scores,
        shared_experts=("share_expert",),
        frozen_router_params=("router_bias",),
        tiny=lambda s: {
            "num_attention_groups": s.kv_heads,
            "head_dim": s.head_dim,
            "intermediate_size": 2 * s.expert_dim,
            "layer_types": ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(s.layers)],
            "sliding_window": 4,
            "moe_num_experts": s.experts,
            "moe_top_k": s.top_k,
            "moe_intermediate_size": s.expert_dim,
            "share_expert_dim": s.expert_dim,
            "moe_layers_enum": ",".join(str(i) for i in range(1, s.layers)),
            "moe_router_scaling_factor": 1.0,
        },
    ),
    "Klear": Family(
        examples="Klear-46B-A2.5B",
        weights=_klear_weights,
        shared_experts=SHARED,
        tiny=lambda s: {"model_type": "Klear", "mlp_only_layers": [0] if s.layers > 1 else [],
                        "num_experts": s.experts, "decoder_sparse_step": 1, "n_shared_experts": 1,
                        "moe_intermediate_size": s.expert_dim, "intermediate_size": 2 * s.expert_dim,
                        "attention_bias": False, "norm_topk_prob": True},
    ),
    "minimax": Family(
        examples="MiniMax-M2, MiniMax-M2.1 (model_type minimax_m2)",
        weights=gated("sigmoid", renorm=True, eps=1e-20),
        hf=HFFamily(expert_names=W_NAMES, renames=((".block_sparse_moe.", ".mlp."),), per_expert_refusal=FUSED_ONLY),
        tiny=_minimax,
    ),
    "minimax_m3_vl": Family(
        examples="MiniMax-M3 (the language model)",
        weights=gated("sigmoid", renorm=True, eps=1e-20, scale="routed_scaling_factor"),
        shared_experts=SHARED,
        export_refusal=("transformers' MiniMax-M3 and mlx-lm's compute different outputs for the same weights (checked on a tiny model: logits differ by about 4), so a PEFT export would not reproduce the adapter"),
        tiny=_minimax_m3_vl,
    ),
    "kimi_linear": Family(
        examples="Kimi-Linear-48B-A3B",
        weights=gated("args.moe_router_activation_func", renorm="args.moe_renormalize", eps=1e-20,
                      renorm_single=False, scale="args.routed_scaling_factor"),
        shared_experts=SHARED,
        block_router_params=SELECTION_BIAS,
        hf=HFFamily(
            expert_names=W_NAMES,
            # MoE layers keep the original block_sparse_moe names on disk; dense layers are mlp.*
            checkpoint_renames=((".mlp.switch_mlp.", ".block_sparse_moe.switch_mlp."),
                                (".mlp.shared_experts.", ".block_sparse_moe.shared_experts."),
                                (".mlp.gate.", ".block_sparse_moe.gate."),
                                (".mlp.e_score_correction_bias.", ".block_sparse_moe.gate.e_score_correction_bias."),
                                *((f".{x}_conv.conv.", f".{x}_conv1d.") for x in "qkv")),
            channels_first=("_conv.conv.weight",),
            renames=((".mlp.e_score_correction_bias.", ".mlp.gate.e_score_correction_bias."),
                     (".self_attn.f_a_proj.", ".self_attn.forget_gate.f_a_proj."),
                     (".self_attn.f_b_proj.", ".self_attn.forget_gate.f_b_proj.")),
            adapter_key_renames=((".mlp.e_score_correction_bias.", ".mlp.gate.e_score_correction_bias."),),
            per_expert_refusal=FUSED_ONLY,
        ),
        tiny=lambda s: {
            "num_hidden_layers": max(s.layers, 4),
            "head_dim": s.head_dim,
            "num_key_value_heads": s.heads,
            "intermediate_size": 2 * s.expert_dim,
            "linear_attn_config": {"kda_layers": list(range(1, max(s.layers, 4))), "full_attn_layers": [max(s.layers, 4)],
                                   "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
            "model_max_length": 4096,
            "num_experts": s.experts,
            "moe_intermediate_size": s.expert_dim,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "mla_use_nope": True,
            "num_experts_per_token": s.top_k,
            "num_shared_experts": 1,
            "moe_router_activation_func": "sigmoid",
            "moe_renormalize": True,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "num_expert_group": 2,
            "topk_group": 1,
        },
    ),
    "kimi_k3": Family(
        examples="Kimi-K3",
        weights=gated("sigmoid", renorm="args.moe_renormalize", eps=1e-20, renorm_single=False,
                      scale="args.routed_scaling_factor"),
        shared_experts=SHARED,
        tiny=lambda s: {
            "intermediate_size": 2 * s.expert_dim,
            "num_key_value_heads": s.heads,
            "linear_attn_config": {"kda_layers": [2], "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "num_experts": s.experts,
            "num_experts_per_token": s.top_k,
            "num_shared_experts": 1,
            "moe_intermediate_size": s.expert_dim,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
        },
    ),
}
