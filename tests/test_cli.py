"""``drlora-mlx train`` end to end, and every bad input ending in one line and exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.tuner.utils import linear_to_lora_layers

from drlora_mlx.formats.adapters import load as drlora_load

from .helpers import FAST, SHAPE, padded_batch, read_metrics, run_cli


@pytest.mark.parametrize("family,bits", [("qwen3_moe", None), ("gpt_oss", None), ("mixtral", 4)])
def test_train_end_to_end(tiny_models, tmp_path, capsys, family, bits):
    model_path = tiny_models(family, shape=SHAPE, quantize_bits=bits)
    out_dir = tmp_path / "adapters"
    code, out, err = run_cli(["train", "--model", str(model_path), "--adapter-path", str(out_dir), "--test", *FAST],
                             capsys)
    assert code == 0, err
    records = read_metrics(out_dir)
    kinds = {r["kind"] for r in records}
    assert kinds == {"train", "val", "growth", "test"}
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    for r in train:
        assert set(r) >= {"step", "loss", "lr", "tokens_per_second", "peak_memory_gb", "mean_rank"}
        assert np.isfinite(r["loss"]) and r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    assert val[-1] < val[0] - 1.0
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["mean_rank"] == 4.0
    assert "active rank per expert" in out and "valid loss" in out

    ranks = json.loads(run_cli(["ranks", "--adapter-path", str(out_dir), "--json"], capsys)[1])
    assert (ranks["r_init"], ranks["r_max"], ranks["r_target"]) == (2, 8, 4)
    for layer in ranks["layers"]:
        assert np.mean(layer["up_proj"] + layer["down_proj"]) == 4.0
    flat = [r for layer in ranks["layers"] for r in layer["up_proj"] + layer["down_proj"]]
    assert min(flat) == 2 and max(flat) > 4
    png = tmp_path / "ranks.png"
    assert run_cli(["ranks", "--adapter-path", str(out_dir), "--png", str(png)], capsys)[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Stock mlx-lm reproduces drlora-mlx's logits from the saved adapter.
    ours, _, _ = drlora_load(str(model_path), out_dir)
    stock, _ = mlx_lm_load(str(model_path), adapter_path=str(out_dir))
    base, _ = mlx_lm_load(str(model_path))
    x = padded_batch(384, seed=5)[0]
    want = ours(x)
    assert mx.allclose(stock(x), want, atol=1e-4, rtol=1e-4)
    assert mx.abs(base(x) - want).max().item() > 0.1


def test_uniform_lora_equals_mlx_lm_lora(tiny_models, tmp_path, capsys):
    model_path = tiny_models("qwen3_moe", shape=SHAPE)
    out_dir = tmp_path / "lora"
    code, _, err = run_cli(["train", "--model", str(model_path), "--adapter-path", str(out_dir), "--method", "lora",
                            "--lora-rank", "4", "--train-router", "never", *FAST[:10]], capsys)
    assert code == 0, err
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4
    weights = mx.load(str(out_dir / "adapters.safetensors"))
    # mlx-lm's own LoRA layers, given the same weights, compute the same logits.
    model, _ = mlx_lm_load(str(model_path))
    linear_to_lora_layers(model, len(model.layers), cfg["lora_parameters"])
    model.load_weights(list(weights.items()), strict=False)
    ours, _, drlora = drlora_load(str(model_path), out_dir)
    assert (drlora.ranks() == 4).all()
    x = padded_batch(384, seed=6)[0]
    assert mx.allclose(model(x), ours(x), atol=1e-5, rtol=1e-5)


def test_yaml_config_and_precedence(tiny_models, tmp_path, capsys):
    model_path = tiny_models("qwen3_moe", shape=SHAPE)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_path}\niters: 999\nbatch_size: 4\nlearning_rate: 0.005\nr_init: 2\n"
                   "r_target: 4\nr_max: 8\nsteps_per_report: 5\ntargets: [up_proj, down_proj, gate_proj]\n")
    out_dir = tmp_path / "yaml"
    code, _, err = run_cli(["train", "-c", str(cfg), "--iters", "10", "--adapter-path", str(out_dir)], capsys)
    assert code == 0, err
    saved = json.loads((out_dir / "drlora_config.json").read_text())
    assert saved["training"]["iters"] == 10  # command line over YAML
    assert saved["training"]["batch_size"] == 4  # YAML over defaults
    method = json.loads((out_dir / "drlora_config.json").read_text())["method"]
    assert method["targets"] == ["up_proj", "down_proj", "gate_proj"]


def _data(tmp_path, name, files):
    d = tmp_path / name
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_text(text)
    return d


def _bad_inputs(tmp_path, model_path, dense_path):
    no_template = tmp_path / "no_template"
    shutil.copytree(model_path, no_template)
    (no_template / "chat_template.jinja").unlink()
    good_line = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    long_line = json.dumps({"text": "word " * 400}) + "\n"
    cases = {
        "missing data folder": (["--data", str(tmp_path / "nope")], "does not exist"),
        "missing train.jsonl": (["--data", str(_data(tmp_path, "empty_dir", {}))], "train.jsonl is missing"),
        "empty train.jsonl": (["--data", str(_data(tmp_path, "empty", {"train.jsonl": ""}))], "is empty"),
        "malformed line": (["--data", str(_data(tmp_path, "bad", {"train.jsonl": good_line * 3 + "{oops\n"}))],
                           "train.jsonl, line 4: not valid JSON"),
        "unknown format": (["--data", str(_data(tmp_path, "fmt", {"train.jsonl": '{"question": "x"}\n'}))],
                           "unknown or mixed format"),
        "all too long": (["--data", str(_data(tmp_path, "long", {"train.jsonl": long_line * 8})),
                          "--max-seq-length", "16"], "every training example is longer than --max-seq-length 16"),
        "model path missing": (["--model", str(tmp_path / "no_model")], "does not exist"),
        "Hub id while offline": (["--model", "some-org/some-moe"], "HF_HUB_OFFLINE is set"),
        "dense model": (["--model", str(dense_path)], "'llama' is not supported"),
        "rank order": (["--r-init", "8", "--r-target", "4", "--r-max", "16"], "1 <= r_init < r_target <= r_max"),
        "r_target above r_max": (["--r-init", "2", "--r-target", "40", "--r-max", "16"], "r_target <= r_max"),
        "schedule does not fit": (["--iters", "40", "--grow-every", "100"], "--grow-every"),
        "unknown target": (["--targets", "up_proj,w9"], "unknown expert projection 'w9'"),
        "bad choice": (["--routing-signal", "loud"], "'loud' is not one of"),
        "unknown LoRA layout": (["--lora-layout", "dense"], "'dense' is not one of 'pooled', 'masked'"),
        "pooled uniform LoRA": (["--method", "lora", "--lora-layout", "pooled"],
                                "lora_layout pooled sizes each layer's LoRA state to its rank budget, and uniform "
                                "LoRA has no budget to pool; use lora_layout masked"),
        "pooled global allocation": (["--allocation", "global", "--lora-layout", "pooled"],
                                     "global allocation lets a layer take more than its share"),
        "YAML layout of the wrong kind": (["-c", str(_data(tmp_path, "yaml4", {"c.yaml": "lora_layout: 3\n"}) / "c.yaml")],
                                          "lora_layout must be str, got 3"),
        "unknown flag": (["--rank-bogus", "3"], "No such option '--rank-bogus'"),
        "unknown YAML key": (["-c", str(_data(tmp_path, "yaml", {"c.yaml": "r_inti: 4\n"}) / "c.yaml")],
                             "unknown key 'r_inti' (did you mean r_init?)"),
        "missing YAML file": (["-c", str(tmp_path / "none.yaml")], "does not exist"),
        "YAML value of the wrong type": (["-c", str(_data(tmp_path, "yaml2", {"c.yaml": "iters: many\n"}) / "c.yaml")],
                                         "iters must be int, got 'many'"),
        "invalid YAML": (["-c", str(_data(tmp_path, "yaml3", {"c.yaml": "a: [1, 2\n"}) / "c.yaml")],
                         "not valid YAML"),
        "chat data, no chat template": (["--model", str(no_template), "--data", str(_data(tmp_path, "chat", {
            "train.jsonl": json.dumps({"messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"}]}) + "\n"}))],
                                        "holds chat data"),
    }
    return cases


def test_every_bad_input_is_one_line_and_exit_2(tiny_models, tmp_path, capsys):
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    dense = tmp_path / "dense"
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=384, num_key_value_heads=2,
                           max_position_embeddings=4096)
    save_model(dense, llama.Model(args))
    save_config({**args.__dict__, "model_type": "llama"}, dense / "config.json")
    model_path = tiny_models("qwen3_moe", shape=SHAPE)
    for tok in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / tok, dense / tok)
    for name, (extra, message) in _bad_inputs(tmp_path, model_path, dense).items():
        argv = ["train", "--model", str(model_path), "--adapter-path", str(tmp_path / "out"), "--iters", "40",
                *extra]
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("drlora-mlx: error: "), (name, err)
        assert message in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_console_script_and_module_agree_and_fail_cleanly(tmp_path):
    exe = shutil.which("drlora-mlx") or os.path.join(os.path.dirname(sys.executable), "drlora-mlx")
    plan = ["plan", "--layers", "2", "--experts", "4", "--r-init", "2", "--r-max", "8", "--r-target", "4",
            "--iters", "300", "--json"]
    a = subprocess.run([exe, *plan], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "drlora_mlx", *plan], capture_output=True, text=True)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    bad = subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--data", str(tmp_path / "x"),
                          "--model", str(tmp_path / "m")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_quick_start_default_run(tmp_path):
    """`drlora-mlx train` with no arguments: the built-in tiny MoE, offline, ranks growing to r_target."""
    exe = shutil.which("drlora-mlx") or os.path.join(os.path.dirname(sys.executable), "drlora-mlx")
    run = subprocess.run([exe, "train"], cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "No --model given: training the built-in tiny qwen3_moe" in run.stdout
    assert "mean active rank            16.00 (per layer: 16.00, 16.00, 16.00, 16.00)" in run.stdout
    assert run.stdout.count("grow step") >= 20
    records = read_metrics(tmp_path / "adapters")
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    assert val[-1] < val[0] - 2.0


def test_grad_checkpoint_and_cosine_schedule_train_the_same_model(tiny_models, tmp_path, capsys):
    model_path = tiny_models("qwen3_moe", shape=SHAPE)
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--grad-checkpoint"])):
        out = tmp_path / name
        code, _, err = run_cli(["train", "--model", str(model_path), "--adapter-path", str(out),
                                "--lr-schedule", "cosine", *FAST[:10], *FAST[10:16], *extra], capsys)
        assert code == 0, err
        runs[name] = mx.load(str(out / "adapters.safetensors"))
        lrs = [r["lr"] for r in read_metrics(out) if r["kind"] == "train"]
        assert lrs[0] > lrs[len(lrs) // 2] > lrs[-1]  # decaying after the warm-up
    # Recomputing activations changes memory, not the numbers.
    for k, v in runs["plain"].items():
        assert mx.allclose(v, runs["checkpointed"][k], atol=1e-5), k


def _adapter_arrays(path):
    arrays = {}
    for name in ("adapters.safetensors", "drlora_state.safetensors"):
        arrays.update({f"{name}:{k}": np.asarray(v) for k, v in mx.load(str(path / name)).items()})
    return arrays


def _assert_bit_identical(a, b):
    wa, wb = _adapter_arrays(a), _adapter_arrays(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


def test_python_api_and_cli_train_the_same_adapter(tiny_models, tmp_path, capsys, monkeypatch):
    from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
    from drlora_mlx.training.run import run

    # The built-in default: `drlora-mlx train` and `run(TrainingArgs(), DRLoRAConfig())`.
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "--adapter-path", "cli"], capsys)
    assert code == 0, err
    api = run(TrainingArgs(adapter_path="api"), DRLoRAConfig(), out=lambda line: None)
    assert len(api.iteration_losses) == 200  # the built-in model's preset, not the general defaults
    _assert_bit_identical(tmp_path / "cli", tmp_path / "api")

    # A model, flags and a YAML file against the same settings given in Python.
    model = str(tiny_models("olmoe", shape=SHAPE))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 4\nlearning_rate: 0.005\nr_init: 2\nr_target: 4\nr_max: 8\ngrow_fraction: 0.5\n")
    code, _, err = run_cli(["train", "-c", str(cfg), "--model", model, "--iters", "20", "--mask-prompt",
                            "--targets", "gate_proj,down_proj", "--adapter-path", "cli2"], capsys)
    assert code == 0, err
    run(TrainingArgs(model=model, iters=20, batch_size=4, learning_rate=0.005, mask_prompt=True, adapter_path="api2"),
        DRLoRAConfig(r_init=2, r_target=4, r_max=8, grow_fraction=0.5, targets=("gate_proj", "down_proj")),
        out=lambda line: None)
    _assert_bit_identical(tmp_path / "cli2", tmp_path / "api2")
