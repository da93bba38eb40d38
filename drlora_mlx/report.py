"""What an attached adapter is and what a run did, in words and numbers."""

from __future__ import annotations

import numpy as np
from mlx.utils import tree_flatten

from .progress import format_time, rank_heatmap


def parameter_counts(drlora) -> dict:
    """Allocated (as the layout stores it), active and uniform-LoRA-at-r_target
    parameter counts of the expert LoRA."""
    active = uniform = 0
    r_target = drlora.config.ranks.r_target
    allocated = sum(a.size for layer in drlora.layers for a in layer.lora_arrays())
    for _, m in drlora.expert_modules():
        per_rank = m.input_dims + m.output_dims
        active += int(m.ranks().sum()) * per_rank
        uniform += m.num_experts * r_target * per_rank
    extra = sum(l.lora_a.size + l.lora_b.size for _, l in drlora.extra_loras)
    trainable = sum(v.size for _, v in tree_flatten(drlora.model.trainable_parameters()))
    return {
        "expert_lora_allocated": allocated,
        "expert_lora_active": active,
        "expert_lora_uniform_r_target": uniform,
        "fixed_rank_lora": extra,
        "trainable": trainable,
    }


def describe(drlora) -> str:
    """What was adapted: layers, experts, projections, ranks, router, notes."""
    config = drlora.config
    r_init, r_target, r_max = config.ranks
    counts = parameter_counts(drlora)
    n_mod = drlora.n_layers * drlora.n_modules
    ranks = f"rank {r_init}" if config.method == "lora" else f"ranks {r_init} -> {r_target} on average (max {r_max})"
    lines = [
        f"{config.method} on {drlora.family_name}: {drlora.n_layers} MoE layers x {drlora.n_experts} experts x "
        f"{len(drlora.targets)} projections ({', '.join(drlora.targets)}) = {n_mod} expert modules, {ranks}",
        f"  expert LoRA parameters: {counts['expert_lora_allocated']:,} allocated ({config.layout} layout), "
        f"{counts['expert_lora_active']:,} active now",
    ]
    if drlora.extra_loras:
        lines.append(
            f"  fixed-rank LoRA: {len(drlora.extra_loras)} linear layers, {counts['fixed_rank_lora']:,} parameters"
        )
    router = "trained " + config.train_router if config.train_router != "never" else "frozen"
    lines.append(f"  router: {router}; routing signal: {drlora.routing_signal}")
    lines.extend(f"  note: {n}" for n in drlora.notes)
    return "\n".join(lines)


def module_label(drlora, m: int) -> str:
    """'e5.up' for module index m = p * E + e."""
    p, e = divmod(m, drlora.n_experts)
    return f"e{e}.{drlora.targets[p].replace('_proj', '')}"


def event_summary(drlora, event) -> str:
    """One line: the step, the ranks grown and which modules took them, per layer."""
    parts = []
    for l, row in enumerate(event.grown):
        picks = [f"{module_label(drlora, m)}+{int(row[m])}" for m in np.flatnonzero(row)]
        if picks:
            parts.append(f"L{drlora.layers[l].index}: " + " ".join(picks))
    note = ""
    if event.by_frequency:
        layers = ",".join(f"L{drlora.layers[l].index}" for l in event.by_frequency)
        note = f" (importance all zero in {layers}: ranked by routing frequency)"
    return f"step {event.step}: grew {event.total} ranks{note} | " + "; ".join(parts)


def run_summary(drlora, result, steps_per_report: int) -> str:
    """The end-of-run summary: rank heatmap and a table of what was reached."""
    r_init, r_target, r_max = drlora.config.ranks
    ranks = drlora.ranks()
    counts = parameter_counts(drlora)
    last = [loss for _, loss in result.losses[-max(1, steps_per_report):]]
    lines = [
        rank_heatmap(ranks, drlora.targets, drlora.n_experts, r_init, r_max, [l.index for l in drlora.layers]),
        "",
    ]
    if last:  # (a resumed run that was complete trains nothing)
        lines.append(f"  {'train loss (last report)':<28}{np.mean(last):.3f}")
    if result.val_losses:
        lines.append(f"  {'valid loss':<28}{result.val_losses[-1][1]:.3f}")
    if result.test_loss is not None:
        lines.append(f"  {'test loss':<28}{result.test_loss:.3f}")
    lines += [
        f"  {'time':<28}{format_time(result.seconds)} ({result.tokens / max(result.seconds, 1e-9):,.0f} tok/s)",
        f"  {'peak memory':<28}{result.peak_memory_gb:.2f} GB",
        f"  {'mean active rank':<28}{ranks.mean():.2f} (per layer: {', '.join(f'{r:.2f}' for r in ranks.mean(1))})",
        f"  {'growth events':<28}{len(result.events)}",
        f"  {'active expert LoRA params':<28}{counts['expert_lora_active']:,} "
        f"(uniform LoRA at r_target {r_target}: {counts['expert_lora_uniform_r_target']:,}; "
        f"allocated, {drlora.config.layout} layout: {counts['expert_lora_allocated']:,})",
        f"  {'trainable parameters':<28}{counts['trainable']:,}",
    ]
    return "\n".join(lines)
