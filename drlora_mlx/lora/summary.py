"""What an attached adapter is, in words and numbers: its parameter counts and description."""

from __future__ import annotations

from mlx.utils import tree_flatten


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
    ranks = {"lora": f"rank {r_init}",
             "routed": f"ranks 0 -> {r_target} on average, on the most routed experts only (max {r_max})"}.get(
        config.method, f"ranks {r_init} -> {r_target} on average (max {r_max})")
    lines = [
        f"{config.method} on {drlora.family_name}: {drlora.n_layers} MoE layers x {drlora.n_experts} experts x "
        f"{len(drlora.targets)} projections ({', '.join(drlora.targets)}) = {n_mod} expert modules, {ranks}",
        f"  expert LoRA parameters: {counts['expert_lora_allocated']:,} allocated ({config.resolved_lora_layout} layout), "
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
