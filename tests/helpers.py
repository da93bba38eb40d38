"""Shared pieces of the model-level tests: plain functions and constants (fixtures live in conftest.py)."""

import json
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm import load as mlx_lm_load

from drlora_mlx.cli import main
from drlora_mlx.config.settings import DRLoRAConfig
from drlora_mlx.families import FAMILIES
from drlora_mlx.formats.adapters import load as drlora_load
from drlora_mlx.formats.tiny import TinyShape
from drlora_mlx.lora.attach import attach
from drlora_mlx.lora.tree import module_at, replace_module

# Three decoder layers, so DeepSeek-style models (first layer dense) keep two MoE layers.
SHAPE = TinyShape(layers=3)


def padded_batch(vocab: int, seed: int = 0, rows: int = 3, width: int = 17, prompt: bool = True):
    """Token rows of different lengths padded with zeros, and their (offset, length)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(width // 2, width + 1, size=rows)
    lengths[0] = width
    tokens = np.zeros((rows, width), np.int32)
    offsets = []
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, vocab, size=n)
        offsets.append(int(rng.integers(1, n // 2)) if prompt else 0)
    return mx.array(tokens), mx.array(np.stack([offsets, lengths], axis=1).astype(np.int32))


def loss_token_mask(lengths, width: int) -> np.ndarray:
    """The loss-token mask over input positions, recomputed in numpy: position
    p (predicting token p + 1) counts when token p + 1 is a real token after the prompt."""
    lengths = np.asarray(lengths)
    predicted = np.arange(1, width)[None, :]
    return (predicted >= lengths[:, :1]) & (predicted < lengths[:, 1:])


def attached(tiny_models, family: str, shape=SHAPE, quantize_bits=None, seed: int = 0, **config):
    """(model, tokenizer, drlora) for a freshly loaded tiny checkpoint."""
    model, tokenizer = mlx_lm_load(str(tiny_models(family, shape=shape, quantize_bits=quantize_bits)))
    drlora = attach(model, DRLoRAConfig(**config), seed=seed)
    return model, tokenizer, drlora


def randomize_b(drlora, seed: int = 0, std: float = 0.05):
    """Give every active rank a non-zero B (as after some training), in either layout."""
    key = mx.random.key(seed)
    for i, (_, m) in enumerate(drlora.expert_modules()):
        a, b = m.masked_factors()
        b = mx.random.normal(b.shape, key=mx.random.split(key, 1000)[i]) * std
        m.load_factors(a, b * m.active_mask()[:, None, :], m.ranks())
    mx.eval(drlora.model.parameters())


def budget_ranks(drlora, seed: int = 0) -> np.ndarray:
    """Random ranks in [r_init, r_max] whose per-layer mean is at most r_target:
    any rank pattern a per-layer run can reach, in either layout."""
    rng = np.random.default_rng(seed)
    r_init, r_target, r_max = drlora.config.ranks
    ranks = rng.integers(r_init, r_max + 1, size=(drlora.n_layers, drlora.n_modules))
    for row in ranks:
        while row.sum() > r_target * row.size:
            row[rng.choice(np.flatnonzero(row > r_init))] -= 1
    return ranks


def heterogeneous_ranks(drlora, seed: int = 0) -> np.ndarray:
    ranks = budget_ranks(drlora, seed)
    drlora.set_ranks(ranks)
    return ranks


# --- The CLI in process (from test_cli) -------------------------------------------------------------

FAST = ["--iters", "40", "--batch-size", "4", "--learning-rate", "5e-3", "--steps-per-report", "5",
        "--steps-per-eval", "20", "--val-batches", "2", "--r-init", "2", "--r-target", "4", "--r-max", "8",
        "--mask-prompt"]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of an in-process CLI call."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# --- The CLI in a subprocess, and the adapters it writes (from test_resume) -------------------------

def train_command(model_path, adapter_path, *extra):
    return [sys.executable, "-m", "drlora_mlx", "train", "--model", str(model_path), "--adapter-path",
            str(adapter_path), "--iters", "60", "--batch-size", "4", "--learning-rate", "5e-3",
            "--grad-accumulation-steps", "2", "--r-init", "2", "--r-target", "4", "--r-max", "8",
            "--steps-per-report", "2", "--steps-per-eval", "1000", "--mask-prompt", *extra]


def wait_for(predicate, timeout=120):
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise TimeoutError
        time.sleep(0.05)


def adapter_weights(adapter_path):
    return {k: np.asarray(v) for k, v in mx.load(str(adapter_path / "adapters.safetensors")).items()} | {
        k: np.asarray(v) for k, v in mx.load(str(adapter_path / "drlora_state.safetensors")).items()
    }


def assert_same_arrays(want: dict, got: dict):
    """Two {name: array} dicts with the same names and bit-identical arrays."""
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k]), k


def assert_same_adapter(a, b):
    assert_same_arrays(adapter_weights(a), adapter_weights(b))


def train_records(adapter_path):
    p = adapter_path / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip() and '"train"' in l]


# --- Logits of mlx-lm and transformers (from test_hf_checkpoint) -----------------------------------

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
    import transformers  # imported here so that tests without transformers do not load torch

    config = transformers.AutoConfig.from_pretrained(str(model))
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    return getattr(transformers, config.architectures[0])


def theirs(model, adapter=None) -> np.ndarray:
    """transformers' logits for TOKENS, with a PEFT adapter when given."""
    import torch  # imported here so that tests without transformers do not load torch

    m = hf_model_class(model).from_pretrained(str(model), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter))
    with torch.no_grad():
        return m.eval()(torch.tensor(TOKENS)).logits.numpy()


