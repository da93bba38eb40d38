"""An mlx_lm.lora configuration, flags and habits, read with mlx_lm.lora's meaning.

mlx-lm's own example config trains as written; every optimizer mlx_lm.lora
offers takes the step its mlx.optimizers class defines; --num-layers adapts the
last N layers; mlx-lm's lr_schedule block gives mlx-lm's learning rates; the
reporting callbacks get mlx-lm's report dicts; every bad value ends in one line.
"""

import json
import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.tuner import callbacks
from mlx_lm.tuner.lora import LoRALinear

from drlora_mlx.config.settings import (
    ConfigError,
    DRLoRAConfig,
    TrainingArgs,
    read_yaml,
    resolve,
)
from drlora_mlx.data.loading import bundled_data_dir
from drlora_mlx.formats.adapters import load as drlora_load
from drlora_mlx.formats.tiny import TinyShape
from drlora_mlx.lora.attach import attach
from drlora_mlx.training import run as train_module
from drlora_mlx.training.optimizers import (
    OPTIMIZER_CLASSES,
    learning_rate_schedule,
    needs_rank_guard,
    optimizer_kwargs,
)
from drlora_mlx.training.trainer import Trainer

from .helpers import (
    SHAPE,
    attached,
    heterogeneous_ranks,
    padded_batch,
    randomize_b,
    read_metrics,
    run_cli,
)
from .reference import Reference

# mlx-lm's examples/lora_config.yaml as mlx-lm ships it (mlx_lm/examples/lora_config.yaml), with the
# model, data and adapter paths changed and fewer iterations.
MLX_LM_EXAMPLE = """\
# The path to the local model directory or Hugging Face repo.
model: "{model}"

# Whether or not to train (boolean)
train: true

# The fine-tuning method: "lora", "dora", or "full".
fine_tune_type: lora

# The Optimizer with its possible inputs
optimizer: adamw
# optimizer_config:
#   adamw:
#     betas: [0.9, 0.98]
#     eps: 1e-6
#     weight_decay: 0.05
#     bias_correction: true

# Directory with {{train, valid, test}}.jsonl files
data: "{data}"

# The PRNG seed
seed: 0

# Number of layers to fine-tune
num_layers: 16

# Minibatch size.
batch_size: 4

# Iterations to train for.
iters: 10

# Number of validation batches, -1 uses the entire validation set.
val_batches: 25

# Adam learning rate.
learning_rate: 1e-5

# Services to report logs to (comma-separated): wandb, swanlab, or both ('wandb,swanlab').
# report_to: wandb,swanlab
# project_name: "Your-awesome-mlx-project-name"

# Number of training steps between loss reporting.
steps_per_report: 10

# Number of training steps between validations.
steps_per_eval: 200

# Number of micro-steps to accumulate before each optimizer update.
grad_accumulation_steps: 1

# Load path to resume training with the given adapter weights.
resume_adapter_file: null

# Save/load path for the trained adapter weights.
adapter_path: "{adapter_path}"

# Save the model every N iterations.
save_every: 100

# Evaluate on the test set after training
test: false

# Number of test set batches, -1 uses the entire test set.
test_batches: 100

# Maximum sequence length.
max_seq_length: 2048

# Use gradient checkpointing to reduce memory use.
grad_checkpoint: false

# LoRA parameters can only be specified in a config file
lora_parameters:
  # The layer keys to apply LoRA to.
  # These will be applied for the last lora_layers
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0

# Schedule can only be specified in a config file, uncomment to use.
#lr_schedule:
#  name: cosine_decay
#  warmup: 100 # 0 for no warmup
#  warmup_init: 1e-7 # 0 if not specified
#  arguments: [1e-5, 1000, 1e-7] # passed to scheduler

#hf_dataset:
#  path: "billsum"
#  train_split: "train[:1000]"
#  valid_split: "train[-100:]"
#  prompt_feature: "text"
#  completion_feature: "summary"
"""

DEEP = TinyShape(layers=18)  # more layers than the example's num_layers: 16
QUICK = ["--iters", "10", "--batch-size", "4", "--learning-rate", "5e-3", "--steps-per-report", "5",
         "--steps-per-eval", "5", "--val-batches", "2", "--mask-prompt"]


