"""The peak-memory estimate made before training."""

import gc

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_lm_load

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
from drlora_mlx.formats.tiny import TinyShape
from drlora_mlx.lora.attach import attach
from drlora_mlx.training import run as train_job
from drlora_mlx.training.memory import estimate_peak_bytes, memory_warning
from drlora_mlx.training.trainer import Trainer

from .helpers import SHAPE, run_cli


def test_estimate_is_near_the_measured_peak(tiny_models):
    shape = TinyShape(hidden=128, layers=2, experts=8, top_k=2, expert_dim=64, heads=4, kv_heads=2, vocab=384)
    path = tiny_models("olmoe", shape=shape)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()  # what earlier tests still hold is not this run's
    model, _ = mlx_lm_load(str(path))
    drlora = attach(model, DRLoRAConfig())
    batch, seq = 8, 96
    estimate = estimate_peak_bytes(model, drlora, batch, seq, grad_checkpoint=False)
    trainer = Trainer(model, drlora, TrainingArgs(iters=10, batch_size=batch))
    mx.reset_peak_memory()
    rng = np.random.default_rng(0)
    for _ in range(3):
        tokens = rng.integers(3, shape.vocab, (batch, seq + 1)).astype(np.int32)
        trainer.train_step(tokens, np.tile([0, seq], (batch, 1)).astype(np.int32))
    measured = mx.get_peak_memory() - before
    assert 0.5 * measured < estimate < 2.0 * measured


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
