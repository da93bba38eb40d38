"""Where the memory estimate's counts come from: real training steps, measured and fitted.

``drlora-mlx plan`` and the warning before training estimate the activations a
step keeps from a handful of counts (``drlora_mlx.training.memory``:
LAYER_VALUES, FIRST_LAYER_SHARE, CHECKPOINTED_SHARE, RECOMPUTED_LAYERS, PLAIN_LOGITS,
CHUNKED_LOGITS). This script measures them:

1. the loss alone (a head and the cross-entropy, the plain and the chunked
   loss) at several vocabularies and token counts: PLAIN_LOGITS and
   CHUNKED_LOGITS, in units of a (tokens x vocabulary) and a (chunk x
   vocabulary) array;
2. one training step of drlora-mlx's Trainer (DR-LoRA, pooled layout, the
   widest rank product) on a seeded random grid of tiny Qwen3-MoE shapes
   (hidden 128-512, 2-4 layers, 8-32 experts, top-2 to top-8, head sizes,
   vocabularies 1k-64k, 64-1024 tokens), without and with gradient
   checkpointing: the peak above the weights, less the LoRA state (counted
   exactly), less the loss, fitted by least squares in relative error to the
   per-token, per-layer counts;

then prints the counts and, for every measured step, the estimate over the
measured peak. ``tests/test_memory.py`` checks the estimate against measured
peaks of shapes outside this grid, and ``scripts/bench.py --shape
qwen3-30b-a3b`` on a slice of a real model.

    python scripts/memory_fit.py              # ~15 minutes on 2 CPU cores
    python scripts/memory_fit.py --shapes 12  # a smaller grid
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
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

LAYER_TERMS = ("hidden", "query", "expert_inputs", "expert_intermediates", "attention_scores")


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


def fit_loss() -> tuple[float, float]:
    """PLAIN_LOGITS and CHUNKED_LOGITS: the loss's peak over a (tokens x vocabulary), and over a
    (chunk x vocabulary) float32 array; the chunked count is the largest seen (it grows with the
    number of chunks up to about ten)."""
    plain, chunked = [], []
    for hidden, vocab, tokens in ((256, 16384, 512), (256, 65536, 1024), (512, 32768, 2048)):
        chunk = memory.chunk_tokens(vocab, None)
        plain.append(loss_peak(hidden, vocab, tokens, 0) / (tokens * vocab * 4))
        chunked.append(loss_peak(hidden, vocab, tokens, chunk) / (chunk * vocab * 4))
        print(f"  loss, hidden {hidden}, vocabulary {vocab}, {tokens} tokens: plain {plain[-1]:.2f} x tokens x "
              f"vocabulary, chunked {chunked[-1]:.2f} x chunk x vocabulary", flush=True)
    return float(np.median(plain)), float(max(chunked))


def grid(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        hidden, heads = rng.choice([128, 256, 512]), rng.choice([4, 8])
        shape = TinyShape(hidden=hidden, layers=rng.choice([1, 2, 4, 8, 16]), experts=rng.choice([8, 16, 32]),
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


def layer_terms(shape, seq: int) -> np.ndarray:
    return np.array([shape.hidden, shape.query_width, shape.top_k * shape.hidden, shape.top_k * shape.expert_dim,
                     shape.heads * seq], float)


def loss_part(row: dict, plain: float, chunked: float) -> float:
    shape, tokens = row["shape"], row["batch"] * row["seq"]
    if tokens > memory.CHUNKS_THAT_PAY * row["chunk"]:
        return chunked * row["chunk"] * shape.vocab * 4
    return plain * tokens * shape.vocab * shape.dtype.size


def least_squares(x: np.ndarray, y: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Least squares in error relative to ``scale`` (what was measured), with no count below zero (a
    negative count is dropped and the rest refitted)."""
    keep = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[keep] = np.linalg.lstsq(x[:, keep] / scale[:, None], y / scale, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        keep.remove(int(np.argmin(coef)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=24, help="grid shapes, each without and with checkpointing")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print(f"device {mx.default_device()}; the loss alone:", flush=True)
    plain, chunked = fit_loss()
    rows = []
    for case in grid(args.shapes, args.seed):
        for grad_checkpoint in (False, True):
            rows.append(step_peak(case, grad_checkpoint))
            r = rows[-1]
            print(f"  {r['shape'].hidden=} {r['shape'].top_k=} {r['shape'].expert_dim=} {r['shape'].layers=} "
                  f"{r['shape'].vocab=} {r['batch']}x{r['seq']} checkpoint {grad_checkpoint}: "
                  f"{r['activations'] / 1e6:.1f} MB", flush=True)
    def tokens_bytes(r):
        return r["batch"] * r["seq"] * r["shape"].dtype.size

    plain_rows = [r for r in rows if not r["grad_checkpoint"]]
    y = np.array([r["activations"] - loss_part(r, plain, chunked) for r in plain_rows])
    scale = np.array([r["activations"] for r in plain_rows])

    def layer_fit(first: float) -> tuple[float, np.ndarray]:
        """Counts per layer for a first layer that keeps ``first`` of a layer's, and their worst error."""
        x = np.array([tokens_bytes(r) * (r["shape"].layers - 1 + first) * layer_terms(r["shape"], r["seq"])
                      for r in plain_rows])
        coef = least_squares(x, y, scale)
        return float(np.abs((x @ coef - y) / scale).max()), coef

    first = min(np.arange(0.0, 1.01, 0.05), key=lambda f: layer_fit(f)[0])
    layer = layer_fit(first)[1]
    # with checkpointing: a share of every layer's activations, and a number of layers' worth
    ckpt_rows = [r for r in rows if r["grad_checkpoint"] and r["shape"].layers > 2]
    per_layer = np.array([tokens_bytes(r) * layer_terms(r["shape"], r["seq"]) @ layer for r in ckpt_rows])
    x = np.stack([per_layer * np.array([r["shape"].layers for r in ckpt_rows]), per_layer], axis=1)
    y = np.array([r["activations"] - loss_part(r, plain, chunked) for r in ckpt_rows])
    share, recomputed = least_squares(x, y, np.array([r["activations"] for r in ckpt_rows]))
    counts = {"LAYER_VALUES": dict(zip(LAYER_TERMS, np.round(layer, 2).tolist())),
              "FIRST_LAYER_SHARE": round(float(first), 2),
              "CHECKPOINTED_SHARE": round(float(share), 3), "RECOMPUTED_LAYERS": round(float(recomputed), 2),
              "PLAIN_LOGITS": round(plain, 2), "CHUNKED_LOGITS": round(chunked, 2)}
    print("\ncounts:", json.dumps(counts))
    ratios = []
    with_counts = {name: getattr(memory, name) for name in counts}
    for name, value in counts.items():
        setattr(memory, name, value)
    for r in rows:
        estimate = memory.activation_bytes(r["shape"], r["batch"], r["seq"], r["grad_checkpoint"], r["chunk"])
        ratios.append((estimate + r["peak"] - r["activations"]) / r["peak"])
    for name, value in with_counts.items():
        setattr(memory, name, value)
    print(f"estimate / measured peak over {len(rows)} steps: median {np.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")
    if args.json:
        print(json.dumps({"counts": counts, "ratios": ratios}))


if __name__ == "__main__":
    main()
