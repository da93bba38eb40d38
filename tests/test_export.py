"""PEFT export and import, and fuse, checked by loading the results in real
transformers and PEFT: logits must equal drlora-mlx's.

Tiny checkpoints in the Hugging Face layout are trained with ``drlora-mlx
train`` (heterogeneous ranks, router trained), in the transformers and PEFT
installed here and, with DRLORA_PEFT_PYTHONS naming other interpreters (with
their own transformers, torch and PEFT; ``.ci/run`` makes one with transformers
4.x and one with the oldest transformers 5 and PEFT we support), there too.
An export a version would load without applying is refused, and each refusal
is checked to be needed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx_lm import load as mlx_lm_load
from peft import PeftModel
from safetensors.numpy import load_file, save_file

from drlora_mlx.cli import main
from drlora_mlx.config.settings import DRLoRAConfig
from drlora_mlx.families import FAMILIES, UnsupportedModelError
from drlora_mlx.formats.adapters import AdapterError, read_ranks, save_adapter
from drlora_mlx.formats.adapters import load as drlora_load
from drlora_mlx.formats.fuse import probe_inputs
from drlora_mlx.formats.peft import (
    EXPORT_INFO,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    export_peft,
    import_peft,
    read_export,
)
from drlora_mlx.formats.peft_support import ExportError, refusal
from drlora_mlx.lora.attach import attach
from drlora_mlx.lora.routing import router_linear

from .helpers import (
    HF_FAMILIES,
    SHAPE,
    TOKENS,
    TOL,
    heterogeneous_ranks,
    ours,
    randomize_b,
    run_cli,
    theirs,
)

PEFT_LOGITS = Path(__file__).with_name("peft_logits.py")
TRAIN = ["--iters", "30", "--batch-size", "4", "--learning-rate", "5e-3", "--steps-per-report", "10",
         "--steps-per-eval", "1000", "--val-batches", "1", "--r-init", "2", "--r-target", "4", "--r-max", "8",
         "--grow-fraction", "1.0", "--mask-prompt"]
# What each family's run adapts besides the up / down experts.
FLAGS = {
    "qwen3_moe": ["--attention-rank", "2"],
    "qwen2_moe": ["--shared-expert-rank", "2"],
    "mixtral": [],
    "olmoe": ["--targets", "gate_proj,up_proj,down_proj"],
    "deepseek_v3": ["--shared-expert-rank", "2", "--attention-rank", "2"],
    "gpt_oss": ["--attention-rank", "2"],
}
REQUIRED = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """trained(family, router) -> (HF-layout model, adapter dir), one short drlora-mlx run each."""
    runs = {}

    def get(family, router="always"):
        if (family, router) not in runs:
            model = tiny_models(family, shape=SHAPE, weights_format="hf")
            out = tmp_path_factory.mktemp(f"{family}-{router}")
            main(["train", "--model", str(model), "--adapter-path", str(out), *TRAIN, "--train-router", router,
                  *FLAGS[family]])
            runs[family, router] = model, out
        return runs[family, router]

    return get


def _has_shared_experts(tiny_models, family) -> bool:
    if not FAMILIES[family].shared_experts:
        return False
    model, _ = mlx_lm_load(str(tiny_models(family, shape=SHAPE)))
    try:
        attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8, shared_expert_rank=2))
    except UnsupportedModelError:  # the family can have them, this configuration has none (MiMo)
        return False
    return True


@pytest.fixture(scope="module")
def synthetic(tiny_models, tmp_path_factory):
    """synthetic(family, router) -> (model, adapter dir) with random ranks and B instead of training,
    for the families beyond the five the issue trains; the model is in the Hugging Face layout where
    drlora-mlx exports the family, in mlx-lm's otherwise."""
    made = {}

    def get(family, router=True):
        if (family, router) not in made:
            weights_format = "hf" if family in HF_FAMILIES else "mlx"
            path = tiny_models(family, shape=SHAPE, weights_format=weights_format)
            model, _ = mlx_lm_load(str(path))
            shared = 2 if _has_shared_experts(tiny_models, family) else 0
            config = DRLoRAConfig(r_init=2, r_target=4, r_max=8, train_router="always" if router else "never",
                                  attention_rank=2, shared_expert_rank=shared)
            drlora = attach(model, config, seed=0)
            heterogeneous_ranks(drlora, seed=1)
            randomize_b(drlora, seed=1, std=0.3)
            key = mx.random.key(2)
            for _, lora in drlora.extra_loras:
                lora.lora_b = 0.3 * mx.random.normal(lora.lora_b.shape, key=key)
            for layer in drlora.layers if router else []:
                linear = router_linear(layer.router)[1]
                linear.weight = linear.weight + 0.5 * mx.random.normal(linear.weight.shape, key=key)
            out = tmp_path_factory.mktemp(f"{family}-synthetic")
            save_adapter(drlora, out, str(path))
            made[family, router] = path, out
        return made[family, router]

    return get