def _np(x):
    return np.asarray(x, dtype=np.float64)


def _layer_of(path: str) -> int:
    return int(path.split("model.layers.")[1].split(".")[0])


# ----- (a) mlx-lm's example config ---------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "drlora"])
def test_mlx_lm_example_config_trains_as_it_means(tiny_models, tmp_path, capsys, method):
    model_path = tiny_models("qwen3_moe", shape=DEEP)
    out_dir = tmp_path / "adapters"
    cfg = tmp_path / "lora_config.yaml"
    cfg.write_text(MLX_LM_EXAMPLE.format(model=model_path, data=bundled_data_dir(), adapter_path=out_dir))
    argv = ["train", "-c", str(cfg)] + (["--method", "drlora"] if method == "drlora" else [])
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err

    saved = json.loads((out_dir / "drlora_config.json").read_text())
    m = saved["method"]
    assert m["method"] == method  # fine_tune_type: lora, unless --method says otherwise
    assert (m["lora_rank"], m["scale"], m["num_layers"]) == (8, 20.0, 16)
    assert (m["r_init"], m["r_target"], m["r_max"]) == (4, 8, 16)
    assert m["lora_keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert m["targets"] == ["up_proj", "down_proj"]  # the keys name no expert projection
    t = saved["training"]
    assert (t["optimizer"], t["learning_rate"], t["iters"], t["batch_size"], t["test_batches"]) == (
        "adamw", 1e-5, 10, 4, 100)
    assert t["train"] is True and t["resume_adapter_file"] is None

    ours, _, drlora = drlora_load(str(model_path), out_dir)
    last16 = set(range(2, 18))
    assert [layer.index for layer in drlora.layers] == sorted(last16)
    extra = {path: lora for path, lora in drlora.extra_loras}
    assert set(extra) == {f"model.layers.{i}.self_attn.{p}" for i in last16 for p in ("q_proj", "v_proj")}
    for lora in extra.values():
        assert isinstance(lora, LoRALinear) and lora.lora_a.shape[1] == 8 and lora.scale == 20.0
    for _, module in drlora.expert_modules():
        assert module.scale == 20.0 and module.r_max == (8 if method == "lora" else 16)
    assert drlora.ranks().mean() == 8.0  # uniform rank 8, or DR-LoRA's budget r_target = 8 delivered
    if method == "drlora":
        assert drlora.ranks().min() < 8 < drlora.ranks().max()
    for i in (0, 1):  # the first two layers are not adapted
        assert type(ours.model.layers[i].self_attn.q_proj).__name__ == "Linear"

    records = read_metrics(out_dir)
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    assert len(val) == 2 and val[-1] < val[0]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")

    # mlx-lm rebuilds the same LoRA layers (the last 16, these keys) from adapter_config.json.
    cfg_saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg_saved["num_layers"] == 16
    assert {"self_attn.q_proj", "self_attn.v_proj"} <= set(cfg_saved["lora_parameters"]["keys"])
    stock, _ = mlx_lm_load(str(model_path), adapter_path=str(out_dir))
    x = padded_batch(384, seed=3)[0]
    assert mx.allclose(stock(x), ours(x), atol=1e-4, rtol=1e-4)


def test_yaml_numbers_with_an_exponent_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1e-5\nb: 2.5E+3\nc: -3e4\nd: .5e-2\ne: '1e-5'\nf: 1_000\ng: 1.0e-3\nh: 7\n")
    assert read_yaml(str(path)) == {"a": 1e-5, "b": 2500.0, "c": -30000.0, "d": 0.005, "e": "1e-5", "f": 1000,
                                    "g": 0.001, "h": 7}


def test_mlx_lm_keys_map_onto_the_fields():
    lora = {"keys": ["self_attn.q_proj", "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.fc2"], "rank": 6,
            "scale": 10.0, "dropout": 0.0}
    args, config = resolve({}, {"fine_tune_type": "lora", "lora_parameters": lora, "training_mode": "normal",
                                "config": None})
    assert config.method == "lora" and config.lora_rank == 6 and config.scale == 10.0
    assert (config.r_init, config.r_target, config.r_max) == (3, 6, 12)
    assert config.targets == ("gate_proj", "down_proj") and config.lora_keys == ("self_attn.q_proj",)
    # A field named in the file or on the command line wins over one derived from mlx-lm's keys.
    _, config = resolve({"method": "drlora", "r_max": 20}, {"fine_tune_type": "lora", "r_init": 2,
                                                            "targets": ["up_proj"], "lora_parameters": lora})
    assert config.method == "drlora" and (config.r_init, config.r_target, config.r_max) == (2, 6, 20)
    assert config.targets == ("up_proj",)
    _, config = resolve({"fine_tune_type": "lora"})
    assert config.method == "lora"
    args, _ = resolve({}, {"optimizer": "AdamW", "clear_cache_threshold": "1.5GB", "test_batches": 7})
    assert (args.optimizer, args.clear_cache_threshold, args.test_batches) == ("adamw", 1_500_000_000, 7)
    assert resolve({"clear_cache_threshold": "500M"})[0].clear_cache_threshold == 500_000_000


# ----- (b) optimizers ----------------------------------------------------------------


def _reference_step(name, p, g, lr, mask, kwargs):
    """mlx.optimizers' first update of a parameter, in float64 numpy, with masked entries kept."""
    if name == "sgd":
        g = g + kwargs.get("weight_decay", 0.0) * p
        m = kwargs.get("momentum", 0.0)
        update = g + m * g if kwargs.get("nesterov") else g  # the first velocity is the gradient
        new = p - lr * update
    else:  # adam, bias_correction off: m = (1 - b1) g, v = (1 - b2) g^2
        b1, b2 = kwargs["betas"]
        new = p - lr * (1 - b1) * g / (np.sqrt((1 - b2) * g * g) + kwargs["eps"])
    return np.where(mask, new, p)


@pytest.mark.parametrize("layout", ["pooled", "masked"])
@pytest.mark.parametrize("name,kwargs", [
    ("sgd", {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1}),
    ("adam", {"betas": [0.8, 0.99], "eps": 1e-3}),  # (an eps the float32 gradients of tiny entries cannot tip)
])
def test_one_step_equals_the_optimizer_formula(tiny_models, name, kwargs, layout):
    """Every active rank moves by the optimizer's formula (compared in the dense view A * mask, B * mask)."""
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router="never", lora_layout=layout)
    heterogeneous_ranks(drlora, seed=4)
    randomize_b(drlora, seed=4)
    reference = Reference(tiny_models("qwen3_moe", shape=SHAPE), drlora)
    reference.sync()
    batch, lengths = padded_batch(384, seed=7)
    _, tokens, grads = reference.loss_and_grads(batch, lengths)
    before = {p: (*(_np(f) for f in m.masked_factors()), _np(m.active_mask()) > 0) for p, m in drlora.expert_modules()}
    args = TrainingArgs(iters=100, batch_size=3, learning_rate=0.05, lr_schedule="constant", optimizer=name,
                        optimizer_config={name: kwargs})
    trainer = Trainer(model, drlora, args)
    trainer.train_step(batch, lengths)
    lr = float(trainer.lora_optimizer.learning_rate.item())
    assert lr == pytest.approx(0.05 / trainer.schedule.warmup_steps)  # the first warm-up step
    for path, m in drlora.expert_modules():
        a0, b0, mask = before[path]
        ga, gb = (g / tokens for g in grads[path])
        want_a = _reference_step(name, a0, ga, lr, mask[..., None], kwargs)
        want_b = _reference_step(name, b0, gb, lr, mask[:, None, :], kwargs)
        a1, b1 = (_np(f) for f in m.masked_factors())
        assert np.allclose(a1, want_a, rtol=1e-4, atol=1e-7), path
        assert np.allclose(b1, want_b, rtol=1e-4, atol=1e-7), path
        assert np.abs(b1 - b0).max() > 1e-4


