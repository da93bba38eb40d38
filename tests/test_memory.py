"""The peak-memory estimate made before training."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
from drlora_mlx.formats.tiny import TinyShape
from drlora_mlx.lora.attach import attach
from drlora_mlx.training import run as train_job
from drlora_mlx.training.memory import memory_plan, memory_warning
from drlora_mlx.training.trainer import Trainer

from .helpers import SHAPE, run_cli


def measured_peak(path, config, batch, seq, grad_checkpoint, loss_chunk_size=None):
    """The peak memory of real training steps of the checkpoint at ``path``, from before it was loaded."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()  # what earlier tests still hold is not this run's
    model, _ = mlx_lm_load(str(path))
    drlora = attach(model, config)
    ranks = drlora.ranks()  # one expert per module at r_max: the widest step of a run, as late in its growth
    ranks[:, 0] = config.r_max
    drlora.set_ranks(ranks)
    trainer = Trainer(model, drlora, TrainingArgs(iters=10, batch_size=batch, grad_checkpoint=grad_checkpoint,
                                                  loss_chunk_size=loss_chunk_size))
    mx.reset_peak_memory()
    rng = np.random.default_rng(0)
    for _ in range(2):
        tokens = rng.integers(3, model.args.vocab_size, (batch, seq + 1)).astype(np.int32)
        trainer.train_step(tokens, np.tile([0, seq + 1], (batch, 1)).astype(np.int32))
    return mx.get_peak_memory() - before


# Shapes outside those the estimate's counts were measured on, each with activations and logits a large
# part of the peak: float and 4-bit, with and without gradient checkpointing (8 layers: the checkpointed
# counts hold from 4 layers on), the plain and the chunked loss.
PLANNED = [
    # family, shape, bits, batch, seq, grad_checkpoint, loss_chunk_size
    ("qwen3_moe", TinyShape(hidden=192, layers=3, experts=16, top_k=4, expert_dim=192, heads=6, kv_heads=2,
                            vocab=2048), None, 4, 128, False, None),
    ("qwen3_moe", TinyShape(hidden=192, layers=8, experts=16, top_k=4, expert_dim=192, heads=6, kv_heads=2,
                            vocab=2048), None, 4, 128, True, None),
    ("olmoe", TinyShape(hidden=128, layers=4, experts=8, top_k=2, expert_dim=256, heads=4, kv_heads=4,
                        vocab=32768), None, 2, 192, False, None),
    ("olmoe", TinyShape(hidden=128, layers=8, experts=8, top_k=2, expert_dim=256, heads=4, kv_heads=4,
                        vocab=32768), None, 2, 192, True, 0),
    ("qwen3_moe", TinyShape(hidden=256, layers=2, experts=32, top_k=8, expert_dim=128, heads=4, kv_heads=2,
                            vocab=4096), 4, 2, 160, False, None),
    ("qwen3_moe", TinyShape(hidden=256, layers=8, experts=32, top_k=8, expert_dim=128, heads=4, kv_heads=2,
                            vocab=4096), 4, 2, 160, True, None),
]


@pytest.mark.parametrize("family,shape,bits,batch,seq,grad_checkpoint,chunk", PLANNED)
def test_plan_is_within_15_percent_of_the_measured_peak(tiny_models, family, shape, bits, batch, seq,
                                                       grad_checkpoint, chunk):
    path = tiny_models(family, shape=shape, quantize_bits=bits)
    config = DRLoRAConfig(train_router="always")
    plan = memory_plan(str(path), config, batch, seq, grad_checkpoint, chunk)
    measured = measured_peak(path, config, batch, seq, grad_checkpoint, chunk)

    assert 0.85 * measured <= plan["peak_bytes"] <= 1.15 * measured, (plan["peak_bytes"], measured)
    # the activations and logits are a large part of it, so the check is not the weights' alone
    assert measured - plan["base_weight_bytes"] > 0.4 * measured


def test_warning_names_the_remedies():
    assert memory_warning(10, 100) is None
    text = memory_warning(95 * 10**9, 100 * 10**9)
    assert text.startswith("warning: this run may need about 95.0 GB, more than the 100.0 GB")
    assert "--batch-size" in text and "--grad-checkpoint" in text


def test_train_warns_before_starting(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_job, "available_bytes", lambda: 1000)
    code, out, err = run_cli(["train", "--model", str(tiny_models("qwen3_moe", shape=SHAPE)), "--iters", "2",
                              "--r-init", "2", "--r-target", "4", "--r-max", "8", "--method", "lora",
                              "--adapter-path", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "warning: this run may need about" in out and "more than the 0.0 GB" in out
