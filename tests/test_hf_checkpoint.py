"""Tiny checkpoints in the Hugging Face layout: mlx-lm and transformers read them alike."""

import json

import numpy as np
import pytest

from .helpers import HF_FAMILIES, SHAPE, TOL, ours, theirs


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_layout_checkpoint_reads_alike_in_mlx_lm_and_transformers(tiny_models, family):
    hf = tiny_models(family, shape=SHAPE, weights_format="hf")
    mlx_logits = ours(hf)
    assert np.abs(theirs(hf) - mlx_logits).max() < TOL
    if family == "gpt_oss":  # experts in MXFP4, as the released checkpoints
        assert json.loads((hf / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    else:  # the same weights as mlx-lm's own layout
        assert np.array_equal(ours(tiny_models(family, shape=SHAPE)), mlx_logits)