@pytest.mark.parametrize("name,kwargs,guard", [
    ("adam", {}, False), ("adamw", {}, False), ("adamw", {"weight_decay": 0.05}, True), ("muon", {}, True),
    ("sgd", {"momentum": 0.9}, False), ("sgd", {"weight_decay": 0.1}, True), ("adafactor", {}, False),
    ("adafactor", {"weight_decay": 0.1}, True),
])
def test_rank_guard_is_needed_exactly_when_the_optimizer_moves_zero_gradient_entries(name, kwargs, guard):
    args = TrainingArgs(iters=10, optimizer=name, optimizer_config={name: kwargs})
    assert needs_rank_guard(args) is guard
    # An expert factor (experts, ranks, inputs) whose expert e has 2 + e active ranks: no gradient
    # reaches the others.
    p = mx.random.normal((4, 6, 16), key=mx.random.key(0))
    active = mx.arange(6)[None, :] < (2 + mx.arange(4))[:, None]
    g = mx.random.normal(p.shape, key=mx.random.key(1)) * active[..., None]
    opt = OPTIMIZER_CLASSES[name](learning_rate=1e-2, **optimizer_kwargs(args))
    new = opt.apply_gradients({"p": g}, {"p": p})["p"]
    moved = bool(mx.any(mx.logical_and(new != p, mx.logical_not(active[..., None]))).item())
    assert moved is guard


