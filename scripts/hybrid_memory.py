"""Peak memory of a DR-LoRA training step on hybrid models against their attention-only counterparts.

Qwen3-Next (gated-delta linear attention on three layers of four) and
Nemotron-H (Mamba-2 mixers) are built tiny, once as released (hybrid) and once
with every mixing layer full attention, same sizes otherwise; one compiled
training step (forward, backward, statistics, AdamW) runs at growing sequence
lengths and its peak memory is read from MLX.

    python scripts/hybrid_memory.py            # sequence lengths 256 ... 4096
    python scripts/hybrid_memory.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linux_blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm import load as mlx_lm_load  # noqa: E402

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs  # noqa: E402
from drlora_mlx.families import FAMILIES  # noqa: E402
from drlora_mlx.families.spec import TinyShape  # noqa: E402
from drlora_mlx.formats.tiny import build_tiny  # noqa: E402
from drlora_mlx.lora.attach import attach  # noqa: E402
from drlora_mlx.training.trainer import Trainer  # noqa: E402

SHAPE = TinyShape(hidden=256, layers=4, experts=16, top_k=2, expert_dim=128, heads=8, kv_heads=2, vocab=512)
# (family, how the attention-only counterpart differs)
MODELS = {
    "qwen3_next": {"full_attention_interval": 1},
    "nemotron_h": {"hybrid_override_pattern": "*E*E*"},
}


def build(family: str, root: Path, attention_only: bool) -> Path:
    path = root / f"{family}-{'attention' if attention_only else 'hybrid'}"
    build_tiny(family, path, SHAPE)
    if attention_only:
        config = json.loads((path / "config.json").read_text())
        config.update(MODELS[family])
        (path / "config.json").write_text(json.dumps(config))
        # re-initialised weights of the changed layers, same sizes elsewhere
        from drlora_mlx.families.mlx_lm_names import model_classes

        model_class, args_class = model_classes(config)
        model = model_class(args_class.from_dict(config))
        from mlx.utils import tree_flatten

        mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def peak_of_a_step(path: Path, seq: int, batch: int) -> int:
    model, _ = mlx_lm_load(str(path))
    drlora = attach(model, DRLoRAConfig(r_init=4, r_target=8, r_max=16), seed=0)
    trainer = Trainer(model, drlora, TrainingArgs(model=str(path), iters=1000, batch_size=batch, learning_rate=1e-4))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, SHAPE.vocab, (batch, seq + 1)).astype(np.int32)
    lengths = np.tile([0, seq + 1], (batch, 1)).astype(np.int32)
    trainer.train_step(tokens, lengths)  # compiles
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer.train_step(tokens, lengths)
    return mx.get_peak_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="256,512,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in MODELS:
            assert family in FAMILIES
            for attention_only in (False, True):
                path = build(family, Path(tmp), attention_only)
                kind = "attention-only" if attention_only else "hybrid"
                results[f"{family} {kind}"] = {s: peak_of_a_step(path, s, args.batch) for s in seqs}
    if args.json:
        print(json.dumps(results))
        return
    print(f"peak memory of one training step, MB (batch {args.batch}; {mx.default_device()})")
    print(f"{'model':<32}" + "".join(f"{s:>10}" for s in seqs))
    for name, row in results.items():
        print(f"{name:<32}" + "".join(f"{row[s] / 2**20:>10.1f}" for s in seqs))


if __name__ == "__main__":
    main()