def assert_heterogeneous(adapter):
    info = read_ranks(adapter)
    ranks = [r for layer in info["layers"] for t in info["targets"] for r in layer[t]]
    assert min(ranks) == info["r_init"] and max(ranks) == info["r_max"]


EXPORTS = [(f, "fused", "always") for f in [*REQUIRED, "qwen2_moe"]] + [
    ("qwen3_moe", "per-expert", "always"),
    ("olmoe", "per-expert", "always"),
    ("deepseek_v3", "per-expert", "always"),
    ("mixtral", "per-expert", "never"),  # a trained Mixtral router cannot be carried in this layout
]


def assert_refused_and_needed(model, adapter, layout, tmp_path):
    """The installed transformers would not apply ``layout``: the export is refused before anything is
    written, and the refusal is needed: the same file, written for a version that applies it, loads here
    without reproducing the adapter (or is rejected by PEFT)."""
    with pytest.raises(ExportError, match=f"transformers {re.escape(transformers.__version__)}"):
        export_peft(adapter, tmp_path / "refused", layout)
    assert not (tmp_path / "refused").exists()
    export_peft(adapter, tmp_path / "elsewhere", layout, for_transformers="4.57" if layout == "per-expert" else "5.24")
    try:
        loaded = theirs(model, tmp_path / "elsewhere")
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError: nothing to target
        assert "target" in str(e), e
        return
    assert np.abs(loaded - ours(model, adapter)).max() > 1000 * TOL


@pytest.mark.parametrize("family,layout,router", EXPORTS)
def test_peft_on_the_installed_transformers_computes_drlora_logits(trained, tmp_path, family, layout, router):
    model, adapter = trained(family, router)
    assert_heterogeneous(adapter)
    if refusal(layout, transformers.__version__):
        assert_refused_and_needed(model, adapter, layout, tmp_path)
        return
    report = export_peft(adapter, tmp_path / "peft", layout)
    want = ours(model, adapter)
    assert np.abs(theirs(model, tmp_path / "peft") - want).max() < TOL
    assert np.abs(theirs(model) - want).max() > 1000 * TOL
    assert 0 < report.padded_zeros < report.lora_parameters
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(model)
    assert bool(config["modules_to_save"]) == (router == "always")


# Every other family drlora-mlx exports (the 2026 families in the fused layout only).
NEW_FAMILIES = sorted(set(HF_FAMILIES) - set(REQUIRED) - {"qwen2_moe", "phimoe", "deepseek_v2", "glm4_moe",
                                                          "granitemoe"})
OTHERS = [(f, "fused") for f in ("phimoe", "deepseek_v2", "glm4_moe", "granitemoe", *NEW_FAMILIES)] + [
    ("deepseek_v2", "per-expert"),
    ("glm4_moe", "per-expert"),
]


@pytest.mark.parametrize("family,layout", OTHERS)
def test_peft_export_of_the_other_families(synthetic, tmp_path, family, layout):
    model, adapter = synthetic(family)
    if refusal(layout, transformers.__version__):
        assert_refused_and_needed(model, adapter, layout, tmp_path)
        return
    export_peft(adapter, tmp_path / "peft", layout)
    want = ours(model, adapter)
    assert np.abs(theirs(model, tmp_path / "peft") - want).max() < TOL
    assert np.abs(theirs(model) - want).max() > 1000 * TOL


