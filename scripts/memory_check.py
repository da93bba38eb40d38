"""The memory estimate against measured peaks of real training steps.

``drlora-mlx plan`` and the warning before training estimate what a step holds
from a handful of counts (``drlora_mlx.training.memory``: LAYER_VALUES,
CHECKPOINTED_SHARE, RECOMPUTED_LAYERS, PLAIN_LOGITS, CHUNKED_LOGITS). This
script measures what they stand for and sets the estimate beside it:

1. the loss alone (a head and the cross-entropy, compiled value and
   gradient), plain and chunked, at several vocabularies and token counts: the
   peak over a (tokens x vocabulary) and over a (chunk x vocabulary) float32
   array, against PLAIN_LOGITS and CHUNKED_LOGITS;
2. ``--sweep``: one tiny shape at 4 to 32 layers, with and without gradient
   checkpointing: activations per layer, and checkpointed against not (what
   CHECKPOINTED_SHARE and RECOMPUTED_LAYERS stand for);
3. one step of drlora-mlx's Trainer (DR-LoRA, pooled layout, the widest rank
   product) on a seeded random grid of tiny Qwen3-MoE shapes (hidden 128-512,
   2-16 layers, 8-32 experts, top-2 to top-8, two head sizes, vocabularies
   1k-64k, 64-1024 tokens), without and with checkpointing: the estimate over
   the measured peak, each step and their median and range.

``scripts/bench.py --shape qwen3-30b-a3b`` does the same on a slice of a real
model, and ``tests/test_memory.py`` on shapes outside this grid.

    python scripts/memory_check.py              # ~15 minutes on 2 CPU cores
    python scripts/memory_check.py --shapes 8 --sweep
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linux_blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from drlora_mlx import DRLoRAConfig, attach  # noqa: E402
from drlora_mlx.config.settings import TrainingArgs  # noqa: E402
from drlora_mlx.families.mlx_lm_names import model_classes  # noqa: E402
from drlora_mlx.families.spec import TinyShape  # noqa: E402
from drlora_mlx.formats.tiny import family_config  # noqa: E402
from drlora_mlx.training import memory  # noqa: E402
from drlora_mlx.training.loss import chunked_cross_entropy  # noqa: E402
from drlora_mlx.training.trainer import Trainer  # noqa: E402

def _fresh() -> int:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    return mx.get_active_memory()


class _Head:
    """A final projection, as ``lora/head.py``'s Head presents it to the loss."""

    def __init__(self, hidden: int, vocab: int):
        self.projection, self.vocab = nn.Linear(hidden, vocab, bias=False), vocab
        mx.eval(self.projection.parameters())

    def logits(self, h):
        return self.projection(h)


def loss_peak(hidden: int, vocab: int, tokens: int, chunk: int) -> int:
    """Peak memory of the compiled value-and-gradient of the loss alone (chunk 0: the plain loss)."""
    head = _Head(hidden, vocab)
    h = mx.random.normal((1, tokens, hidden))
    targets = mx.random.randint(0, vocab, (1, tokens))
    weights = mx.ones((1, tokens))
    if chunk:
        ce = chunked_cross_entropy(head, chunk)
        def loss(h): return ce(h, targets, weights)  # noqa: E704
    else:
        def loss(h): return (nn.losses.cross_entropy(head.logits(h), targets) * weights).sum()  # noqa: E704
    step = mx.compile(mx.value_and_grad(loss))
    mx.eval(h, targets, weights, step(h))
    before = _fresh()
    mx.eval(step(h))
    return mx.get_peak_memory() - before


def measure_loss() -> None:
    """The loss's peak over a (tokens x vocabulary), and over a (chunk x vocabulary) float32 array
    (the chunked count grows with the number of chunks up to about twelve)."""
    for hidden, vocab, tokens in ((256, 16384, 512), (256, 65536, 1024), (512, 32768, 2048)):
        chunk = memory.chunk_tokens(vocab, None)
        plain = loss_peak(hidden, vocab, tokens, 0) / (tokens * vocab * 4)
        chunked = loss_peak(hidden, vocab, tokens, chunk) / (chunk * vocab * 4)
        print(f"  loss, hidden {hidden}, vocabulary {vocab}, {tokens} tokens: plain {plain:.2f} x tokens x "
              f"vocabulary, chunked {chunked:.2f} x chunk x vocabulary", flush=True)


