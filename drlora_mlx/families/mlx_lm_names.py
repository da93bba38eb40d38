"""mlx-lm's names for the parts of an MoE block, in one place.

drlora-mlx names an expert projection as SwitchGLU does (``gate_proj``,
``up_proj``, ``down_proj``); SwitchMLP calls its two ``fc1`` and ``fc2``. The
blocks keep their routed experts under one of ``EXPERT_CONTAINERS``. Every
room that meets these names (attaching, the memory plan, mlx_lm.lora's keys,
Hugging Face checkpoints, the PEFT export) reads them from here.
"""

from __future__ import annotations

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# How mlx-lm's MoE blocks name their routed experts (SwitchGLU / SwitchMLP).
EXPERT_CONTAINERS = ("switch_mlp", "switch_glu", "experts")
# SwitchMLP names its two projections fc1 / fc2.
SWITCH_MLP_NAMES = {"up_proj": "fc1", "down_proj": "fc2"}
# Any mlx-lm name of an expert projection -> ours.
PROJECTION_OF = {**{p: p for p in EXPERT_PROJECTIONS}, **{v: k for k, v in SWITCH_MLP_NAMES.items()}}


def projection_name(experts, target: str) -> str:
    """The attribute that holds projection ``target`` of an experts module
    (SwitchMLP's ``fc1`` for ``up_proj``); a name SwitchMLP lacks comes back as it is."""
    from mlx_lm.models.switch_layers import SwitchMLP

    return SWITCH_MLP_NAMES.get(target, target) if isinstance(experts, SwitchMLP) else target


def model_classes(config: dict):
    """(Model, ModelArgs) of ``config['model_type']``, resolved as mlx-lm resolves it
    (its own ``_get_classes``: the model file and any remapped type)."""
    from mlx_lm.utils import _get_classes

    return _get_classes(config)
