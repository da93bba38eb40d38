"""What a run did, in words and numbers: growth events and the end-of-run summary."""

from __future__ import annotations

import math

import numpy as np

from ..lora.summary import parameter_counts
from ..method.routed import routed_ranks, select_experts, selection_count
from .progress import format_time, rank_heatmap


def module_label(drlora, m: int) -> str:
    """'e5.up' for module index m = p * E + e."""
    p, e = divmod(m, drlora.n_experts)
    return f"e{e}.{drlora.targets[p].replace('_proj', '')}"


def chosen_experts(ranks: np.ndarray, n_experts: int) -> list[list[int]]:
    """Per layer, the experts holding any rank (a routed run's choice), from
    module ranks (layers x modules, module m = p * E + e)."""
    held = np.asarray(ranks).reshape(len(ranks), -1, n_experts).any(axis=1)
    return [np.flatnonzero(row).tolist() for row in held]


def routed_summary(drlora, event) -> str:
    """One line for the routed method's event: per layer the experts chosen and
    their ranks, and the budget the r_max cap left unspent."""
    routed = event.routed
    chosen = chosen_experts(routed.ranks, drlora.n_experts)
    parts = [f"L{drlora.layers[l].index}: experts {','.join(map(str, experts))} at rank "
             f"{'/'.join(str(r) for r in sorted({int(routed.ranks[l, e]) for e in experts}))}"
             for l, experts in enumerate(chosen)]
    unspent = int(routed.unspent.sum())
    note = (f"; the cap r_max {drlora.r_max} left {unspent} budget ranks unspent (--r-max "
            f"{math.ceil(routed.wanted.max())} spends them)") if unspent else ""
    return f"step {event.step}: chose {sum(map(len, chosen))} experts{note} | " + "; ".join(parts)


def routed_plan(drlora, schedule) -> str:
    """What the routed method will do, said before training: how long routing
    is profiled, how many experts each layer adapts and at what rank, and the
    budget the r_max cap will leave unspent."""
    config, E = drlora.config, drlora.n_experts
    lead = (f"routed: routing profiled with the expert LoRA off for {schedule.warmup_steps} optimizer steps, then "
            f"per layer ")
    budget = f"N_mod x r_target = {schedule.budget} ranks per layer"
    if config.routed_share:
        return (lead + f"the fewest most routed experts whose routing shares reach {config.routed_share} share "
                f"{budget} (at most r_max {config.r_max} each)")
    k = selection_count(E, config.routed_fraction)
    plan = routed_ranks(select_experts(np.zeros((1, E)), config.routed_fraction), np.zeros((1, E)),
                        len(drlora.targets), config.r_target, config.r_max)
    ranks = sorted({int(r) for r in plan.ranks[0] if r})
    text = (lead + f"the {k} most routed of {E} experts share {budget}: rank {'/'.join(map(str, ranks))} "
            f"(r_target x E / k = {plan.wanted[0]:g})")
    if plan.unspent[0]:
        text += (f"; capped at r_max {config.r_max}, {int(plan.unspent[0])} ranks per layer stay unspent (--r-max "
                 f"{math.ceil(plan.wanted[0])} spends them)")
    return text


def event_summary(drlora, event) -> str:
    """One line: the step, the ranks grown and which modules took them, per layer."""
    if event.routed is not None:
        return routed_summary(drlora, event)
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