# Learning rates at which each optimizer lowers the loss of one batch within a few steps.
OPTIMIZER_RUNS = {
    "adam": ({}, 1e-2), "adamw": ({"weight_decay": 0.1}, 1e-2), "muon": ({}, 2e-2),
    "sgd": ({"momentum": 0.9, "weight_decay": 0.1}, 0.5), "adafactor": ({}, 1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_RUNS))
def test_every_optimizer_trains_and_keeps_inactive_ranks(tiny_models, name):
    """Masked layout: the inactive ranks' factors stay as they were (the pooled layout's free
    slots under every optimizer: test_pooled_lora)."""
    kwargs, lr = OPTIMIZER_RUNS[name]
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router="always", lora_layout="masked")
    heterogeneous_ranks(drlora, seed=5)
    before = {p: (_np(m.lora_a), _np(m.lora_b), _np(m.rank_mask) == 0) for p, m in drlora.expert_modules()}
    router = _np(drlora.layers[0].router.weight)
    args = TrainingArgs(iters=1000, batch_size=3, learning_rate=lr, lr_schedule="constant", optimizer=name,
                        optimizer_config={name: kwargs})
    trainer = Trainer(model, drlora, args)
    assert type(trainer.lora_optimizer) is OPTIMIZER_CLASSES[name]
    assert type(trainer.optimizer.optimizers[0]) is OPTIMIZER_CLASSES[name]  # the router's
    batch = padded_batch(384, seed=8)
    losses = [trainer.train_step(*batch)[0] for _ in range(8)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.01, losses
    for path, m in drlora.expert_modules():
        a0, b0, inactive = before[path]
        assert np.array_equal(_np(m.lora_a)[inactive], a0[inactive]), path
        assert np.array_equal(_np(m.lora_b).transpose(0, 2, 1)[inactive], b0.transpose(0, 2, 1)[inactive]), path
    assert not np.array_equal(_np(drlora.layers[0].router.weight), router)  # the router trains with it


# ----- (c) --num-layers --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4, -1])
def test_num_layers_adapts_exactly_the_last_n(tiny_models, n):
    model, _ = mlx_lm_load(str(tiny_models("qwen3_moe", shape=TinyShape(layers=4))))
    drlora = attach(model, DRLoRAConfig(num_layers=n, attention_rank=2))
    want = list(range(4 - n, 4)) if n != -1 else [0, 1, 2, 3]
    assert [layer.index for layer in drlora.layers] == want
    assert sorted({_layer_of(p) for p, _ in drlora.extra_loras}) == want
    trained = {_layer_of(k) for k, _ in tree_flatten(model.trainable_parameters())}
    assert sorted(trained) == want


def test_num_layers_and_lora_keys_through_the_cli_load_in_mlx_lm(tiny_models, tmp_path, capsys):
    model_path = tiny_models("qwen3_moe", shape=TinyShape(layers=4))
    out_dir = tmp_path / "n2"
    code, _, err = run_cli(["train", "--model", str(model_path), "--adapter-path", str(out_dir), "--num-layers", "2",
                            "--lora-keys", "self_attn.o_proj,self_attn.k_proj", "--lora-rank", "4", "--r-init", "2",
                            "--r-target", "4", "--r-max", "8", *QUICK], capsys)
    assert code == 0, err
    saved = json.loads((out_dir / "drlora_config.json").read_text())
    assert [entry["layer"] for entry in saved["layers"]] == [2, 3]
    assert json.loads((out_dir / "adapter_config.json").read_text())["num_layers"] == 2
    ours, _, drlora = drlora_load(str(model_path), out_dir)
    assert {p for p, _ in drlora.extra_loras} == {f"model.layers.{i}.self_attn.{k}" for i in (2, 3)
                                                  for k in ("o_proj", "k_proj")}
    stock, _ = mlx_lm_load(str(model_path), adapter_path=str(out_dir))
    base, _ = mlx_lm_load(str(model_path))
    x = padded_batch(384, seed=4)[0]
    assert mx.allclose(stock(x), ours(x), atol=1e-4, rtol=1e-4)
    assert mx.abs(base(x) - ours(x)).max().item() > 1e-3


# ----- (d) mlx-lm's lr_schedule block --------------------------------------------------


def _cosine_block_lr(step, init=1e-3, decay=20, end=1e-5, warmup=5, warmup_init=1e-6):
    """The block {cosine_decay, warmup 5, warmup_init 1e-6, arguments [1e-3, 20, 1e-5]} by hand:
    a linear warm-up over steps 0..5, then a cosine from step 6 on."""
    if step <= warmup:
        return warmup_init + (init - warmup_init) * step / warmup
    s = min(step - warmup - 1, decay)
    return end + (init - end) * 0.5 * (1 + math.cos(math.pi * s / decay))


BLOCK = {"name": "cosine_decay", "warmup": 5, "warmup_init": 1e-6, "arguments": [1e-3, 20, 1e-5]}


def test_lr_schedule_block_is_mlx_lm_formula_and_scales_for_the_router():
    args = TrainingArgs(iters=30, learning_rate=2e-3, router_learning_rate=5e-4, lr_schedule=BLOCK)
    lora, router = learning_rate_schedule(args, 3), learning_rate_schedule(args, 3, args.router_learning_rate)
    for step in (0, 1, 3, 5, 6, 7, 12, 26, 29):
        want = _cosine_block_lr(step)
        assert float(lora(mx.array(step)).item()) == pytest.approx(want, rel=1e-5), step
        assert float(router(mx.array(step)).item()) == pytest.approx(want * 0.25, rel=1e-5), step


def test_lr_schedule_block_in_a_yaml_run(tiny_models, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr_schedule:\n  name: cosine_decay\n  warmup: 5\n  warmup_init: 1e-6\n"
                   "  arguments: [1e-3, 20, 1e-5]\nsteps_per_report: 1\n")
    out_dir = tmp_path / "sched"
    code, _, err = run_cli(["train", "-c", str(cfg), "--model", str(tiny_models("qwen3_moe", shape=SHAPE)),
                            "--adapter-path", str(out_dir), *QUICK[:4], "--method", "lora", "--lora-rank", "2"],
                           capsys)
    assert code == 0, err
    lrs = {r["step"]: r["lr"] for r in read_metrics(out_dir) if r["kind"] == "train"}
    assert sorted(lrs) == list(range(1, 11))
    for it, lr in lrs.items():  # the lr reported after update `it` is the one it used: step it - 1
        assert lr == pytest.approx(_cosine_block_lr(it - 1), rel=1e-5), it


# ----- reporting, cache, data, tokenizer --------------------------------------------


def test_report_to_calls_mlx_lm_callbacks_with_mlx_lm_keys(tiny_models, tmp_path, capsys, monkeypatch):
    calls = {"init": [], "log": []}
    fake = SimpleNamespace(init=lambda **kw: calls["init"].append(kw),
                           log=lambda data, step=None: calls["log"].append((data, step)))
    monkeypatch.setattr(callbacks, "wandb", fake)
    out_dir = tmp_path / "reported"
    code, _, err = run_cli(["train", "--model", str(tiny_models("qwen3_moe", shape=SHAPE)), "--adapter-path",
                            str(out_dir), "--report-to", "wandb", "--project-name", "moe-runs", *QUICK], capsys)
    assert code == 0, err
    (init,) = calls["init"]
    assert init["project"] == "moe-runs" and init["dir"] == str(out_dir) and init["name"] == "reported"
    assert init["config"]["r_init"] == 8 and init["config"]["iters"] == 10
    records = read_metrics(out_dir)
    train = [(d, s) for d, s in calls["log"] if "train_loss" in d]
    val = [(d, s) for d, s in calls["log"] if "val_loss" in d]
    want = [r for r in records if r["kind"] == "train"]
    assert [s for _, s in train] == [r["step"] for r in want] == [5, 10]
    for (d, _), r in zip(train, want):
        assert set(d) == {"iteration", "train_loss", "learning_rate", "iterations_per_second", "tokens_per_second",
                          "trained_tokens", "peak_memory"}
        assert (d["train_loss"], d["learning_rate"], d["trained_tokens"]) == (r["loss"], r["lr"], r["trained_tokens"])
        assert d["peak_memory"] == r["peak_memory_gb"] and d["iterations_per_second"] > 0
    want_val = [r for r in records if r["kind"] == "val"]
    assert [d["iteration"] for d, _ in val] == [r["step"] - 1 for r in want_val] == [0, 4, 9]
    assert [d["val_loss"] for d, _ in val] == [r["val_loss"] for r in want_val]
    assert all(set(d) == {"iteration", "val_loss", "val_time"} and d["val_time"] > 0 for d, _ in val)


@pytest.mark.parametrize("threshold,cached,clears", [(None, 10**9, 0), ("8GB", 10**9, 0), ("100MB", 10**9, 6),
                                                     (0, 1, 6), (0, 0, 0)])
def test_clear_cache_threshold(tiny_models, monkeypatch, threshold, cached, clears):
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router="never")
    cleared = []
    monkeypatch.setattr(mx, "get_cache_memory", lambda: cached)
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    rows = [(list(range(3, 23)), 0)] * 12
    args = TrainingArgs(iters=6, batch_size=3, steps_per_eval=1000, clear_cache_threshold=threshold)
    Trainer(model, drlora, args).run(rows)
    assert len(cleared) == clears