def test_export_records_version_ranks_hash_and_sizes(trained, tmp_path, capsys):
    model, adapter = trained("qwen3_moe")
    code, out, err = run_cli(["export", "--adapter-path", str(adapter), "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    info = read_export(tmp_path / "p")
    assert info["drlora_mlx_version"] == "0.2.0"
    ranks = read_ranks(adapter)
    for layer, entry in zip(ranks["layers"], info["layers"]):
        assert {t: m["ranks"] for t, m in entry["modules"].items()} == {t: layer[t] for t in ranks["targets"]}
    assert [m["ranks"] for m in info["extras"]] == [[2]] * 4 * SHAPE.layers  # q, k, v, o at --attention-rank 2
    # Every parameter is counted once: trained values plus padding make the file.
    tensors = load_file(str(tmp_path / "p" / PEFT_WEIGHTS))
    lora = sum(v.size for k, v in tensors.items() if ".lora_" in k)
    assert info["parameters"]["lora"] == lora
    active = sum(sum(m["ranks"]) * (m["in"] + m["out"]) for e in info["layers"] for m in e["modules"].values())
    active += sum(sum(m["ranks"]) * (m["in"] + m["out"]) for m in info["extras"])
    assert info["parameters"]["padded_zeros"] == lora - active
    assert sum(np.count_nonzero(v) for k, v in tensors.items() if ".lora_" in k) <= active
    assert f"{lora:,}" in out and f"{lora - active:,}" in out and "PEFT rank" in out


def test_trained_router_survives_the_export(trained, tmp_path):
    model, adapter = trained("qwen3_moe")
    export_peft(adapter, tmp_path / "p")
    want = ours(model, adapter)
    assert np.abs(theirs(model, tmp_path / "p") - want).max() < TOL
    # Without the router the logits are off: the router that arrived is the trained one.
    stripped = tmp_path / "no_router"
    shutil.copytree(tmp_path / "p", stripped)
    config = json.loads((stripped / PEFT_CONFIG).read_text())
    assert config["modules_to_save"] == [f"model.layers.{i}.mlp.gate" for i in range(SHAPE.layers)]
    config["modules_to_save"] = None
    (stripped / PEFT_CONFIG).write_text(json.dumps(config))
    tensors = load_file(str(stripped / PEFT_WEIGHTS))
    save_file({k: v for k, v in tensors.items() if ".lora_" in k}, str(stripped / PEFT_WEIGHTS))
    assert np.abs(theirs(model, stripped) - want).max() > 100 * TOL


@pytest.mark.parametrize("family", REQUIRED)
def test_merge_and_unload_equals_drlora_fuse(trained, tmp_path, capsys, family):
    model, adapter = trained(family)
    export_peft(adapter, tmp_path / "p")
    fused = tmp_path / "fused"
    code, out, err = run_cli(["fuse", "--adapter-path", str(adapter), "--save-path", str(fused)], capsys)
    assert code == 0, err
    merged = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32), str(tmp_path / "p")
    ).merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(torch.tensor(TOKENS)).logits.numpy()
    m, _ = mlx_lm_load(str(fused))
    assert np.abs(np.array(m(mx.array(TOKENS))) - merged_logits).max() < TOL
    if family == "gpt_oss":  # float gpt-oss experts: mlx-lm's layout only, and the run says so
        assert "read by mlx-lm only" in out
        return
    assert "read by mlx-lm and transformers" in out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(fused), dtype=torch.float32).state_dict()
    expected = merged.state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).state_dict()
    assert reloaded.keys() == expected.keys()
    assert max((reloaded[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
    changed = [k for k in expected if (expected[k] - base[k]).abs().max().item() > 1e-3]
    assert any("experts" in k for k in changed) and any(".gate." in k for k in changed)  # experts and router


@pytest.mark.parametrize("family,layout", [(f, "fused") for f in REQUIRED] + [("deepseek_v3", "per-expert")])
def test_export_import_export_gives_identical_files(trained, tmp_path, family, layout):
    model, adapter = trained(family)
    target = "4.57" if layout == "per-expert" else None  # the round trip loads nothing in transformers
    export_peft(adapter, tmp_path / "p1", layout, target)
    base, _ = mlx_lm_load(str(model))
    drlora = import_peft(base, tmp_path / "p1")
    base.eval()
    assert np.abs(np.array(base(mx.array(TOKENS))) - ours(model, adapter)).max() < 1e-5
    save_adapter(drlora, tmp_path / "again", read_export(tmp_path / "p1")["base_model"])
    export_peft(tmp_path / "again", tmp_path / "p2", layout, target)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, EXPORT_INFO):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes(), name


def _versions(python: str) -> tuple[str, str]:
    run = subprocess.run([python, str(PEFT_LOGITS), "--versions"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.fullmatch(r"transformers (\S+) peft (\S+)", run.stdout.strip())
    assert found, run.stdout
    return found[1], found[2]


def test_exports_load_in_the_other_supported_versions(trained, synthetic, tmp_path):
    """In each environment DRLORA_PEFT_PYTHONS names (this interpreter when it names none): every layout
    that its transformers applies, exported for that version, gives drlora-mlx's logits there; every
    other layout is refused."""
    pythons = [p for p in os.environ.get("DRLORA_PEFT_PYTHONS", "").split(os.pathsep) if p]
    if not pythons and os.environ.get("CI"):
        pytest.fail("DRLORA_PEFT_PYTHONS is not set; .ci/run makes the other transformers / PEFT environments")
    pythons = pythons or [sys.executable]
    cases = {family: trained(family, router) for family, router in
             [("qwen3_moe", "always"), ("mixtral", "never"), ("olmoe", "always"), ("deepseek_v3", "always")]}
    cases["glm4_moe"] = synthetic("glm4_moe")
    np.save(tmp_path / "tokens.npy", TOKENS)
    seen = set()
    for python in pythons:
        version, peft = _versions(python)
        seen.add((version.split(".")[0], peft))
        jobs, checked = [], []
        for family, (model, adapter) in cases.items():
            for layout in ("fused", "per-expert"):
                out = tmp_path / f"{version}-{peft}" / f"{family}-{layout}"
                if refusal(layout, version):
                    with pytest.raises(ExportError, match=f"transformers {re.escape(version)}"):
                        export_peft(adapter, out, layout, for_transformers=version)
                    continue
                export_peft(adapter, out, layout, for_transformers=version)
                jobs += [str(model), str(out), str(out) + ".npy"]
                checked.append((family, layout, model, adapter, out))
        assert len(checked) >= len(cases)  # every family loads in one layout or the other
        run = subprocess.run([python, str(PEFT_LOGITS), str(tmp_path / "tokens.npy"), *jobs],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        for family, layout, model, adapter, out in checked:
            want = ours(model, adapter)
            assert np.abs(np.load(str(out) + ".npy") - want).max() < TOL, (version, peft, family, layout)
            assert np.abs(ours(model) - want).max() > 1000 * TOL
    if os.environ.get("CI"):  # .ci/run's environments: transformers 4.x, and the oldest PEFT we support
        assert {major for major, _ in seen} == {"4", "5"} and "0.21.2" in {peft for _, peft in seen}, seen


def test_export_refuses_a_layout_the_target_transformers_would_not_apply(trained, tmp_path, capsys):
    _, adapter = trained("qwen3_moe")
    base = ["export", "--adapter-path", str(adapter), "--out", str(tmp_path / "p")]
    _one_line_exit_2([*base, "--layout", "per-expert", "--for-transformers", "5.25.0"], capsys,
                     "cannot export qwen3_moe with --layout per-expert: transformers 5.25.0 loads a per-expert "
                     "export without applying it")
    _one_line_exit_2([*base, "--layout", "fused", "--for-transformers", "4.57.6"], capsys,
                     "use --layout per-expert for transformers 4.x")
    _one_line_exit_2([*base, "--for-transformers", "latest"], capsys, "--for-transformers takes a transformers version")
    assert not (tmp_path / "p").exists()
    code, out, err = run_cli([*base, "--layout", "per-expert", "--for-transformers", "4.57"], capsys)
    assert code == 0, err
    assert "checked for transformers 4.57" in out and "written for transformers 4.x" in out
    assert read_export(tmp_path / "p")["for_transformers"] == "4.57"


def _requantization(out: str) -> tuple[float, float]:
    m = re.search(r"changes the logits by ([\d.]+) on average \(max ([\d.]+)\)", out)
    return float(m[1]), float(m[2])


def test_fuse_into_a_quantized_base_never_loses_the_update(tiny_models, tmp_path, capsys):
    model = tiny_models("qwen3_moe", shape=SHAPE, quantize_bits=4)
    adapter = tmp_path / "adapter"
    main(["train", "--model", str(model), "--adapter-path", str(adapter), *TRAIN, "--train-router", "always",
          "--attention-rank", "2"])
    want = ours(model, adapter)
    assert np.abs(ours(model) - want).max() > 1000 * TOL

    code, out, err = run_cli(["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "kept")], capsys)
    assert code == 0, err
    assert "merged layers kept in float" in out and "read by mlx-lm only" in out
    assert np.abs(ours(tmp_path / "kept") - want).max() < TOL

    code, out, err = run_cli(["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "float"),
                              "--dequantize"], capsys)
    assert code == 0, err
    assert "read by mlx-lm and transformers" in out and "the whole model is in float" in out
    assert np.abs(ours(tmp_path / "float") - want).max() < TOL
    assert np.abs(theirs(tmp_path / "float") - want).max() < TOL

    code, out, err = run_cli(["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "q"),
                              "--requantize"], capsys)
    assert code == 0, err
    mean, worst = _requantization(out)
    # The printed estimate is what the saved model does on the same inputs.
    fused, tokenizer = mlx_lm_load(str(tmp_path / "q"))
    adapted, _, _ = drlora_load(str(model), adapter)
    probe = probe_inputs(tokenizer)
    diff = np.abs(np.array(fused(probe)) - np.array(adapted(probe)))
    assert mean > 0 and abs(diff.mean() - mean) < 1e-4 and abs(diff.max() - worst) < 1e-4
    quantized = [k for k in mx.load(str(tmp_path / "q" / "model.safetensors")) if k.endswith("switch_mlp.up_proj.scales")]
    assert len(quantized) == SHAPE.layers


def test_gpt_oss_requantized_to_mxfp4_reads_alike_in_both(trained, tmp_path, capsys):
    model, adapter = trained("gpt_oss")
    code, out, err = run_cli(["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "q"),
                              "--requantize"], capsys)
    assert code == 0, err
    assert "read by mlx-lm and transformers" in out and _requantization(out)[0] > 0
    assert np.abs(theirs(tmp_path / "q") - ours(tmp_path / "q")).max() < TOL


def _one_line_exit_2(argv, capsys, message):
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("drlora-mlx: error: "), err
    assert message in lines[0], lines[0]


def test_refusals_are_one_line_and_exit_2(trained, synthetic, tmp_path, capsys):
    model, adapter = trained("qwen3_moe")
    stock = tmp_path / "mlx_lm_only"
    stock.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(adapter / name, stock / name)
    export_peft(adapter, tmp_path / "peft")
    qwen2, qwen2_adapter = trained("qwen2_moe")
    cases = [
        (["export", "--adapter-path", str(stock)], "is not a drlora-mlx adapter directory"),
        (["export", "--adapter-path", str(tmp_path / "peft")], "is not a drlora-mlx adapter directory"),
        (["export", "--adapter-path", str(trained("gpt_oss")[1]), "--layout", "per-expert"],
         "gpt_oss cannot be exported with --layout per-expert"),
        (["export", "--adapter-path", str(qwen2_adapter), "--layout", "per-expert"],
         "qwen2_moe cannot be exported with --layout per-expert"),
        (["export", "--adapter-path", str(synthetic("granitemoe")[1]), "--layout", "per-expert"],
         "granitemoe cannot be exported with --layout per-expert"),
        (["export", "--adapter-path", str(synthetic("phimoe", router=False)[1]), "--layout", "per-expert"],
         "phimoe cannot be exported with --layout per-expert"),
        (["export", "--adapter-path", str(trained("mixtral")[1]), "--layout", "per-expert"],
         "cannot carry the trained router"),
        (["export", "--adapter-path", str(adapter), "--format", "gguf"], "'gguf' is not 'peft'"),
        (["export", "--adapter-path", str(synthetic("jamba")[1])],
         "jamba cannot be exported for transformers: mlx-lm's Jamba renormalises"),
        (["export", "--adapter-path", str(synthetic("phixtral")[1])],
         "family 'phixtral' has no Hugging Face counterpart (transformers has no such model)"),
        (["export", "--adapter-path", str(synthetic("qwen3_5_moe")[1]), "--layout", "per-expert"],
         "qwen3_5_moe cannot be exported with --layout per-expert: this family is exported in the fused layout"),
        (["fuse", "--adapter-path", str(stock), "--save-path", str(tmp_path / "f")],
         "is not a drlora-mlx adapter directory"),
        (["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "f"), "--requantize"],
         "is not quantized: there is nothing to re-quantize"),
        (["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "f"), "--requantize", "--dequantize"],
         "exclude each other"),
        (["fuse", "--model", str(qwen2), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "f")],
         "was trained on a qwen3_moe model"),
    ]
    for argv, message in cases:
        _one_line_exit_2([*argv, "--out", str(tmp_path / "out")] if argv[0] == "export" else argv, capsys, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "f").exists()


def test_import_refuses_what_export_did_not_write(trained, tmp_path):
    model, adapter = trained("qwen3_moe")
    export_peft(adapter, tmp_path / "p")
    base, _ = mlx_lm_load(str(model))
    foreign = tmp_path / "foreign"
    shutil.copytree(tmp_path / "p", foreign)
    (foreign / EXPORT_INFO).unlink()
    with pytest.raises(AdapterError, match="not a PEFT adapter exported by drlora-mlx"):
        import_peft(base, foreign)
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "p", changed)
    tensors = load_file(str(changed / PEFT_WEIGHTS))
    next(v for k, v in sorted(tensors.items()) if ".lora_B" in k)[0, 0] += 1.0
    save_file(tensors, str(changed / PEFT_WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="sha256 differs"):
        import_peft(base, changed)
    other, _ = mlx_lm_load(str(trained("mixtral")[0]))
    with pytest.raises(AdapterError, match="exported from a qwen3_moe model"):
        import_peft(other, tmp_path / "p")


def test_train_starts_from_a_peft_export(trained, tmp_path, capsys):
    model, adapter = trained("qwen3_moe")
    export_peft(adapter, tmp_path / "peft", "fused")
    imported, _ = mlx_lm_load(str(model))
    drlora = import_peft(imported, tmp_path / "peft")
    # The trained ranks come back, every active rank in a slot of its own.
    _, _, saved = drlora_load(str(model), adapter)
    assert np.array_equal(drlora.ranks(), saved.ranks())
    for l, layer in enumerate(drlora.layers):
        held = np.concatenate([np.array(m.slots)[np.array(m.slots) != layer.pool.null] for m in layer.modules])
        assert len(np.unique(held)) == len(held) == drlora.ranks()[l].sum()
    out, fresh = tmp_path / "continued", tmp_path / "fresh"
    same = ["--model", str(model), "--iters", "4", "--batch-size", "4", "--steps-per-report", "1", "--mask-prompt"]
    code, text, err = run_cli(["train", *same, "--resume-from", str(tmp_path / "peft"), "--adapter-path", str(out)],
                              capsys)
    assert code == 0, err
    assert "starting from the PEFT export" in text
    code, _, err = run_cli(["train", *same, *TRAIN[12:], *FLAGS["qwen3_moe"], "--adapter-path", str(fresh)], capsys)
    assert code == 0, err

    def first_loss(path):
        return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines() if '"train"' in l][0]["loss"]

    assert first_loss(out) < first_loss(fresh) - 1.0  # the same first batch, from where the export left off
    assert read_ranks(out)["layers"] == read_ranks(adapter)["layers"]
    code, _, err = run_cli(["train", "--model", str(model), "--resume-from", str(tmp_path / "peft"),
                            "--adapter-path", str(tmp_path / "x"), "--iters", "4", "--r-max", "16"], capsys)
    assert code == 2 and "the PEFT export was trained with r_max=8, this run asks for r_max=16" in err


@pytest.mark.parametrize("family", sorted(n for n, f in FAMILIES.items() if f.tiny is not None))
def test_fuse_gives_the_adapters_logits_for_every_family(synthetic, tmp_path, capsys, family):
    """Adapter, trained router, attention and shared-expert LoRA merged into the base, for every family;
    where drlora-mlx writes the Hugging Face layout, transformers reads the fused model alike."""
    model, adapter = synthetic(family)
    code, out, err = run_cli(["fuse", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "fused")], capsys)
    assert code == 0, err
    want = ours(model, adapter)
    assert np.abs(ours(model) - want).max() > 1000 * TOL
    # Relative to the logits' size: one matmul with W + BA rounds differently from W x + B(A x) in float32,
    # and recurrent layers carry that along the sequence (kimi_linear: 1.1e-4 of logits up to 4.1 with MLX's
    # bundled BLAS, 2.4e-5 with OpenBLAS; transformers' own model of the same weights is 7e-5 to 1e-4 away).
    assert np.abs(ours(tmp_path / "fused") - want).max() < TOL * max(1.0, np.abs(want).max())
    if family in HF_FAMILIES and family != "gpt_oss":  # float gpt-oss experts: mlx-lm's layout (see below)
        assert "read by mlx-lm and transformers" in out
        assert np.abs(theirs(tmp_path / "fused") - want).max() < TOL
    else:
        assert "read by mlx-lm only" in out


def test_peft_builds_the_exported_per_parameter_ranks_despite_its_warning(tiny_models, tmp_path):
    """PEFT applies rank_pattern to expert *parameters* (target_parameters) but checks the keys only
    against targeted *modules*, so it warns that they were ignored. They are not: the ranks PEFT builds
    are the exported ones, and the logits are drlora-mlx's (the README says so)."""
    import warnings

    from peft.tuners.lora.layer import ParamWrapper

    model_path = tiny_models("qwen3_moe", shape=SHAPE, weights_format="hf")
    model, _ = mlx_lm_load(str(model_path))
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    E = drlora.n_experts
    # Per layer, the largest up / down rank: the rank of the fused parameter that holds it.
    largest = [(5, 3), (8, 8), (6, 2)]
    ranks = np.full((drlora.n_layers, drlora.n_modules), 2)
    for l, (up, down) in enumerate(largest):
        ranks[l, 1], ranks[l, E + 2] = up, down
    drlora.set_ranks(ranks)
    randomize_b(drlora, seed=3, std=0.3)
    adapter = tmp_path / "adapter"
    save_adapter(drlora, adapter, str(model_path))
    export_peft(adapter, tmp_path / "peft", "fused")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["r"] == 8

    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    built = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            built[layer, module.parameter_name] = (module.r["default"], tuple(module.lora_A["default"].weight.shape))
    dims = {"gate_up_proj": SHAPE.hidden, "down_proj": SHAPE.expert_dim}
    want = {}
    for l, (up, down) in enumerate(largest):
        want[l, "gate_up_proj"] = (up, (up * E, dims["gate_up_proj"]))
        want[l, "down_proj"] = (down, (down * E, dims["down_proj"]))
    assert built == want
    # Where PEFT warns (0.21 on transformers before 5.25), the keys it calls ignored are parameter keys
    # below r, each of which was applied above.
    ignored = [str(w.message) for w in caught if "did not match any targeted module" in str(w.message)]
    named = set(re.findall(r"'([^']+)'", " ".join(m for m in ignored if m.startswith("The following rank_pattern"))))
    assert named <= {k for k in config["rank_pattern"] if k in config["target_parameters"]} != set()
    with torch.no_grad():
        theirs_logits = peft_model.eval()(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(theirs_logits - ours(model_path, adapter)).max() < TOL
