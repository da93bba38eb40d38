"""`drlora-mlx plan --model`: the memory of a run from config.json alone, against hand counts."""

import copy
import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import quantize_model

from drlora_mlx.config.settings import ConfigError, DRLoRAConfig
from drlora_mlx.families.mlx_lm_names import model_classes
from drlora_mlx.families.spec import TinyShape
from drlora_mlx.formats.tiny import TINY_FAMILIES, _init_weights, family_config
from drlora_mlx.lora.attach import attach
from drlora_mlx.training import memory
from drlora_mlx.training.memory import (
    PeakEstimate,
    memory_warning,
    model_from_config,
    model_shape,
    uniform_lora_state_bytes,
)

from .helpers import SHAPE, run_cli

GB = 10**9

# Qwen/Qwen3-30B-A3B's config.json.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# allenai/OLMoE-1B-7B-0924's config.json.
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "float32", "use_cache": True, "vocab_size": 50304,
}
Q4 = {"group_size": 64, "bits": 4}

# Parameters, counted by hand. Qwen3-30B-A3B, per layer: q (2048 -> 32 x 128), k and v (2048 -> 4 x 128),
# o (4096 -> 2048), q/k norms over a head (128), 128 experts x 3 projections 2048 x 768, the router
# (128 x 2048), two norms; plus embeddings and lm_head (151936 x 2048) and the final norm.
QWEN_NORMS = 48 * (2 * 128 + 2 * 2048) + 2048
QWEN_PARAMS = (48 * (2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 128 * 3 * 2048 * 768 + 128 * 2048)
               + 2 * 151936 * 2048 + QWEN_NORMS)
# OLMoE-1B-7B, per layer: q, k, v, o (2048 x 2048), q/k norms over the hidden size, 64 experts x 3 x 2048 x
# 1024, the router (64 x 2048), two norms; embeddings and lm_head (50304 x 2048), the final norm.
OLMOE_PARAMS = 16 * (4 * 2048 * 2048 + 4 * 2048 + 64 * 3 * 2048 * 1024 + 64 * 2048) + 2 * 50304 * 2048 + 2048