def test_hf_dataset_features_and_trust_remote_code_reach_the_loaders(tiny_models, tmp_path, capsys, monkeypatch):
    seen = {}
    real_load_datasets, real_load = train_module.load_datasets, mlx_lm_load

    def load_datasets(data, tokenizer, mask_prompt, **kw):
        seen.update(data=data, **kw)
        kw["notes"].append("loaded 1 Hugging Face dataset")
        return real_load_datasets(bundled_data_dir(), tokenizer, mask_prompt, need_test=kw["need_test"])

    def load(path, **kw):
        seen["load"] = kw
        return real_load(path, **kw)

    monkeypatch.setattr(train_module, "load_datasets", load_datasets)
    monkeypatch.setattr("mlx_lm.load", load)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hf_dataset:\n  path: some/dataset\n  train_split: train[:80%]\nprompt_feature: question\n"
                   "trust_remote_code: true\n")
    code, out, err = run_cli(["train", "-c", str(cfg), "--model", str(tiny_models("qwen3_moe", shape=SHAPE)),
                              "--adapter-path", str(tmp_path / "hf"), "--completion-feature", "answer", *QUICK],
                             capsys)
    assert code == 0, err
    assert seen["data"] is None and "bundled tasks" not in out  # no fall-back to the bundled tasks
    assert seen["hf_dataset"] == {"path": "some/dataset", "train_split": "train[:80%]"}
    assert seen["features"] == {"prompt_feature": "question", "completion_feature": "answer",
                                "chat_feature": "messages", "text_feature": "text"}
    assert "loaded 1 Hugging Face dataset" in out
    assert seen["load"] == {"tokenizer_config": {"trust_remote_code": True}, "trust_remote_code": True}