def grid(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        hidden, heads = rng.choice([128, 256, 512]), rng.choice([4, 8])
        shape = TinyShape(hidden=hidden, layers=rng.choice([2, 4, 8, 16]), experts=rng.choice([8, 16, 32]),
                          top_k=rng.choice([2, 4, 8]), expert_dim=rng.choice([128, 256, 512]), heads=heads,
                          kv_heads=2, vocab=rng.choice([1024, 4096, 16384, 65536]))
        head_dim = rng.choice([hidden // heads, 2 * hidden // heads])
        shapes.append({"shape": shape, "head_dim": head_dim, "batch": rng.choice([1, 2, 4]),
                       "seq": rng.choice([64, 128, 256])})
    return shapes


def step_peak(case: dict, grad_checkpoint: bool) -> dict:
    """One Trainer step's peak above the weights, and the estimate's shape and LoRA parts."""
    before = _fresh()
    config = family_config("qwen3_moe", case["shape"])
    config["head_dim"] = case["head_dim"]
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    weights = mx.get_active_memory() - before
    drlora = attach(model, DRLoRAConfig(train_router="never"), seed=0)
    ranks = drlora.ranks()
    ranks[:, 0] = drlora.config.r_max
    drlora.set_ranks(ranks)
    batch, seq = case["batch"], case["seq"]
    estimate = memory.estimate_peak_bytes(model, drlora, batch, seq, grad_checkpoint)
    shape = memory.model_shape(model, drlora.targets, vars(model.args))
    trainer = Trainer(model, drlora, TrainingArgs(iters=10, batch_size=batch, grad_checkpoint=grad_checkpoint))
    mx.reset_peak_memory()
    rng = np.random.default_rng(0)
    for _ in range(2):
        tokens = rng.integers(3, shape.vocab, (batch, seq + 1)).astype(np.int32)
        trainer.train_step(tokens, np.tile([0, seq + 1], (batch, 1)).astype(np.int32))
    peak = mx.get_peak_memory() - before
    lora = sum(estimate.parts[p] for p in ("expert LoRA state", "gathered LoRA factors", "fixed-rank LoRA state"))
    return {"shape": shape, "batch": batch, "seq": seq, "grad_checkpoint": grad_checkpoint, "peak": peak,
            "weights": weights, "activations": peak - weights - lora,
            "chunk": memory.chunk_tokens(shape.vocab, None)}


def sweep() -> None:
    """Activations per layer of one shape at 4 to 32 layers, without and with checkpointing."""
    shape = TinyShape(hidden=256, layers=4, experts=16, top_k=4, expert_dim=256, heads=4, kv_heads=2, vocab=1024)
    print("activations (MB) of one step, batch 4 x 256, hidden 256, 16 experts top-4, expert dim 256:")
    for layers in (4, 8, 16, 32):
        case = {"shape": replace(shape, layers=layers), "head_dim": 64, "batch": 4, "seq": 256}
        plain, checkpointed = step_peak(case, False)["activations"], step_peak(case, True)["activations"]
        print(f"  {layers:>2} layers: {plain / 1e6:7.1f} ({plain / layers / 1e6:.1f} per layer), checkpointed "
              f"{checkpointed / 1e6:7.1f} ({checkpointed / plain:.2f} of it)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=24, help="grid shapes, each without and with checkpointing")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also the layer sweep")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(f"device {mx.default_device()}; the loss alone (PLAIN_LOGITS {memory.PLAIN_LOGITS}, CHUNKED_LOGITS "
          f"{memory.CHUNKED_LOGITS}):", flush=True)
    measure_loss()
    if args.sweep:
        sweep()
    ratios = []
    for case in grid(args.shapes, args.seed):
        for grad_checkpoint in (False, True):
            r = step_peak(case, grad_checkpoint)
            estimate = memory.activation_bytes(r["shape"], r["batch"], r["seq"], grad_checkpoint, r["chunk"])
            ratios.append((estimate + r["peak"] - r["activations"]) / r["peak"])
            s = r["shape"]
            print(f"  hidden {s.hidden}, {s.layers} layers, top-{s.top_k} of {s.experts}, expert dim {s.expert_dim}, "
                  f"vocabulary {s.vocab}, {r['batch']} x {r['seq']}, checkpointing {grad_checkpoint}: peak "
                  f"{r['peak'] / 1e6:.1f} MB, estimate / measured {ratios[-1]:.3f}", flush=True)
    inside = sum(abs(x - 1) <= 0.15 for x in ratios)
    print(f"estimate / measured peak over {len(ratios)} steps: median {np.median(ratios):.3f}, range "
          f"{min(ratios):.3f}-{max(ratios):.3f}, {inside} within 15%")
    if args.json:
        print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
