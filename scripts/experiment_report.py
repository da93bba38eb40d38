"""The experiment's report: the Markdown tables, the rank-vs-routing numbers and the PNG figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drlora_mlx.display.png import heatmap_png, line_chart_png

ARM_LABELS = {
    "lora_r_target": "LoRA r_target (same budget)",
    "lora_r_max": "LoRA r_max (2x budget)",
    "drlora": "DR-LoRA",
    "routed": "Routed experts (top quarter, same budget)",
    "routed_frozen_router": "Routed experts, frozen router",
    "routed_long_profile": "Routed experts, routing profiled over 10% of the steps",
    "frequency_only": "DR-LoRA, frequency-only saliency",
    "importance_only": "DR-LoRA, importance-only saliency",
    "frozen_router": "DR-LoRA, frozen router",
    "global_allocation": "DR-LoRA, global allocation",
    "router_lr_1": "DR-LoRA, router at 1 x lr",
    "router_lr_0.3": "DR-LoRA, router at 0.3 x lr",
    "router_lr_0.1": "DR-LoRA, router at 0.1 x lr",
    "router_lr_0.03": "DR-LoRA, router at 0.03 x lr",
    "router_lr_0.01": "DR-LoRA, router at 0.01 x lr",
}
TASK_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def expert_ranks(ranks: np.ndarray, n_experts: int) -> np.ndarray:
    """(layers, modules) module ranks -> (layers, experts): the rank summed over an expert's projections."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return ranks.reshape(ranks.shape[0], -1, n_experts).sum(axis=1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties get their mean rank); 0 when either side is constant."""

    def ranked(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranked(x), ranked(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_routing_correlation(ranks, routing) -> float:
    """Mean over MoE layers of the Spearman correlation between an expert's
    final rank (summed over its projections) and the task's routing weight to
    it, measured on held-out task data after training. Per layer, because the
    per-layer allocation gives every layer the same budget."""
    routing = np.asarray(routing, dtype=np.float64)
    per_expert = expert_ranks(ranks, routing.shape[1])
    return float(np.mean([spearman(per_expert[l], routing[l]) for l in range(routing.shape[0])]))


def mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def results_table(results: dict, tasks: list[str], arms: list[str]) -> str:
    """Held-out loss and exact match per task (mean ± std over seeds), and their averages over tasks."""
    head = "| arm | " + " | ".join(f"{t} loss | {t} exact match" for t in tasks) + " | mean loss | mean exact match |"
    lines = [head, "|" + "---|" * (2 * len(tasks) + 3)]
    base = ["base model (no adapter)"]
    for t in tasks:
        b = results["tasks"][t]["base"]
        base += [f"{b['test_loss']:.3f}", f"{b['exact_match']:.3f}"]
    base += [f"{np.mean([results['tasks'][t]['base']['test_loss'] for t in tasks]):.3f}",
             f"{np.mean([results['tasks'][t]['base']['exact_match'] for t in tasks]):.3f}"]
    lines.append("| " + " | ".join(base) + " |")
    for arm in arms:
        runs = {t: results["tasks"][t]["arms"].get(arm, []) for t in tasks}
        if not all(runs.values()):
            continue
        row = [ARM_LABELS.get(arm, arm)]
        for t in tasks:
            row += [mean_std([r["test_loss"] for r in runs[t]]), mean_std([r["exact_match"] for r in runs[t]])]
        seeds = min(len(v) for v in runs.values())
        avg_loss = [np.mean([runs[t][s]["test_loss"] for t in tasks]) for s in range(seeds)]
        avg_em = [np.mean([runs[t][s]["exact_match"] for t in tasks]) for s in range(seeds)]
        row += [mean_std(avg_loss), mean_std(avg_em)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rank_table(results: dict, tasks: list[str], arms: list[str], r_target: int) -> str:
    """Per DR-LoRA or routed arm and task: spread of the final module ranks and their correlation with task routing."""
    lines = ["| arm | task | min rank | max rank | std of ranks | modules above r_target | rank-routing correlation |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        for t in tasks:
            runs = [r for r in results["tasks"][t]["arms"].get(arm, []) if r["method"] != "lora"]
            if not runs:
                continue
            ranks = [np.asarray(r["ranks"]) for r in runs]
            lines.append(
                f"| {ARM_LABELS.get(arm, arm)} | {t} | {min(int(r.min()) for r in ranks)} | "
                f"{max(int(r.max()) for r in ranks)} | {mean_std([r.std() for r in ranks])} | "
                f"{mean_std([(r > r_target).mean() for r in ranks])} | "
                f"{mean_std([r['rank_routing_correlation'] for r in runs])} |"
            )
    return "\n".join(lines)


def budget_table(results: dict, tasks: list[str], r_init: int, r_max: int) -> str:
    """Where DR-LoRA's budget went against the routed arm's choice, per task, seed against seed: the share
    of DR-LoRA's grown ranks (above r_init, summed over projections) that sit on the experts the routed arm
    chose, how many of DR-LoRA's k highest-ranked experts per layer are among those k, the share of DR-LoRA's
    modules held at r_max (its cap binding), and the held-out routing weight each arm's top experts receive."""
    lines = [("| task | DR-LoRA growth on routed's experts | top-k overlap | DR-LoRA modules at r_max | "
              "routing weight on routed's experts | on DR-LoRA's top k |"), "|---|---|---|---|---|---|"]
    for t in tasks:
        arms = results["tasks"][t]["arms"]
        pairs = list(zip(arms.get("drlora", []), arms.get("routed", [])))
        if not pairs:
            continue
        grown, overlap, capped, routed_weight, drlora_weight = [], [], [], [], []
        for drlora, routed in pairs:
            routing = np.asarray(drlora["routing"], dtype=np.float64)
            n_experts = routing.shape[1]
            chosen = expert_ranks(routed["ranks"], n_experts) > 0
            k = int(chosen[0].sum())
            growth = expert_ranks(np.asarray(drlora["ranks"]) - r_init, n_experts)
            top = np.zeros_like(chosen)
            for l, row in enumerate(expert_ranks(drlora["ranks"], n_experts)):
                top[l, np.argsort(-row, kind="stable")[:k]] = True
            grown.append((growth * chosen).sum() / growth.sum())
            overlap.append((top & chosen).sum() / chosen.sum())
            capped.append((np.asarray(drlora["ranks"]) == r_max).mean())
            share = routing / routing.sum(axis=1, keepdims=True)
            routed_weight.append((share * chosen).sum(axis=1).mean())
            drlora_weight.append((share * top).sum(axis=1).mean())
        lines.append(f"| {t} | {mean_std(grown)} | {mean_std(overlap)} | {mean_std(capped)} | "
                     f"{mean_std(routed_weight)} | {mean_std(drlora_weight)} |")
    return "\n".join(lines)


def coverage_table(results: dict, tasks: list[str], arms: list[str]) -> str:
    """Per routed arm and task, per MoE layer: the share of the run's own held-out routing (after training)
    that reaches the experts it chose, i.e. that passes through an adapted expert."""
    rows = []
    for arm in arms:
        for t in tasks:
            runs = [r for r in results["tasks"][t]["arms"].get(arm, []) if r["method"] == "routed"]
            if not runs:
                continue
            shares = []
            for run in runs:
                routing = np.asarray(run["routing"], dtype=np.float64)
                chosen = expert_ranks(run["ranks"], routing.shape[1]) > 0
                shares.append((routing * chosen).sum(axis=1) / routing.sum(axis=1))
            per_layer = np.asarray(shares)
            rows.append(f"| {ARM_LABELS.get(arm, arm)} | {t} | "
                        + " | ".join(mean_std(per_layer[:, l]) for l in range(per_layer.shape[1])) + " |")
    if not rows:
        return ""
    n_layers = rows[0].count("|") - 3
    return "\n".join([f"| arm | task | {' | '.join(f'layer {l}' for l in range(n_layers))} |",
                      "|" + "---|" * (n_layers + 2), *rows])


def specialisation_table(record: dict) -> str:
    """Per MoE layer, before and after pretraining: how much the routing tells the domain, and how spread it is."""
    spec = record["specialisation"]
    lines = ["| MoE layer | domain information (init → pretrained) | router entropy | load entropy |",
             "|---|---|---|---|"]
    for l, info in enumerate(spec["pretrained"]["domain_information"]):
        lines.append(
            f"| {l} | {spec['initial']['domain_information'][l]:.3f} → {info:.3f} | "
            f"{spec['initial']['router_entropy'][l]:.3f} → {spec['pretrained']['router_entropy'][l]:.3f} | "
            f"{spec['initial']['load_entropy'][l]:.3f} → {spec['pretrained']['load_entropy'][l]:.3f} |"
        )
    return "\n".join(lines)


def matrix_text(matrix) -> str:
    """A (layers, columns) integer or float matrix, one line per layer."""
    matrix = np.asarray(matrix, dtype=np.float64)
    whole = bool(np.all(matrix == np.round(matrix)))
    return "\n".join(" ".join(f"{int(v):2d}" if whole else f"{v:.3f}" for v in row) for row in matrix)


def heatmap_figure(path: Path, run: dict, targets: list[str], r_min: int, r_max: int) -> None:
    """One panel per adapted projection (layers x experts, rank r_min dark -> r_max yellow), then the task's
    routing weight per expert (0 dark -> the layer's largest yellow, each layer scaled to its own maximum)."""
    ranks = np.asarray(run["ranks"])
    routing = np.asarray(run["routing"])
    n_experts = routing.shape[1]
    panels = [ranks[:, p * n_experts : (p + 1) * n_experts] for p in range(len(targets))]
    scaled = routing / np.maximum(routing.max(axis=1, keepdims=True), 1e-12)
    heatmap_png(path, panels + [scaled], [(r_min, r_max)] * len(panels) + [(0.0, 1.0)], cell=14)


def growth_figure(path: Path, trajectories: dict[str, list[dict]], iters: int, r_min: int, r_max: int) -> None:
    """Module ranks against the optimizer step: per task (blue, red, green, ... in order) the 90th percentile
    (dark) and the largest (light); in black the mean, which the schedule makes the same for every task."""
    series = []
    for i, points in enumerate(trajectories.values()):
        colour = TASK_COLOURS[i % len(TASK_COLOURS)]
        xs = np.array([p["step"] for p in points], dtype=np.float64)
        light = tuple(int(c + (255 - c) * 0.5) for c in colour)
        series.append((xs, np.array([p["max"] for p in points]), light))
        series.append((xs, np.array([p["p90"] for p in points]), colour))
    points = next(iter(trajectories.values()))
    series.append((np.array([p["step"] for p in points], dtype=np.float64), np.array([p["mean"] for p in points]),
                   (0, 0, 0)))
    line_chart_png(path, series, x_max=iters, y_min=r_min, y_max=r_max, y_step=max(1, r_max // 4))
