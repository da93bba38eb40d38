"""An adapter evaluated on its own (``drlora-mlx test``, ``train --test --iters 0``, ``train: false``),
and a run started from an mlx-lm LoRA adapter file (``resume_adapter_file``)."""

import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.tuner.utils import linear_to_lora_layers

from drlora_mlx.config.settings import DRLoRAConfig
from drlora_mlx.lora.attach import attach
from drlora_mlx.training.adapter_start import start_from_adapter_file
from drlora_mlx.training.evaluate import evaluate_adapter, evaluation_settings

from .helpers import FAST, SHAPE, read_metrics, run_cli


def folder_digest(path):
    """sha256 of every file under ``path`` (names and bytes)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A short DR-LoRA run with --test: (model path, adapter folder, the test loss it recorded)."""
    from drlora_mlx.cli import main

    model = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path_factory.mktemp("evaluated")
    main(["train", "--model", str(model), "--adapter-path", str(out), "--test", "--test-batches", "3", *FAST])
    recorded = [r["test_loss"] for r in read_metrics(out) if r["kind"] == "test"]
    return model, out, recorded[0]


def test_a_saved_adapter_evaluates_to_its_training_runs_test_loss_and_stays_untouched(trained, capsys):
    _, adapter, recorded = trained
    before = folder_digest(adapter)
    loss = evaluate_adapter(evaluation_settings({"adapter_path": str(adapter)}, {}, "test"))
    assert loss == recorded
    code, out, err = run_cli(["test", "--adapter-path", str(adapter)], capsys)
    assert code == 0, err
    assert f"test loss {recorded:.3f}" in out
    assert folder_digest(adapter) == before


def test_train_with_no_iterations_or_train_false_only_evaluates(trained, tmp_path, capsys):
    _, adapter, recorded = trained
    before = folder_digest(adapter)
    code, out, err = run_cli(["train", "--adapter-path", str(adapter), "--test", "--iters", "0"], capsys)
    assert code == 0, err
    assert f"test loss {recorded:.3f}" in out and "iter 1" not in out
    config = tmp_path / "eval.yaml"
    config.write_text(f"train: false\ntest: true\nadapter_path: {adapter}\n")
    code, out, err = run_cli(["train", "-c", str(config)], capsys)
    assert code == 0, err
    assert f"test loss {recorded:.3f}" in out
    assert folder_digest(adapter) == before
    # Fewer test batches is another figure: the setting is the command line's.
    assert evaluate_adapter(evaluation_settings({"adapter_path": str(adapter), "test_batches": 1}, {}, "t")) != recorded


@pytest.mark.parametrize("argv,message", [
    (["train", "--iters", "0"], "--test"),
    (["test", "--adapter-path", "{tmp}/none"], "not a drlora-mlx adapter directory"),
    (["test", "--adapter-path", "{adapter}", "--data", "{tmp}"], "train.jsonl"),
    (["test", "--adapter-path", "{adapter}", "--test-batches", "-2"], "test_batches"),
])
def test_evaluation_refusals_are_one_line(trained, tmp_path, capsys, argv, message):
    _, adapter, _ = trained
    argv = [a.format(tmp=tmp_path, adapter=adapter) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ----- resume_adapter_file ------------------------------------------------------------

MLX_LM_KEYS = ["mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj", "self_attn.q_proj"]


def mlx_lm_adapter(model_path, folder, rank=2, scale=10.0):
    """An adapter as mlx_lm.lora writes it (its own LoRA layers, B made non-zero), and the model holding it."""
    model, _ = mlx_lm_load(str(model_path))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": scale, "dropout": 0.0,
                                                     "keys": MLX_LM_KEYS})
    key = mx.random.key(5)
    params = dict(tree_flatten(model.trainable_parameters()))
    for i, name in enumerate(sorted(params)):
        if name.endswith("lora_b"):
            params[name] = 0.2 * mx.random.normal(params[name].shape, key=mx.random.split(key, 100)[i])
    model.load_weights(list(params.items()), strict=False)
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), params)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.layers),
         "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": MLX_LM_KEYS}}))
    return model


def test_a_run_starts_from_an_mlx_lm_adapter_with_its_function(tiny_models, tmp_path):
    model_path = tiny_models("qwen3_moe", shape=SHAPE)
    theirs = mlx_lm_adapter(model_path, tmp_path / "mlx_lm")
    tokens = mx.array(np.random.default_rng(0).integers(3, SHAPE.vocab, size=(2, 12)).astype(np.int32))
    want = np.array(theirs(tokens))
    model, _ = mlx_lm_load(str(model_path))
    # Our scale is 2, theirs 10; ranks 2 of r_init 4 come from the file, the others start fresh.
    drlora = attach(model, DRLoRAConfig(r_init=4, r_target=8, r_max=16, attention_rank=4), seed=0)
    fresh = np.array(model(tokens))
    assert start_from_adapter_file(drlora, tmp_path / "mlx_lm" / "adapters.safetensors") == []
    got = np.array(model(tokens))
    assert np.abs(got - want).max() < 1e-4 < np.abs(fresh - want).max()
    assert (drlora.ranks() == 4).all()


def test_resume_adapter_file_through_the_command_line(tiny_models, tmp_path, capsys):
    model_path = tiny_models("qwen3_moe", shape=SHAPE)
    mlx_lm_adapter(model_path, tmp_path / "mlx_lm")
    common = ["train", "--model", str(model_path), *FAST, "--iters", "4", "--steps-per-eval", "4"]
    code, out, err = run_cli([*common, "--adapter-path", str(tmp_path / "a"), "--attention-rank", "2",
                              "--resume-adapter-file", str(tmp_path / "mlx_lm" / "adapters.safetensors")], capsys)
    assert code == 0, err
    assert "mlx-lm adapter" in out
    started = [r["val_loss"] for r in read_metrics(tmp_path / "a") if r["kind"] == "val"][0]
    code, out, err = run_cli([*common, "--adapter-path", str(tmp_path / "b"), "--attention-rank", "2"], capsys)
    fresh = [r["val_loss"] for r in read_metrics(tmp_path / "b") if r["kind"] == "val"][0]
    assert started != fresh
    # The file's rank (2) above the ranks every expert starts with (r_init 1): one line.
    code, out, err = run_cli([*common, "--adapter-path", str(tmp_path / "c"), "--attention-rank", "2",
                              "--r-init", "1", "--resume-adapter-file", str(tmp_path / "mlx_lm")], capsys)
    assert code == 2 and "--r-init 2" in err and len(err.strip().splitlines()) == 1, err
    # Modules the run does not adapt (no attention LoRA here): one line naming them.
    code, out, err = run_cli([*common, "--adapter-path", str(tmp_path / "d"),
                              "--resume-adapter-file", str(tmp_path / "mlx_lm")], capsys)
    assert code == 2 and "self_attn.q_proj" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli([*common, "--adapter-path", str(tmp_path / "e"),
                              "--resume-adapter-file", str(tmp_path / "nothing.safetensors")], capsys)
    assert code == 2 and "does not exist" in err, err
