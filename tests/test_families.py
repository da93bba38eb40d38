"""Every supported family: a tiny checkpoint, loaded by mlx-lm, adapted, trained, saved for stock mlx-lm."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
from drlora_mlx.data.loading import bundled_data_dir, load_datasets
from drlora_mlx.families import FAMILIES, REFUSED, UnsupportedModelError, lookup
from drlora_mlx.formats.adapters import save_adapter
from drlora_mlx.lora.attach import attach
from drlora_mlx.lora.routing import router_linear
from drlora_mlx.training.trainer import Trainer

from .helpers import SHAPE, padded_batch

TINY = sorted(n for n, f in FAMILIES.items() if f.tiny is not None)
# granitemoe's quantization uses groups of 64, more than the tiny model's expert size.
QUANTIZED = [f for f in TINY if f != "granitemoe"]


def _moe_layers(model) -> int:
    return sum(any(isinstance(m, (SwitchGLU, SwitchMLP)) for _, m in layer.named_modules()) for layer in model.layers)


def _train(model, tokenizer, drlora, iters=30):
    train, _, _ = load_datasets(bundled_data_dir(), tokenizer, mask_prompt=True)
    args = TrainingArgs(iters=iters, batch_size=4, learning_rate=5e-3, steps_per_report=1000, steps_per_eval=1000)
    return Trainer(model, drlora, args).run(train)


@pytest.mark.parametrize("family", TINY)
def test_family_trains_grows_and_loads_in_stock_mlx_lm(tiny_models, tmp_path, family):
    path = tiny_models(family, shape=SHAPE)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert (path / "tokenizer.json").exists()
    model, tokenizer = mlx_lm_load(str(path))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    assert drlora.n_layers == _moe_layers(model) >= 2
    assert drlora.routing_signal == ("count" if FAMILIES[family].weights is None else "weight"), drlora.notes
    counts = drlora.parameter_counts()
    # The pooled layout: per MoE layer N_mod x r_target rank slots and the null slot, each H + I values.
    assert counts["expert_lora_allocated"] == sum(
        (sum(m.num_experts for m in layer.modules) * 4 + 1) * (layer.modules[0].input_dims + layer.modules[0].output_dims)
        for layer in drlora.layers
    )
    result = _train(model, tokenizer, drlora)
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    ranks = drlora.ranks()
    assert result.events and (ranks.mean(axis=1) == 4).all()
    assert ranks.min() == 2 and ranks.max() > 4  # heterogeneous

    # Stock mlx-lm computes drlora-mlx's logits from the saved adapter.
    written = save_adapter(drlora, tmp_path, str(path))
    if written["router_trained"] and not written["router_in_mlx_lm_adapter"]:
        # mlx-lm's adapter format cannot carry a router without a linear layer (a bare weight):
        # stock mlx-lm then computes the adapter with the untrained router, as the save says.
        for layer, base in zip(drlora.layers, drlora.router_base):
            router_linear(layer.router)[1].weight = base
    model.eval()
    x = padded_batch(SHAPE.vocab, seed=5)[0]
    want = model(x)
    stock, _ = mlx_lm_load(str(path), adapter_path=str(tmp_path))
    assert mx.allclose(stock(x), want, atol=1e-4, rtol=1e-4)
    base, _ = mlx_lm_load(str(path))
    assert mx.abs(base(x) - want).max().item() > 1e-2


@pytest.mark.parametrize("family", QUANTIZED)
def test_family_trains_on_a_4bit_base(tiny_models, family):
    path = tiny_models(family, shape=SHAPE, quantize_bits=4)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    model, tokenizer = mlx_lm_load(str(path))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    assert type(drlora.layers[0].modules[0].linear).__name__ == "QuantizedSwitchLinear"
    assert "QuantizedLinear" not in [type(m).__mro__[1].__name__ for _, m in drlora.layers[0].router.named_modules()]
    assert drlora.routing_signal == ("count" if FAMILIES[family].weights is None else "weight"), drlora.notes
    result = _train(model, tokenizer, drlora)
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert (drlora.ranks().mean(axis=1) == 4).all()


def test_quantized_router_trains_in_float(tiny_models):
    model, _ = mlx_lm_load(str(tiny_models("mixtral", shape=SHAPE, quantize_bits=4)))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    assert type(drlora.layers[0].router).__mro__[1].__name__ == "Linear"


def test_a_wrong_routing_rule_is_caught_at_attach_time(tiny_models, monkeypatch):
    from dataclasses import replace

    from drlora_mlx.families.rules import softmax_then_topk

    wrong = replace(FAMILIES["qwen3_moe"], weights=softmax_then_topk())  # forgets Qwen3's renormalisation
    monkeypatch.setitem(FAMILIES, "qwen3_moe", wrong)
    model, _ = mlx_lm_load(str(tiny_models("qwen3_moe", shape=SHAPE)))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8))
    assert drlora.routing_signal == "count"
    assert len(drlora.notes) == 1
    assert drlora.notes[0].startswith("qwen3_moe: the weights its MoE blocks apply differ from the family's "
                                      "routing-weight rule (mlx-lm ")
    assert "'count' signal" in drlora.report()


def test_dense_model_is_refused(tmp_path):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported; supported MoE families: .*qwen3_5_moe"):
        attach(llama.Model(args))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_say_why(family):
    model = type("Model", (), {"__module__": f"mlx_lm.models.{family}"})()
    with pytest.raises(UnsupportedModelError, match=f"model family '{family}' is not supported: .{{40,}}"):
        lookup(model)


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