# ----- (e) bad values ----------------------------------------------------------------

BAD_YAML = {
    "fine_tune_type: dora\n": "fine_tune_type dora: drlora-mlx trains LoRA only",
    "fine_tune_type: full\n": "fine_tune_type full: drlora-mlx trains LoRA only",
    "fine_tune_type: qlora\n": "fine_tune_type must be lora; got 'qlora'",
    "training_mode: dpo\n": "training_mode 'dpo': drlora-mlx trains on the next-token loss only",
    "config: other.yaml\n": "a config file cannot name another",
    "optimizer: lion\n": "optimizer must be one of adam, adamw, muon, sgd, adafactor; got 'lion'",
    "optimizer_config: {adamw: {beta: [0.9, 0.9]}}\n": "AdamW has no argument 'beta'; it takes betas, eps",
    "optimizer_config: {adamww: {}}\n": "unknown optimizer 'adamww' (did you mean adamw?)",
    "optimizer_config: {sgd: {learning_rate: 1}}\n": "set learning_rate or lr_schedule instead",
    "optimizer_config: {adam: 3}\n": "optimizer_config.adam must map argument names to values",
    "optimizer_config: [adam]\n": "optimizer_config must be dict, got ['adam']",
    "optimizer: adam\nweight_decay: 0.1\n": "adam has no weight decay",
    "weight_decay: 0.1\noptimizer_config: {adamw: {weight_decay: 0.2}}\n": "weight decay given twice",
    "lr_schedule: wavy\n": "lr_schedule must be one of linear, cosine, constant; got 'wavy'",
    "lr_schedule: {name: cosine_decay, arguments: [1e-5, 10], warmpu: 3}\n":
        "unknown key 'warmpu' (did you mean warmup?)",
    "lr_schedule: {name: wobble, arguments: [1e-5]}\n": "lr_schedule: name must be one of cosine_decay",
    "lr_schedule: {name: cosine_decay}\n": "lr_schedule: arguments must be a list of numbers",
    "lr_schedule: {name: cosine_decay, arguments: [1e-5, 10, 0, 4, 5]}\n":
        "cosine_decay(1e-05, 10, 0, 4, 5) cannot be made",
    "lr_schedule: {name: cosine_decay, arguments: [1e-5, 10], warmup: -1}\n": "warmup must be a whole number",
    "lr_schedule: {name: cosine_decay, arguments: [1e-5, 10], warmup_init: x}\n": "warmup_init must be a number",
    "lora_parameters: {rank: 8, dropout: 0.05}\n": "lora_parameters.dropout 0.05: drlora-mlx has no LoRA dropout",
    "lora_parameters: {rnak: 8}\n": "lora_parameters: unknown key 'rnak' (did you mean rank?)",
    "lora_parameters: {alpha: 16}\n": "unknown key 'alpha' (mlx-lm's LoRA takes scale",
    "lora_parameters: {rank: 0}\n": "lora_parameters.rank must be a whole number of at least 1; got 0",
    "lora_parameters: {scale: big}\n": "lora_parameters.scale must be a number, got 'big'",
    "lora_parameters: {keys: self_attn.q_proj}\n": "lora_parameters.keys must be a list of module paths",
    "lora_parameters: [8]\n": "lora_parameters must be a mapping",
    "lora_parameters: {keys: [self_attn.nope]}\n": "lora_keys: 'self_attn.nope' matches no module of the adapted "
                                                   "decoder layers; their linear modules include self_attn.k_proj, "
                                                   "self_attn.o_proj",
    "lora_keys: [mlp.gate]\n": "lora_keys: mlp.gate is the MoE router",
    "lora_keys: [self_attn]\n": "lora_keys: self_attn is a Attention, not a linear layer",
    "lora_keys: [self_attn.q_proj, self_attn.q_proj]\n": "lora_keys lists a module twice",
    "lora_keys: [self_attn.q_proj]\nattention_rank: 2\n": "lora_keys: self_attn.q_proj is adapted already",
    "lora_keys: [1, 2]\n": "lora_keys must be a comma list or a list of names",
    "num_layers: 0\n": "num_layers must be -1 (all decoder layers) or at least 1; got 0",
    "num_layers: -2\n": "num_layers must be at least -1; got -2",
    "num_layers: 16\n": "num_layers 16: the model has 3 decoder layers; give at most 3, or -1 for all",
    "num_layers: many\n": "num_layers must be int, got 'many'",
    "clear_cache_threshold: lots\n": "clear_cache_threshold must be a byte count such as 1000000, 500MB or 8GB",
    "clear_cache_threshold: -5\n": "clear_cache_threshold must be a byte count",
    "report_to: tensorboard\n": "report_to: unknown service 'tensorboard'; choose from wandb, swanlab",
    "report_to: swanlab\n": "report_to swanlab: the swanlab package is not installed; pip install swanlab",
    "project_name: [a]\n": "project_name must be str, got ['a']",
    "hf_dataset: 5\n": "hf_dataset must be dict, got 5",
    "hf_dataset: [1, 2]\n": "hf_dataset must be a mapping",
    "hf_dataset: []\n": "hf_dataset must be a mapping",
    "prompt_feature: 3\n": "prompt_feature must be str, got 3",
    "completion_feature: [x]\n": "completion_feature must be str",
    "chat_feature: 1.5\n": "chat_feature must be str",
    "text_feature: true\n": "text_feature must be str",
    "train: maybe\n": "train must be bool, got 'maybe'",
    "trust_remote_code: 'yes'\n": "trust_remote_code must be bool, got 'yes'",
    "resume_adapter_file: 3\n": "resume_adapter_file must be str, got 3",
    "test_batches: -2\n": "test_batches must be at least -1; got -2",
    "optimizer_config: {muon: {nesterov: true, momentm: 0.9}}\n": "Muon has no argument 'momentm'",
}

