"""Every supported family: a tiny checkpoint, loaded by mlx-lm, adapted and trained."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load

from drlora_mlx.attach import attach
from drlora_mlx.config import DRLoRAConfig
from drlora_mlx.data import bundled_data_dir, load_datasets
from drlora_mlx.families import FAMILIES, UnsupportedModelError
from drlora_mlx.config import TrainingArgs
from drlora_mlx.trainer import Trainer

from .helpers import SHAPE


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_and_grows(tiny_models, family):
    path = tiny_models(family, shape=SHAPE)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert (path / "tokenizer.json").exists()
    model, tokenizer = mlx_lm_load(str(path))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    assert drlora.n_layers == (2 if family in ("deepseek_v2", "deepseek_v3", "glm4_moe") else 3)
    counts = drlora.parameter_counts()
    assert counts["expert_lora_allocated"] == sum(
        m.lora_a.size + m.lora_b.size for _, m in drlora.expert_modules()
    )
    train, _, _ = load_datasets(bundled_data_dir(), tokenizer, mask_prompt=True)
    args = TrainingArgs(iters=30, batch_size=4, learning_rate=5e-3, steps_per_report=1000, steps_per_eval=1000)
    trainer = Trainer(model, drlora, args)
    result = trainer.run(train)
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    ranks = drlora.ranks()
    assert result.events and (ranks.mean(axis=1) == 4).all()
    assert ranks.min() == 2 and ranks.max() > 4  # heterogeneous


def test_quantized_family_trains(tiny_models):
    model, tokenizer = mlx_lm_load(str(tiny_models("mixtral", shape=SHAPE, quantize_bits=4)))
    config = json.loads((tiny_models("mixtral", shape=SHAPE, quantize_bits=4) / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    assert type(drlora.layers[0].modules[0].linear).__name__ == "QuantizedSwitchLinear"
    # A quantized router is trained as float.
    assert type(drlora.layers[0].router).__mro__[1].__name__ == "Linear"
    train, _, _ = load_datasets(bundled_data_dir(), tokenizer, mask_prompt=True)
    result = Trainer(model, drlora, TrainingArgs(iters=30, batch_size=4, learning_rate=5e-3,
                                                 steps_per_report=1000, steps_per_eval=1000)).run(train)
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_dense_model_is_refused(tmp_path):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported; supported MoE families: deepseek_v2"):
        attach(llama.Model(args))


def test_report_names_what_was_adapted(tiny_models):
    model, _ = mlx_lm_load(str(tiny_models("qwen2_moe", shape=SHAPE)))
    drlora = attach(model, DRLoRAConfig(shared_expert_rank=4, attention_rank=2, targets="gate_proj,up_proj,down_proj"))
    report = drlora.report()
    assert "3 MoE layers x 8 experts x 3 projections (gate_proj, up_proj, down_proj) = 72 expert modules" in report
    # Shared expert: gate/up/down per layer; attention: q/k/v/o per layer.
    assert len(drlora.extra_loras) == 3 * 3 + 3 * 4
    assert "fixed-rank LoRA: 21 linear layers" in report
    x = mx.array([[5, 6, 7]])
    mx.eval(model(x))
