"""DR-LoRA: dynamic-rank LoRA for Mixture-of-Experts models, on MLX.

What a user calls, in one place::

    import drlora_mlx

    model, tokenizer = mlx_lm.load("Qwen/Qwen3-30B-A3B-4bit")
    drlora = drlora_mlx.attach(model, drlora_mlx.DRLoRAConfig(r_init=8, r_target=16, r_max=32))
    drlora_mlx.run(drlora_mlx.TrainingArgs(model="...", data="..."), drlora_mlx.DRLoRAConfig())
    model, tokenizer, drlora = drlora_mlx.load("Qwen/Qwen3-30B-A3B-4bit", adapter_path="adapters")

The package's rooms: ``method/`` (the paper's equations), ``lora/`` (LoRA on
MoE experts), ``training/``, ``formats/`` (mlx-lm adapters, PEFT, fuse,
Hugging Face checkpoints), ``data/``, ``display/``, ``families/`` and
``config/``; ``docs/METHOD.md`` is the method as this package implements it.
"""

from .config.settings import DRLoRAConfig, TrainingArgs
from .formats.adapters import load
from .formats.fuse import fuse
from .formats.peft import export_peft, import_peft
from .formats.tiny import build_tiny
from .lora.attach import attach
from .lora.handle import DRLoRA
from .training.memory import memory_plan
from .training.run import run
from .version import __version__

__all__ = [
    "DRLoRA",
    "DRLoRAConfig",
    "TrainingArgs",
    "__version__",
    "attach",
    "build_tiny",
    "export_peft",
    "fuse",
    "import_peft",
    "load",
    "memory_plan",
    "run",
]
