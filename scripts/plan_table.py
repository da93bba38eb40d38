"""What fits a 32, 48, 64 or 128 GB Mac: ``drlora-mlx plan`` over real models' config.json files.

For each model (``benchmarks/configs/*.json``: the published config.json, in
float or with mlx-lm's 4-bit quantization) and each batch x sequence length,
the peak of a DR-LoRA run (ranks 8 -> 16 within 32, pooled layout, gradient
checkpointing, the router trained after warm-up) with drlora-mlx's chunked
loss and with the plain loss (every token's logits, as mlx-lm's trainer), and
the smallest Mac it fits. A Mac gives the GPU Metal's recommended working set,
about three quarters of its memory (``--gpu-share``), and ``plan`` calls a run
fitting when it stays under 90% of that.

    python scripts/plan_table.py               # the README's table
    python scripts/plan_table.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drlora_mlx import DRLoRAConfig  # noqa: E402
from drlora_mlx.training.memory import FIT_SHARE, memory_plan  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
MACS = (32, 48, 64, 128)
Q4 = {"group_size": 64, "bits": 4}
# (config file, 4-bit or not, batch x sequence lengths)
RUNS = (
    ("OLMoE-1B-7B-0924", True, ((1, 2048), (4, 2048))),
    ("OLMoE-1B-7B-0924", False, ((4, 2048),)),
    ("gpt-oss-20b", False, ((1, 2048), (4, 2048))),  # its experts in MXFP4, as released
    ("Qwen3-30B-A3B", True, ((1, 2048), (4, 2048), (8, 2048))),
    ("Mixtral-8x7B-v0.1", True, ((1, 2048), (4, 2048))),
    ("Qwen3-30B-A3B", False, ((4, 2048),)),
)


def plan(name: str, quantized: bool, batch: int, seq: int) -> dict:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    if quantized:
        config["quantization"] = Q4
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        return memory_plan(folder, DRLoRAConfig(), batch, seq, grad_checkpoint=True)


def smallest_mac(peak: int, gpu_share: float) -> str:
    return next((f"{gb} GB" for gb in MACS if peak <= FIT_SHARE * gpu_share * gb * 1e9), "more than 128 GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-share", type=float, default=0.75, help="share of a Mac's memory Metal gives the GPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, quantized, shapes in RUNS:
        for batch, seq in shapes:
            p = plan(name, quantized, batch, seq)
            weights = "4-bit" if quantized else "MXFP4 experts" if p["quantization"] else p["dtype"]
            rows.append({"model": name, "weights": weights, "batch": batch, "seq": seq,
                         "weights_gb": p["base_weight_bytes"] / 1e9,
                         "peak_gb": p["peak_bytes"] / 1e9, "plain_loss_peak_gb": p["plain_loss_peak_bytes"] / 1e9,
                         "mac": smallest_mac(p["peak_bytes"], args.gpu_share),
                         "plain_loss_mac": smallest_mac(p["plain_loss_peak_bytes"], args.gpu_share)})
    if args.json:
        print(json.dumps(rows))
        return
    print("| model | weights | batch x tokens | weights GB | peak GB | smallest Mac | plain loss (mlx-lm's): peak GB "
          "| smallest Mac |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['batch']} x {r['seq']} | {r['weights_gb']:.1f} | "
              f"{r['peak_gb']:.1f} | {r['mac']} | {r['plain_loss_peak_gb']:.1f} | {r['plain_loss_mac']} |")


if __name__ == "__main__":
    main()
