"""What a run did, in words and numbers: growth events and the end-of-run summary."""

from __future__ import annotations

import numpy as np

from ..lora.summary import parameter_counts
from .progress import format_time, rank_heatmap


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
        f"allocated, {drlora.config.resolved_lora_layout} layout: {counts['expert_lora_allocated']:,})",
        f"  {'trainable parameters':<28}{counts['trainable']:,}",
    ]
    return "\n".join(lines)
