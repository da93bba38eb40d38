"""Tiny checkpoints in the Hugging Face layout: mlx-lm and transformers read them alike."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from drlora_mlx.formats.adapters import load as drlora_load
from drlora_mlx.families import FAMILIES

from .helpers import SHAPE

TOL = 1e-4  # float32 logits
TOKENS = np.random.default_rng(7).integers(3, SHAPE.vocab, size=(3, 16)).astype(np.int32)


def ours(model, adapter=None) -> np.ndarray:
    """drlora-mlx's logits (through mlx-lm) for TOKENS."""
    m, _, _ = drlora_load(str(model), adapter)
    return np.array(m(mx.array(TOKENS)))


# Every family drlora-mlx writes in the Hugging Face layout (and exports to PEFT).
HF_FAMILIES = sorted(n for n, f in FAMILIES.items() if f.hf is not None and not f.export_refusal)


def hf_model_class(model):
    """The transformers class that reads a checkpoint: its causal LM, else (a multimodal wrapper) its
    image-text-to-text model, else the class its config names."""
    config = transformers.AutoConfig.from_pretrained(str(model))
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    return getattr(transformers, config.architectures[0])


def theirs(model, adapter=None) -> np.ndarray:
    """transformers' logits for TOKENS, with a PEFT adapter when given."""
    m = hf_model_class(model).from_pretrained(str(model), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter))
    with torch.no_grad():
        return m.eval()(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_layout_checkpoint_reads_alike_in_mlx_lm_and_transformers(tiny_models, family):
    hf = tiny_models(family, shape=SHAPE, weights_format="hf")
    mlx_logits = ours(hf)
    assert np.abs(theirs(hf) - mlx_logits).max() < TOL
    if family == "gpt_oss":  # experts in MXFP4, as the released checkpoints
        assert json.loads((hf / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    else:  # the same weights as mlx-lm's own layout
        assert np.array_equal(ours(tiny_models(family, shape=SHAPE)), mlx_logits)