BAD_FLAGS = {
    ("--optimizer", "lion"): "'lion' is not one of 'adam', 'adamw', 'muon', 'sgd', 'adafactor'",
    ("--optimizer", "adam", "--weight-decay", "0.1"): "adam has no weight decay",
    ("--num-layers", "0"): "num_layers must be -1 (all decoder layers) or at least 1; got 0",
    ("--num-layers", "9"): "num_layers 9: the model has 3 decoder layers",
    ("--num-layers", "x"): "'x' is not a valid integer",
    ("--report-to", "nope"): "report_to: unknown service 'nope'",
    ("--report-to", "wandb"): "report_to wandb: the wandb package is not installed; pip install wandb",
    ("--clear-cache-threshold", "8XB"): "clear_cache_threshold must be a byte count",
    ("--test-batches", "-3"): "test_batches must be at least -1; got -3",
    ("--fine-tune-type", "dora"): "fine_tune_type dora: drlora-mlx trains LoRA only",
    ("--fine-tune-type", "qlora"): "'qlora' is not one of 'lora', 'dora', 'full'",
    ("--lora-keys", "self_attn.zz"): "lora_keys: 'self_attn.zz' matches no module",
    ("--prompt-feature",): "Option '--prompt-feature' requires an argument",
    ("--project-name",): "Option '--project-name' requires an argument",
    ("--train", "--optimizer-config", "x"): "No such option '--optimizer-config'",
    ("--hf-dataset", "x"): "No such option '--hf-dataset'",
    ("--resume-adapter-file",): "Option '--resume-adapter-file' requires an argument",
}


