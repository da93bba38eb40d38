"""Peak memory of one training step at a real vocabulary: mlx-lm's loss, which holds
every token's logits, against drlora-mlx's chunked loss.

A one-layer slice of Qwen3-30B-A3B at its real widths (hidden 2048, vocabulary
151,936, expert dim 768, 32 query / 4 key-value heads, head size 64; 16 experts
top-8 instead of 128, so that it fits a small machine: the loss does not depend
on them), random float32 weights, built in memory. Uniform LoRA at rank 16 on the
experts; one compiled value_and_grad step at batch 1 x T tokens with mlx-lm's own
loss (``mlx_lm.tuner.trainer.default_loss``), drlora-mlx's plain loss and its
chunked loss (the default). Peak memory above the weights, from MLX; the median
and range of three rounds.

    python scripts/loss_memory.py                  # T = 512
    python scripts/loss_memory.py --tokens 1024 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linux_blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402

from drlora_mlx import DRLoRAConfig, attach  # noqa: E402
from drlora_mlx.families.mlx_lm_names import model_classes  # noqa: E402
from drlora_mlx.families.spec import TinyShape  # noqa: E402
from drlora_mlx.formats.tiny import family_config  # noqa: E402
from drlora_mlx.training.loss import chunk_tokens, make_loss  # noqa: E402

SLICE = TinyShape(hidden=2048, layers=1, experts=16, top_k=8, expert_dim=768, heads=32, kv_heads=4, vocab=151936)


def build():
    config = family_config("qwen3_moe", SLICE)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    drlora = attach(model, DRLoRAConfig(method="lora", lora_rank=16, train_router="never"), seed=0)
    mx.eval(model.parameters())
    return model, drlora


def losses(drlora):
    """name -> loss(model, batch, lengths) whose first output is differentiated."""
    ours_plain, ours_chunked = make_loss(drlora, record=False, chunk_size=0), make_loss(drlora, record=False)
    return {
        "mlx_lm": lambda m, b, n: default_loss(m, b, n)[0],
        "drlora_plain": lambda m, b, n: ours_plain(m, b, n)[0],
        "drlora_chunked": lambda m, b, n: ours_chunked(m, b, n)[0],
    }


def peak(model, loss, batch, lengths) -> int:
    value_and_grad = nn.value_and_grad(model, loss)
    step = mx.compile(lambda b, n: value_and_grad(model, b, n), inputs=model.state, outputs=model.state)
    mx.eval(step(batch, lengths))  # compiled and warm
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(batch, lengths))
    return mx.get_peak_memory() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model, drlora = build()
    weights = mx.get_active_memory()
    tokens = np.random.default_rng(0).integers(3, SLICE.vocab, (1, args.tokens + 1)).astype(np.int32)
    batch, lengths = mx.array(tokens), mx.array([[0, args.tokens + 1]], dtype=mx.int32)
    measured = {name: [] for name in losses(drlora)}
    for _ in range(args.rounds):
        for name, loss in losses(drlora).items():
            measured[name].append(peak(model, loss, batch, lengths))
    report = {"tokens": args.tokens, "vocab": SLICE.vocab, "hidden": SLICE.hidden, "weights_bytes": weights,
              "chunk_tokens": chunk_tokens(SLICE.vocab, None)}
    for name, values in measured.items():
        report[name] = {"median_bytes": statistics.median(values), "min_bytes": min(values), "max_bytes": max(values)}
    base = report["mlx_lm"]["median_bytes"]
    for name in measured:
        report[name]["per_token_mb"] = report[name]["median_bytes"] / args.tokens / 1e6
        report[name]["ratio_to_mlx_lm"] = report[name]["median_bytes"] / base
    if args.json:
        print(json.dumps(report))
        return
    print(f"one-layer Qwen3-30B-A3B-width slice, vocabulary {SLICE.vocab:,}, batch 1 x {args.tokens} tokens, "
          f"weights {weights / 1e9:.2f} GB; peak above the weights, median (range) of {args.rounds} rounds")
    for name in measured:
        r = report[name]
        print(f"  {name:<16}{r['median_bytes'] / 1e9:7.3f} GB ({r['min_bytes'] / 1e9:.3f}-{r['max_bytes'] / 1e9:.3f})"
              f"  {r['per_token_mb']:.2f} MB per token  {r['ratio_to_mlx_lm']:.3f}x mlx-lm")


if __name__ == "__main__":
    main()
