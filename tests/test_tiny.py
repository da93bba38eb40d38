"""The tiny checkpoints are real and reproducible."""

import hashlib
import json

from mlx_lm import load as mlx_lm_load

from drlora_mlx.formats.tiny import TinyShape, build_tiny, tiny_model_path


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_build_is_deterministic(tmp_path):
    shape = TinyShape(hidden=32, layers=1, experts=4, expert_dim=16, heads=2, kv_heads=1, vocab=300)
    a = build_tiny("olmoe", tmp_path / "a", shape=shape, seed=3)
    b = build_tiny("olmoe", tmp_path / "b", shape=shape, seed=3)
    assert _digest(a) == _digest(b)
    c = build_tiny("olmoe", tmp_path / "c", shape=shape, seed=4)
    assert _digest(c)["model.safetensors"] != _digest(a)["model.safetensors"]


def test_cached_path_is_built_once_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("DRLORA_MLX_CACHE", str(tmp_path))
    shape = TinyShape(hidden=32, layers=1, experts=4, expert_dim=16, heads=2, kv_heads=1, vocab=300)
    path = tiny_model_path("mixtral", shape)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path("mixtral", shape) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing half-built left beside it
    model, tokenizer = mlx_lm_load(str(path))
    assert json.loads((path / "config.json").read_text())["num_local_experts"] == 4
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
