import os
import subprocess

import pytest

# Before anything imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def offline_and_isolated(tmp_path_factory):
    """Tests never download anything and never touch the user's model cache."""
    os.environ["DRLORA_MLX_CACHE"] = str(tmp_path_factory.mktemp("drlora-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(family, shape=..., quantize_bits=..., weights_format=...) -> checkpoint path, built once per session."""
    from drlora_mlx.formats.tiny import TinyShape, build_tiny

    root = tmp_path_factory.mktemp("models")
    built = {}

    def get(family, shape=None, quantize_bits=None, seed=0, weights_format="mlx"):
        shape = shape or TinyShape()
        key = (family, shape, quantize_bits, seed, weights_format)
        if key not in built:
            built[key] = build_tiny(family, root / f"{family}-{len(built)}", shape=shape, seed=seed,
                                    quantize_bits=quantize_bits, weights_format=weights_format)
        return built[key]

    return get


@pytest.fixture(scope="module")
def reference_run(tiny_models, tmp_path_factory):
    """One uninterrupted CLI run that the interrupted ones must equal."""
    from .helpers import SHAPE, train_command

    path = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path_factory.mktemp("reference") / "adapters"
    done = subprocess.run(train_command(path, out, "--save-every", "1000"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return path, out
