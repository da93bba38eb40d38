"""DR-LoRA: dynamic-rank LoRA for Mixture-of-Experts models, on MLX.

What a user calls is a name of this package (README, "Python API")::

    import drlora_mlx

    drlora_mlx.run(model="Qwen/Qwen3-30B-A3B-4bit", data="my_data", r_init=8, r_target=16, r_max=32)
    model, tokenizer, drlora = drlora_mlx.load("Qwen/Qwen3-30B-A3B-4bit", adapter_path="adapters")

The rooms: ``method/`` (the paper's equations), ``families/``, ``config/``,
``lora/`` (LoRA on MoE experts), ``data/``, ``display/``, ``formats/``
(mlx-lm adapters, PEFT, fuse, Hugging Face checkpoints) and ``training/``;
docs/METHOD.md is the method as this package implements it.
"""

from .config.settings import DRLoRAConfig, TrainingArgs
from .errors import DRLoRAError, InputError
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
    "DRLoRAError",
    "InputError",
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