# --- Routing statistics recomputed from each model's own MoE block (from test_routing) -------------

class ExpertsProbe(nn.Module):
    """Stands in for the experts: returns one-hot rows (or zeros) and keeps the indices. Where the
    block scales the experts' input by the routing weight (Llama 4), the rows are scaled alike."""

    def __init__(self, one_hot: bool, block_input=None):
        super().__init__()
        self.one_hot = one_hot
        self.block_input = block_input
        self.indices = None

    def __call__(self, x, indices):
        self.indices = indices
        k, d = indices.shape[-1], x.shape[-1]
        rows = mx.eye(k, d) if self.one_hot else mx.zeros((k, d))
        out = mx.broadcast_to(rows, indices.shape + (d,))
        if self.block_input is not None:
            ref = self.block_input.reshape(x.shape)
            out = out * ((x * ref).sum(-1) / (ref * ref).sum(-1))[..., None, None]
        return out.astype(x.dtype)


def moe_block_inputs(model, drlora, inputs):
    """The input of every MoE block in a plain forward pass (and the other arguments it was called with:
    for Gemma 4 the block is the decoder layer, called with the attention mask)."""
    seen = {}
    originals = []
    for site, layer in enumerate(drlora.layers):
        cls = type(layer.block)

        def record(self, x, *a, __cls=cls, __site=site, **k):
            seen[__site] = (x, a, k)
            return __cls.__call__(self, x, *a, **k)

        originals.append((layer.block, cls))
        layer.block.__class__ = type("Recording", (cls,), {"__call__": record})
    try:
        mx.eval(model(inputs))
    finally:
        for block, cls in originals:
            block.__class__ = cls
    return seen


def run_moe_block(layer, family, call, probe):
    """The output of the block (or of the module the family names as its readout) with ``probe`` as experts."""
    x, args, kwargs = call
    experts = module_at(layer.block, layer.experts_name)
    replace_module(layer.block, layer.experts_name, probe)
    try:
        if family.readout is None:
            out = layer.block(x, *args, **kwargs)
        else:
            path, what = family.readout
            target = module_at(layer.block, path)
            cls, seen = type(target), {}

            def call(self, *a, **k):
                seen["out"] = cls.__call__(self, *a, **k)
                return seen["out"]

            target.__class__ = type("Readout", (cls,), {"__call__": call})
            try:
                layer.block(x, *args, **kwargs)
            finally:
                target.__class__ = cls
            out = seen["out"]
    finally:
        replace_module(layer.block, layer.experts_name, experts)
    return np.asarray(out[0] if isinstance(out, tuple) else out, np.float64)


def reference_sums(model, drlora, batch, lengths, signal):
    """Routing sums per (layer, expert) over the loss tokens, and the number of loss tokens, recomputed
    without drlora-mlx's rule table: each MoE block runs on its recorded input with ExpertsProbe as its
    experts, so its output is the routing weight it applies to each chosen expert."""
    inputs = batch[:, :-1]
    mask = loss_token_mask(lengths, batch.shape[1])
    seen = moe_block_inputs(model, drlora, inputs)
    out = np.zeros((drlora.n_layers, drlora.n_experts))
    family = drlora.family
    for site, layer in enumerate(drlora.layers):
        call = seen[site]
        probe = ExpertsProbe(one_hot=True, block_input=call[0] if family.input_scaled else None)
        with_scores = run_moe_block(layer, family, call, probe)
        shared_only = run_moe_block(layer, family, call, ExpertsProbe(one_hot=False))
        idx = np.asarray(probe.indices)
        k = idx.shape[-1]
        idx = idx.reshape(mask.shape + (k,))
        weights = (with_scores - shared_only)[..., :k].reshape(mask.shape + (k,))
        values = weights if signal == "weight" else (weights != 0).astype(np.float64)
        for e in range(drlora.n_experts):
            out[site, e] = (values * (idx == e) * mask[..., None]).sum()
    return out, mask.sum()