def _assert_one_line(code, err, message):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drlora-mlx: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def no_reporting_packages(monkeypatch):
    """As on a machine without wandb and swanlab, whatever this one has."""
    monkeypatch.setattr(callbacks, "wandb", None)
    monkeypatch.setattr(callbacks, "swanlab", None)


@pytest.mark.parametrize("text", sorted(BAD_YAML))
def test_bad_yaml_values_are_one_line(tiny_models, tmp_path, capsys, no_reporting_packages, text):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(["train", "-c", str(cfg), "--model", str(tiny_models("qwen3_moe", shape=SHAPE)),
                            "--adapter-path", str(tmp_path / "out"), "--iters", "40"], capsys)
    _assert_one_line(code, err, BAD_YAML[text])


@pytest.mark.parametrize("flags", sorted(BAD_FLAGS))
def test_bad_flags_are_one_line(tiny_models, tmp_path, capsys, no_reporting_packages, flags):
    code, _, err = run_cli(["train", "--model", str(tiny_models("qwen3_moe", shape=SHAPE)), "--adapter-path",
                            str(tmp_path / "out"), "--iters", "40", *flags], capsys)
    _assert_one_line(code, err, BAD_FLAGS[flags])


def test_python_api_refuses_the_same_values():
    with pytest.raises(ConfigError, match="Muon has no argument 'lr'"):
        TrainingArgs(optimizer="muon", optimizer_config={"muon": {"lr": 1}})
    with pytest.raises(ConfigError, match="num_layers must be -1"):
        DRLoRAConfig(num_layers=0)