def write_config(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def plan_json(argv, capsys):
    code, out, err = run_cli(["plan", *argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_qwen3_30b_a3b_bfloat16(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 192 * GB)
    plan = plan_json(["--model", write_config(tmp_path, "qwen3", QWEN3_30B_A3B), "--iters", "1000",
                      "--grad-checkpoint", "--batch-size", "1", "--max-seq-length", "1024"], capsys)
    assert QWEN_PARAMS == 30_532_122_624  # the model card's 30.5B
    assert plan["base_weight_bytes"] == QWEN_PARAMS * 2
    assert (plan["moe_layers"], plan["experts"], plan["hidden"], plan["expert_dim"], plan["top_k"]) == \
        (48, 128, 2048, 768, 8)
    # uniform LoRA at r_target 16 on up and down of every expert: 48 x 128 x 2 x 16 x (2048 + 768) values
    uniform = 48 * 128 * 2 * 16 * (2048 + 768) * 16
    assert plan["uniform_lora_state_bytes"] == uniform and round(uniform / GB, 2) == 8.86
    # pooled: 2 x 128 x 16 slots and the null slot per layer, a slot table (E, r_max) per module, an EMA per slot
    slots = 2 * 128 * 16 + 1
    pooled = 48 * slots * (2048 + 768) * 16 + 48 * 2 * 128 * 32 * 4 + 48 * slots * 4
    assert plan["lora_state_bytes"] == plan["layouts"]["pooled"]["lora_state_bytes"] == pooled
    assert plan["lora_layout"] == "pooled" and pooled < 1.10 * uniform
    # masked: A and B at r_max 32 for every module, plus its rank mask and importance EMA
    masked = 48 * 2 * 128 * 32 * ((2048 + 768) * 16 + 2 * 4)
    assert plan["layouts"]["masked"]["lora_state_bytes"] == masked and round(masked / GB, 1) == 17.7
    gathered = 2 * 128 * 32 * (2048 + 768) * 4 * 2
    assert plan["gathered_factor_bytes"] == gathered
    assert plan["router_state_bytes"] == 48 * 128 * 2048 * 16
    act = plan["activation_bytes"]  # checked against measured peaks in test_memory.py
    fixed = QWEN_PARAMS * 2 + 48 * 128 * 2048 * 16 + act
    assert plan["peak_bytes"] == fixed + pooled + gathered
    assert plan["layouts"]["masked"]["peak_bytes"] == fixed + masked
    assert plan["available_bytes"] == 192 * GB and plan["fits"] is True
    budget = 0.9 * 192 * GB
    assert plan["largest_r_max"] == min(768, int((budget - fixed) // (48 * 2 * 128 * ((2048 + 768) * 16 + 8))))
    assert plan["largest_r_target"] == 32  # r_target may not pass r_max
    # the growth summary is still there
    assert plan["layers"] == 48 and plan["mean_rank"]["1000"] == 16.0 and plan["cap"] == 2 * 128 * 8


def test_qwen3_30b_a3b_4bit(tmp_path, capsys, monkeypatch):
    config = {**QWEN3_30B_A3B, "quantization": Q4, "quantization_config": Q4}
    argv = ["--model", write_config(tmp_path, "qwen3-4bit", config), "--iters", "1000", "--grad-checkpoint",
            "--batch-size", "1", "--max-seq-length", "1024"]
    plan = plan_json(argv, capsys)
    # Every linear layer, the experts and the embeddings at 4 bits (half a byte) with a bfloat16 scale and
    # bias per 64 weights; the norms in bfloat16.
    assert plan["base_weight_bytes"] == (QWEN_PARAMS - QWEN_NORMS) * (4 / 8 + 2 * 2 / 64) + QWEN_NORMS * 2
    assert round(plan["base_weight_bytes"] / GB, 2) == 17.17
    assert plan["quantization"] == Q4
    fixed = plan["base_weight_bytes"] + 48 * 128 * 2048 * 16 + plan["activation_bytes"]
    assert plan["peak_bytes"] == fixed + plan["lora_state_bytes"] + plan["gathered_factor_bytes"]
    masked_per_rank = 48 * 2 * 128 * (2816 * 16 + 8)  # masked state per unit of r_max
    pooled_per_rank = 48 * 2 * 128 * (2816 * 16 + 4)  # pooled state per unit of r_target
    pooled_constant = 48 * ((2816 * 16 + 4) + 2 * 128 * 32 * 4) + plan["gathered_factor_bytes"]
    # A machine with room for the pooled run at r_target 16 and a half: it fits, the masked one does not.
    available = (fixed + pooled_constant + 16.5 * pooled_per_rank) / 0.9
    monkeypatch.setattr(memory, "available_bytes", lambda: available)
    plan = plan_json(argv, capsys)
    assert plan["fits"] is True and plan["layouts"]["masked"]["peak_bytes"] > 0.9 * available
    budget = 0.9 * available
    assert plan["largest_r_max"] == int((budget - fixed) // masked_per_rank) == 16
    assert plan["largest_r_target"] == int((budget - fixed - pooled_constant) // pooled_per_rank) == 16
    assert plan["warning"] is None

    available = (fixed + pooled_constant + 6.5 * pooled_per_rank) / 0.9
    monkeypatch.setattr(memory, "available_bytes", lambda: available)
    plan = plan_json(argv, capsys)
    budget = 0.9 * available
    assert plan["fits"] is False and plan["largest_r_max"] == int((budget - fixed) // masked_per_rank) == 6
    assert plan["largest_r_target"] == int((budget - fixed - pooled_constant) // pooled_per_rank) == 6
    assert "its LoRA state (9.0 GB) is what does not fit: lower --r-target" in plan["warning"]
    code, out, err = run_cli(["plan", *argv], capsys)
    assert code == 0, err
    assert "hidden 2048, expert dim 768, 4-bit (group 64) weights" in out and "the run does not fit" in out
    assert "largest r_max that fits, masked layout: none (r_max must be at least r_target 16)" in out
    assert "largest r_target that fits at r_max 32: 6, with --r-init below it" in out


def test_olmoe_1b_7b_with_the_papers_ranks(tmp_path, capsys, monkeypatch):
    argv = ["--model", write_config(tmp_path, "olmoe", OLMOE_1B_7B), "--iters", "38000", "--r-init", "32",
            "--r-max", "128", "--r-target", "64"]
    plan = plan_json(argv, capsys)
    assert OLMOE_PARAMS == 6_919_161_856  # the model card's 6.9B
    assert plan["base_weight_bytes"] == OLMOE_PARAMS * 4  # float32 weights
    width = 2048 + 1024
    uniform = 16 * 128 * 64 * width * 16
    pooled = 16 * (128 * 64 + 1) * (width * 16 + 4) + 16 * 128 * 128 * 4
    masked = 16 * 128 * 128 * (width * 16 + 8)
    assert plan["uniform_lora_state_bytes"] == uniform
    assert plan["lora_state_bytes"] == pooled < 1.10 * uniform
    assert plan["layouts"]["masked"]["lora_state_bytes"] == masked == 2 * uniform + 16 * 128 * 128 * 8
    act = plan["activation_bytes"]
    fixed = OLMOE_PARAMS * 4 + 16 * 64 * 2048 * 16 + act
    gathered = 2 * 64 * 128 * width * 8
    assert plan["peak_bytes"] == fixed + pooled + gathered
    # A machine with room for everything but the LoRA state at r_target 31 and a half: the LoRA state is
    # what does not fit.
    pooled_constant = 16 * (width * 16 + 4) + 16 * 128 * 128 * 4 + gathered
    available = (fixed + pooled_constant + 31.5 * 16 * 128 * (width * 16 + 4)) / 0.9
    monkeypatch.setattr(memory, "available_bytes", lambda: available)
    plan = plan_json(argv, capsys)
    assert plan["fits"] is False
    budget = 0.9 * available
    assert plan["largest_r_max"] == int((budget - fixed) // (16 * 128 * (width * 16 + 8))) == 35
    assert plan["largest_r_target"] == int((budget - fixed - pooled_constant) // (16 * 128 * (width * 16 + 4))) == 31
    assert "lower --r-target" in plan["warning"]
    assert plan["budget_exhausted_step"] == 36740  # the paper's schedule, as before
    code, out, err = run_cli(["plan", *argv], capsys)
    assert code == 0, err
    assert "float32 (config.json) weights" in out and f"this machine can give {available / GB:.1f} GB: the run does not fit" in out
    assert "largest r_max that fits, masked layout: none (r_max must be at least r_target 64)" in out
    # where the rest alone does not fit: the usual advice, no rank flag
    monkeypatch.setattr(memory, "available_bytes", lambda: fixed)
    warning = plan_json(argv, capsys)["warning"]
    assert "lower --batch-size" in warning and "LoRA state" not in warning


def test_json_has_the_memory_keys(tmp_path, capsys):
    plan = plan_json(["--model", write_config(tmp_path, "olmoe", OLMOE_1B_7B), "--iters", "100"], capsys)
    assert set(plan) >= {"peak_bytes", "lora_state_bytes", "uniform_lora_state_bytes", "base_weight_bytes",
                         "activation_bytes", "fits", "available_bytes", "largest_r_max", "largest_r_target",
                         "warmup_steps", "quota", "mean_rank", "growth", "layers", "total_budget"}
    assert plan["available_bytes"] == memory.available_bytes()


def test_planning_a_30b_model_allocates_no_weights(tmp_path):
    folder = write_config(tmp_path, "qwen3", QWEN3_30B_A3B)
    script = (
        "import json, resource, sys\n"
        "import mlx_lm.models.qwen3_moe, mlx_lm.utils\n"
        "from drlora_mlx.cli import main\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    main(['plan', '--model', {folder!r}, '--iters', '100', '--json'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    plan, grown_kb = out.splitlines()
    assert json.loads(plan)["base_weight_bytes"] == QWEN_PARAMS * 2  # 61 GB planned ...
    assert int(grown_kb) * 1024 < 1 * GB  # ... without allocating them


# Every family of the registry: what the plan counts is what mlx-lm's own model holds (quantized by
# mlx-lm's own quantize_model), and the shape is the tiny model's.
TINY = TinyShape(expert_dim=64)  # 64: every quantized dimension divisible by mlx-lm's group sizes


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_counts_what_mlx_lm_holds(family, bits):
    config = family_config(family, TINY)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    _init_weights(model, 0)
    if bits:
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    config = copy.deepcopy(config)
    (config.get("text_config") or config)["torch_dtype"] = "float32"  # the tiny weights' dtype
    shape = model_shape(model_from_config(config), ("up_proj", "down_proj"), config)
    assert shape.base_weight_bytes == held
    expert_dim = 4 * TINY.hidden if family == "phixtral" else TINY.expert_dim  # phixtral's experts are 4 H wide
    assert (shape.experts, shape.hidden, shape.expert_dim) == (TINY.experts, TINY.hidden, expert_dim)
    assert shape.top_k == (1 if family == "llama4" else TINY.top_k)  # mlx-lm's Llama 4 routes to one expert


def test_the_masked_formula_is_what_attach_allocates(tiny_models):
    model, _ = mlx_lm_load(str(tiny_models("qwen3_moe", shape=SHAPE)))
    base = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8, lora_layout="masked"))
    allocated = sum((m.lora_a.nbytes + m.lora_b.nbytes) * 4 + m.rank_mask.nbytes + m.importance.nbytes
                    for _, m in drlora.expert_modules())
    estimate = memory.estimate_peak_bytes(model, drlora, 2, 32, grad_checkpoint=False)
    assert estimate.parts["expert LoRA state"] == allocated
    assert estimate.parts["base weights"] == base
    assert estimate.rank_flag == "--r-max"


def test_the_pooled_formula_is_what_attach_allocates(tiny_models):
    model, _ = mlx_lm_load(str(tiny_models("qwen3_moe", shape=SHAPE)))
    base = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8))
    assert drlora.config.resolved_lora_layout == "pooled"
    pools = [layer.pool for layer in drlora.layers]
    allocated = sum((p.hidden.nbytes + p.inner.nbytes) * 4 + p.importance.nbytes for p in pools)
    allocated += sum(m.slots.nbytes for _, m in drlora.expert_modules())
    estimate = memory.estimate_peak_bytes(model, drlora, 2, 32, grad_checkpoint=False)
    assert estimate.parts["expert LoRA state"] == allocated
    assert estimate.parts["base weights"] == base
    assert estimate.parts["gathered LoRA factors"] == max(
        sum(m.num_experts * 8 * (m.input_dims + m.output_dims) * 8 for m in layer.modules) for layer in drlora.layers)
    assert estimate.rank_flag == "--r-target"


def test_uniform_is_mlx_lms_lora(tiny_models):
    model, _ = mlx_lm_load(str(tiny_models("qwen3_moe", shape=SHAPE)))
    shape = model_shape(model, ("up_proj", "down_proj"), vars(model.args))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                                     "keys": ["mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]})
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    assert uniform_lora_state_bytes(shape, 4) == trainable * 4  # value, gradient, two moments


def test_hub_id_not_cached_offline(capsys):
    code, out, err = run_cli(["plan", "--model", "drlora-mlx-tests/not-a-cached-model", "--iters", "10"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err


@pytest.mark.parametrize("config,message", [
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
      "num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 256}, "model family 'llama' is not supported"),
    ({**QWEN3_30B_A3B, "num_hidden_layers": 2, "mlp_only_layers": [0, 1]}, "no MoE expert layers"),
    ({"model_type": "no_such_model"}, "mlx-lm cannot build a 'no_such_model' model"),
    ({"hidden_size": 64}, "config.json has no model_type"),
    ({**OLMOE_1B_7B, "quantization_config": {"quant_method": "bitnet"}}, "weights quantized with 'bitnet'"),
])
def test_unusable_configs_end_in_one_line(tmp_path, capsys, config, message):
    code, out, err = run_cli(["plan", "--model", write_config(tmp_path, "m", config), "--iters", "10"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_model_or_layers(tmp_path, capsys):
    folder = write_config(tmp_path, "olmoe", OLMOE_1B_7B)
    for argv, message in (([], "give --model"), (["--model", folder, "--layers", "2"], "not both"),
                          (["--layers", "2", "--experts", "4", "--batch-size", "2"], "which needs --model")):
        code, _, err = run_cli(["plan", "--iters", "10", *argv], capsys)
        assert code == 2 and message in err


def estimate(lora, rest, config, layout):
    return PeakEstimate({"lora": lora, "rest": rest}, ("lora",), memory.rank_flag(config, layout))


@pytest.mark.parametrize("config,layout,flag", [
    (DRLoRAConfig(), "pooled", "--r-target"),
    (DRLoRAConfig(), "masked", "--r-max"),
    (DRLoRAConfig(method="lora"), "masked", "--lora-rank"),
])
def test_warning_names_the_rank_flag_when_the_lora_state_does_not_fit(config, layout, flag):
    text = memory_warning(estimate(35 * GB, 60 * GB, config, layout), 100 * GB)
    assert text.startswith("warning: this run may need about 95.0 GB, more than the 100.0 GB")
    assert f"its LoRA state (35.0 GB) is what does not fit: lower {flag}, or lower --batch-size" in text
    assert "--grad-checkpoint" in text
    # the rest alone does not fit either: the rank flag is not the remedy
    text = memory_warning(estimate(10 * GB, 95 * GB, config, layout), 100 * GB)
    assert "LoRA state" not in text and "--batch-size" in text
    assert memory_warning(estimate(10 * GB, 80 * GB, config, layout), 100 * GB) is None  # 90 GB: fits


def test_default_layout():
    assert DRLoRAConfig().resolved_lora_layout == "pooled"
    assert DRLoRAConfig(allocation="global").resolved_lora_layout == "masked"
    assert DRLoRAConfig(method="lora").resolved_lora_layout == "masked"
    assert DRLoRAConfig(lora_layout="masked").resolved_lora_layout == "masked"
    for bad in (dict(method="lora"), dict(allocation="global")):
        with pytest.raises(ConfigError, match="lora_layout pooled sizes each layer's LoRA state to its rank budget"):
            DRLoRAConfig(lora_layout="pooled", **bad)


def test_weights_dtype_comes_from_the_safetensors_headers(tiny_models, tmp_path, capsys):
    """mlx-lm holds weights in the dtype they are stored in: float32 tiny weights under a config.json that names
    no dtype, or names bfloat16, are planned as float32, and count what mlx-lm loads."""
    path = tiny_models("qwen3_moe", shape=SHAPE)
    model, _ = mlx_lm_load(str(path))
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    plan = plan_json(["--model", str(path), "--iters", "10"], capsys)
    assert (plan["dtype"], plan["dtype_from"]) == ("float32", "safetensors headers")
    assert plan["base_weight_bytes"] == held
    folder = tmp_path / "claims-bfloat16"
    shutil.copytree(path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert plan_json(["--model", str(folder), "--iters", "10"], capsys)["base_weight_bytes"] == held
    for file in folder.glob("*.safetensors"):  # without weights, the config decides
        file.unlink()
    plan = plan_json(["--model", str(folder), "--iters", "10"], capsys)
    assert (plan["dtype"], plan["dtype_from"]) == ("bfloat16", "config.json")
    assert plan["base_weight_bytes"] == held // 2


def test_the_dtype_counts_bytes_not_tensors(tmp_path):
    """Many small float32 norms beside one large bfloat16 matrix: the weights are bfloat16."""
    folder = tmp_path / "m"
    folder.mkdir()
    arrays = {f"norm{i}": mx.ones((8,), dtype=mx.float32) for i in range(10)}
    mx.save_safetensors(str(folder / "a.safetensors"), {**arrays, "w": mx.ones((64, 64), dtype=mx.bfloat16)})
    mx.save_safetensors(str(folder / "b.safetensors"), {"i": mx.ones((1000,), dtype=mx.uint32)})
    assert memory.disk_dtype(str(folder), folder) == "bfloat16"
    assert memory.disk_dtype(str(folder), tmp_path) is None  # no weights, offline: nothing read
