"""Starting a run from an mlx-lm LoRA adapter (``resume_adapter_file``).

``mlx_lm.lora --resume-adapter-file F`` loads F's LoRA weights into the model
before training. Here F (an ``adapters.safetensors`` of mlx-lm's format: every
module at one rank r, ``lora_a`` / ``lora_b`` as mlx-lm's ``LoRASwitchLinear``
and ``LoRALinear`` hold them) fills the first r ranks of the modules this run
adapts; their other ranks keep their fresh initialisation (A random, B zero),
so the run starts from F's function and can still grow. Statistics, optimizer
state and growth start afresh: this is a new run with F's weights.

When F's ``adapter_config.json`` is beside it with another LoRA scale, B is
rescaled so that scale * B A, the update, is F's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..errors import InputError


class AdapterFileError(InputError):
    """An adapter file that cannot start this run; the message says why."""


def _file_scale(path: Path, ours: float) -> tuple[float, str | None]:
    """The scale F was trained with (from its adapter_config.json), and a note when it is not known."""
    config = path.parent / "adapter_config.json"
    try:
        return float(json.loads(config.read_text())["lora_parameters"]["scale"]), None
    except (OSError, ValueError, KeyError, TypeError):
        return ours, f"note: no adapter_config.json with lora_parameters.scale beside {path}: its LoRA scale is taken to be this run's ({ours})"


def _fill(current: mx.array, loaded: mx.array, rank_axis: int) -> mx.array:
    """``current`` with its first ranks along ``rank_axis`` replaced by ``loaded``."""
    r = loaded.shape[rank_axis]
    index = [slice(None)] * current.ndim
    index[rank_axis] = slice(r, None)
    return mx.concatenate([loaded.astype(current.dtype), current[tuple(index)]], axis=rank_axis)


def start_from_adapter_file(drlora, path: str | Path) -> list[str]:
    """Load the mlx-lm adapter file ``path`` into the freshly attached ``drlora``; returns notes to print."""
    path = Path(path)
    if drlora.config.method == "routed":
        raise AdapterFileError(f"resume_adapter_file {path}: --method routed starts with LoRA off until routing "
                               "chooses its experts, so it cannot start from an adapter's weights; use --method "
                               "drlora or lora")
    if path.is_dir():
        path = path / "adapters.safetensors"
    if not path.exists():
        raise AdapterFileError(f"resume_adapter_file {path} does not exist; give an mlx-lm adapters.safetensors")
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError):
        raise AdapterFileError(f"resume_adapter_file {path} is not a safetensors file") from None
    scale, note = _file_scale(path, drlora.config.scale)
    notes = [note] if note else []
    factor = scale / drlora.config.scale
    used = set()

    def pair(module_path: str, rank_axis_a: int, shape_a: tuple, rank_axis_b: int, shape_b: tuple, width: int):
        a, b = weights.get(f"{module_path}.lora_a"), weights.get(f"{module_path}.lora_b")
        if a is None or b is None:
            return None
        used.update({f"{module_path}.lora_a", f"{module_path}.lora_b"})
        r = a.shape[rank_axis_a]
        if r != b.shape[rank_axis_b]:
            raise AdapterFileError(f"{path}: {module_path} has lora_a of rank {r} but lora_b of rank "
                                   f"{b.shape[rank_axis_b]}; it is not an mlx-lm LoRA adapter")
        other_a = tuple(n for i, n in enumerate(a.shape) if i != rank_axis_a)
        other_b = tuple(n for i, n in enumerate(b.shape) if i != rank_axis_b)
        if other_a != shape_a or other_b != shape_b:
            raise AdapterFileError(f"{path}: {module_path} has shape {tuple(a.shape)} / {tuple(b.shape)}, which does "
                                   "not fit this model; give the adapter of this base model")
        if r > width:
            return r
        return a, b * factor

    r_start = drlora.config.ranks.r_init
    for module_path, module in drlora.expert_modules():
        E, out_dims, in_dims = module.num_experts, module.output_dims, module.input_dims
        loaded = pair(module_path, 1, (E, in_dims), 2, (E, out_dims), r_start)
        if isinstance(loaded, int):
            raise AdapterFileError(
                f"{path} has rank {loaded}, more than the {r_start} ranks every expert starts with here; give "
                f"--r-init {loaded} or more (for DR-LoRA, --r-target and --r-max above it), or --method lora "
                f"--lora-rank {loaded}")
        if loaded is None:
            continue
        a, b = module.masked_factors()
        module.load_factors(_fill(a, loaded[0], 1), _fill(b, loaded[1], 2), module.ranks())
    for module_path, lora in drlora.extra_loras:
        width = lora.lora_a.shape[1]
        loaded = pair(module_path, 1, (lora.lora_a.shape[0],), 0, (lora.lora_b.shape[1],), width)
        if isinstance(loaded, int):
            raise AdapterFileError(f"{path} has rank {loaded} at {module_path}, more than its rank {width} here; "
                                   f"give --lora-rank {loaded} or more")
        if loaded is not None:
            lora.lora_a = _fill(lora.lora_a, loaded[0], 1)
            lora.lora_b = _fill(lora.lora_b, loaded[1], 0)
    unused = sorted({k.rsplit(".", 1)[0] for k in weights} - {k.rsplit(".", 1)[0] for k in used})
    if unused:
        raise AdapterFileError(
            f"{path} adapts {unused[0]}" + (f" and {len(unused) - 1} more modules" if len(unused) > 1 else "")
            + ", which this run does not adapt; add them to lora_parameters.keys (or --targets for expert projections)")
    if not used:
        raise AdapterFileError(f"{path} holds no LoRA weights for the modules this run adapts")
    mx.eval(drlora.model.trainable_parameters())
    return notes
