"""The mlx-lm MoE families drlora-mlx supports, one entry each, and those it refuses.

An entry (``spec.Family``) brings a family whole: how the mlx-lm model routes
(where the router is, how its output becomes the weight the block applies,
shared experts, attention, frozen parameters), how Hugging Face names it
(``spec.HFFamily``, for the PEFT export) and the config of a tiny model of it
(for the tests). A new family is one entry in one of the tables below.

Experts and MoE blocks are found by type: every mlx-lm MoE family keeps its
routed experts in a ``SwitchGLU`` or ``SwitchMLP``. The routing-weight rule of
an entry is checked when attaching against the weight the block really
applies (``attach``), so a rule that no longer matches mlx-lm's code falls
back to token counts instead of training on wrong statistics.
"""

from __future__ import annotations

from ..errors import InputError
from . import deepseek, mixtral, qwen
from .spec import Family, HFFamily

FAMILIES: dict[str, Family] = {**qwen.FAMILIES, **deepseek.FAMILIES, **mixtral.FAMILIES}

# mlx-lm MoE model files drlora-mlx does not adapt, and why.
REFUSED: dict[str, str] = {
    "deepseek_v41": (
        "mlx-lm's model cannot be differentiated: its router takes gradients through argpartition's indices and "
        "its weights pass through FP8 conversions that have no VJP, so no LoRA (drlora-mlx's or mlx_lm.lora's) "
        "can train it"
    ),
    "muse_spark": (
        "its router is never called as a module (a raw matmul) and its routing and expert combination run in "
        "Metal kernels, so routing cannot be observed and LoRA gradients cannot be taken through it"
    ),
}


class UnsupportedModelError(InputError):
    """The model is not an MoE model drlora-mlx can adapt."""


def family_of(model) -> str:
    """The mlx-lm model family: the name of the module that defines the model
    class (robust to mlx-lm's model_type remapping)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def lookup(model) -> tuple[str, Family]:
    name = family_of(model)
    if name in REFUSED:
        raise UnsupportedModelError(f"model family {name!r} is not supported: {REFUSED[name]}")
    if name not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {name!r} is not supported; supported MoE families: {', '.join(sorted(FAMILIES))}"
        )
    return name, FAMILIES[name]


def hf_family(name: str) -> HFFamily:
    """The Hugging Face side of a family, for exports and Hugging Face checkpoints."""
    family = FAMILIES.get(name)
    if family is not None and family.export_refusal:
        raise UnsupportedModelError(f"{name} cannot be exported for transformers: {family.export_refusal}")
    if family is None or family.hf is None:
        exportable = sorted(n for n, f in FAMILIES.items() if f.hf is not None and not f.export_refusal)
        reason = "transformers has no such model" if family is not None else "drlora-mlx does not know it"
        raise UnsupportedModelError(
            f"family {name!r} has no Hugging Face counterpart ({reason}); exportable families: {', '.join(exportable)}"
        )
    return family.hf

