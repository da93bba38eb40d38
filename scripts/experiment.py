"""Does DR-LoRA beat uniform LoRA at the same budget? The paper's comparison, offline and small.

1. A tiny Qwen3-MoE (4 layers x 16 experts, top-2) is pretrained, every weight,
   on four text domains shipped with Python (see ``experiment_data``) until its
   experts specialise; the routing report shows that they did.
2. It is fine-tuned through drlora-mlx's own ``attach`` + ``Trainer`` on three
   generated tasks it cannot do (digit sums, counting vowels, Python builtins),
   once per arm and seed: uniform LoRA at r_target (the same budget), uniform
   LoRA at r_max, DR-LoRA r_init -> r_target, routed-expert selection at the
   same budget (``--method routed``: each layer's most routed quarter of the
   experts, as ESFT and MoE-Sieve choose them), and the paper's ablations.
   Same steps, batches, learning rate and schedule for every arm.
3. Held-out loss and exact-match accuracy of greedy generation, mean +- std
   over seeds, go to ``results.md``; final rank heatmaps and rank growth go to
   PNG figures; everything is in ``results.json``.

    python scripts/experiment.py                # the default configuration, < 60 minutes on 2 CPU cores
    python scripts/experiment.py --quick        # a smaller one, < 5 minutes (what CI runs)
    python scripts/experiment.py --tasks code --arms lora_r_target,drlora --seeds 0

The pretrained base is cached (``DRLORA_MLX_CACHE``, default ``~/.cache/drlora-mlx``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linux_blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from experiment_base import Pretraining, pretrained_base  # noqa: E402
from experiment_data import TASKS, write_task  # noqa: E402
from experiment_report import (  # noqa: E402
    ARM_LABELS,
    budget_table,
    coverage_table,
    growth_figure,
    heatmap_figure,
    matrix_text,
    rank_routing_correlation,
    rank_table,
    results_table,
    specialisation_table,
)
from mlx_lm import load as mlx_lm_load  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs  # noqa: E402
from drlora_mlx.data.batches import eval_batches  # noqa: E402
from drlora_mlx.data.loading import load_datasets, read_jsonl  # noqa: E402
from drlora_mlx.formats.tiny import TinyShape  # noqa: E402
from drlora_mlx.lora.attach import attach  # noqa: E402
from drlora_mlx.training.loss import make_loss  # noqa: E402
from drlora_mlx.training.trainer import Trainer  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One configuration of the whole experiment."""

    pretraining: Pretraining
    iters: int
    batch_size: int
    learning_rate: float
    seeds: tuple[int, ...]
    ranks: tuple[int, int, int]  # r_init, r_target, r_max
    sizes: tuple[int, int, int]  # train, valid, test examples per task


DEFAULT = Setting(
    pretraining=Pretraining(
        shape=TinyShape(hidden=64, layers=4, experts=16, top_k=2, expert_dim=64, heads=4, kv_heads=2, vocab=1024),
        steps=1200,
    ),
    iters=240,
    batch_size=16,
    learning_rate=3e-3,
    seeds=(0, 1, 2),
    ranks=(2, 4, 8),
    sizes=(4000, 200, 200),
)
# Half the layers, a fifteenth of the pretraining, a fifth of the fine-tuning, one seed.
QUICK = replace(
    DEFAULT,
    pretraining=replace(DEFAULT.pretraining, shape=replace(DEFAULT.pretraining.shape, layers=2), steps=80),
    iters=48,
    batch_size=8,
    seeds=(0,),
    sizes=(400, 64, 64),
)


def setting_from_dict(d: dict) -> Setting:
    """The Setting that ``asdict`` turned into ``d`` (as results.json keeps it)."""
    p = d["pretraining"]
    pretraining = Pretraining(**{**p, "shape": TinyShape(**p["shape"])})
    return Setting(**{**d, "pretraining": pretraining, "seeds": tuple(d["seeds"]), "ranks": tuple(d["ranks"]),
                      "sizes": tuple(d["sizes"])})


@dataclass(frozen=True)
class Arm:
    """One arm: its method configuration and, if not the package's default, the
    router's learning rate as a share of the fine-tuning learning rate."""

    config: DRLoRAConfig
    router_lr_scale: float | None = None


# The main arms; --arms can add the router learning-rate ablation (router_lr_*) and the routed arm's (routed_*).
MAIN_ARMS = ("lora_r_target", "lora_r_max", "drlora", "routed", "frequency_only", "importance_only", "frozen_router",
             "global_allocation")


def arms(r_init: int, r_target: int, r_max: int) -> dict[str, Arm]:
    """Every arm. All train the router after warm-up (the package's default, at
    its default learning rate), except the frozen-router ablations and the
    router learning-rate ablation, so that uniform LoRA at r_target and
    DR-LoRA have the same trainable parameters."""
    drlora = DRLoRAConfig(r_init=r_init, r_target=r_target, r_max=r_max)
    # The competitor at the same budget: r_max as large as its chosen experts' rank, so that all of it is spent.
    routed = DRLoRAConfig(method="routed", r_target=r_target)
    routed = replace(routed, r_max=math.ceil(r_target / routed.routed_fraction))
    return {
        "lora_r_target": Arm(DRLoRAConfig(method="lora", lora_rank=r_target)),
        "lora_r_max": Arm(DRLoRAConfig(method="lora", lora_rank=r_max)),
        "drlora": Arm(drlora),
        "routed": Arm(routed),
        # Why it wins or loses (--arms): the router frozen, as ESFT and MoE-Sieve leave it, so that routing cannot
        # drift off the chosen experts; routing profiled over 10% of the steps instead of 3%.
        "routed_frozen_router": Arm(replace(routed, train_router="never")),
        "routed_long_profile": Arm(replace(routed, warmup_ratio=0.1)),
        "frequency_only": Arm(replace(drlora, saliency="frequency")),
        "importance_only": Arm(replace(drlora, saliency="importance")),
        "frozen_router": Arm(replace(drlora, train_router="never")),
        "global_allocation": Arm(replace(drlora, allocation="global")),
        **{f"router_lr_{scale:g}": Arm(drlora, scale) for scale in (1.0, 0.3, 0.1, 0.03, 0.01)},
    }


# ----- evaluation -------------------------------------------------------------


def greedy_answers(model, tokenizer, prompts: list[str], max_new: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of chat prompts, batched by prompt length, with mlx-lm's KV cache."""
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in prompts]
    eos = tokenizer.eos_token_id
    answers = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, tokens in enumerate(encoded):
        by_length.setdefault(len(tokens), []).append(i)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            rows = group[s : s + batch_size]
            cache = make_prompt_cache(model)
            logits = model(mx.array([encoded[i] for i in rows]), cache=cache)
            out = []
            done = np.zeros(len(rows), dtype=bool)
            for _ in range(max_new):
                nxt = mx.argmax(logits[:, -1], axis=-1)
                mx.eval(nxt)
                out.append(np.asarray(nxt))
                done |= out[-1] == eos
                if done.all():
                    break
                logits = model(nxt[:, None], cache=cache)
            tokens = np.stack(out, 1)
            for j, i in enumerate(rows):
                row = list(tokens[j])
                answers[i] = tokenizer.decode(row[: row.index(eos)] if eos in row else row)
    return answers


def exact_match(model, tokenizer, rows: list[dict], max_new: int) -> float:
    """Share of examples whose greedy completion equals the reference exactly (outer whitespace ignored)."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new)
    return float(np.mean([a.strip() == r["completion"].strip() for a, r in zip(answers, rows)]))


def task_routing(model, drlora, dataset, batch_size: int) -> np.ndarray:
    """Mean applied routing weight per expert (MoE layers x experts) over the
    loss tokens of ``dataset``: what the task routes where, measured the way
    DR-LoRA measures routing frequency."""
    loss = make_loss(drlora, record=True)
    total, count = 0.0, 0.0
    for batch, lengths in eval_batches(dataset, batch_size, 4096):
        _, n, sums = loss(model, mx.array(batch), mx.array(lengths))
        total = total + np.asarray(sums)
        count += n.item()
    return total / max(count, 1.0)


# ----- one fine-tuning run ----------------------------------------------------


def rank_trajectory(drlora, events, r_init: int) -> list[dict]:
    """Quantiles of the module ranks after every growth event (and at step 0)."""
    ranks = np.full((drlora.n_layers, drlora.n_modules), r_init)
    points = []

    def point(step):
        q = np.percentile(ranks, [0, 10, 50, 90, 100])
        points.append({"step": step, "min": q[0], "p10": q[1], "median": q[2], "p90": q[3], "max": q[4],
                       "mean": float(ranks.mean())})

    point(0)
    for event in events:
        ranks = ranks + event.grown
        point(event.step)
    return points


def finetune(base: str, arm: Arm, data: dict, setting: Setting, seed: int, max_new: int) -> dict:
    """Fine-tune the base with one arm's configuration and measure it."""
    config = arm.config
    model, tokenizer = mlx_lm_load(base)
    mx.random.seed(seed)
    drlora = attach(model, config, seed=seed)
    router_lr = None if arm.router_lr_scale is None else arm.router_lr_scale * setting.learning_rate
    args = TrainingArgs(model=base, iters=setting.iters, batch_size=setting.batch_size,
                        learning_rate=setting.learning_rate, router_learning_rate=router_lr, seed=seed,
                        steps_per_report=setting.iters, steps_per_eval=setting.iters, save_every=setting.iters,
                        mask_prompt=True)
    trainer = Trainer(model, drlora, args)
    tic = time.perf_counter()
    result = trainer.run(data["train"])
    seconds = time.perf_counter() - tic
    model.eval()
    record = {
        "method": config.method,
        "seed": seed,
        "router_learning_rate": args.router_learning_rate,
        "train_seconds": seconds,
        "final_train_loss": float(np.mean([l for _, l in result.losses[-max(1, len(result.losses) // 10):]])),
        "test_loss": trainer.evaluate(data["test"], -1),
        "exact_match": exact_match(model, tokenizer, data["test_rows"], max_new),
        "valid_loss": trainer.evaluate(data["valid"], -1),
        "ranks": drlora.ranks().tolist(),
        "frequency": np.asarray(drlora.routing.frequency).tolist(),
        "routing": task_routing(model, drlora, data["test"], setting.batch_size).tolist(),
        "trajectory": rank_trajectory(drlora, result.events, config.ranks[0]),
        "parameters": drlora.parameter_counts(),
        "seconds": time.perf_counter() - tic,
    }
    if config.method != "lora":
        record["rank_routing_correlation"] = rank_routing_correlation(record["ranks"], record["routing"])
    return record


def base_scores(base: str, data: dict, setting: Setting, max_new: int) -> dict:
    """The base model's held-out loss and exact match on a task, with nothing attached."""
    model, tokenizer = mlx_lm_load(base)
    drlora = attach(model, DRLoRAConfig(method="lora", lora_rank=1), seed=0)  # B = 0: the base's function
    trainer = Trainer(model, drlora, TrainingArgs(model=base, iters=1, batch_size=setting.batch_size))
    model.eval()
    return {"test_loss": trainer.evaluate(data["test"], -1),
            "exact_match": exact_match(model, tokenizer, data["test_rows"], max_new)}


# ----- the whole experiment ---------------------------------------------------


def task_data(task: str, folder: Path, tokenizer, setting: Setting) -> dict:
    train, valid, test = setting.sizes
    folder = write_task(task, folder, {"train": train, "valid": valid, "test": test})
    tr, va, te = load_datasets(folder, tokenizer, mask_prompt=True, need_test=True)
    return {"train": tr, "valid": va, "test": te, "test_rows": read_jsonl(folder / "test.jsonl")}


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} ({mx.default_device()})"


def write_report(out: Path, results: dict, setting: Setting, tasks: list[str], arm_names: list[str]) -> str:
    """results.md and the figures; returns the Markdown."""
    r_init, r_target, r_max = setting.ranks
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    trajectories = {}
    heat = []
    for t in tasks:
        for arm, name in (("drlora", f"ranks-{t}.png"), ("routed", f"routed-{t}.png")):
            runs = results["tasks"][t]["arms"].get(arm, [])
            if not runs:
                continue
            run = runs[0]
            heatmap_figure(figures / name, run, results["targets"], 0 if arm == "routed" else r_init,
                           int(np.max(run["ranks"])) if arm == "routed" else r_max)
            if arm == "drlora":
                trajectories[t] = run["trajectory"]
            heat.append(
                f"**{t}, {ARM_LABELS[arm]}** (seed {run['seed']}): final rank per module, then the task's routing "
                f"weight per expert; `figures/{name}` shows {' | '.join(results['targets'])} | routing, layers top "
                "to bottom.\n\n```\n" + matrix_text(run["ranks"]) + "\n\nrouting\n" + matrix_text(run["routing"])
                + "\n```"
            )
    if trajectories:
        growth_figure(figures / "rank-growth.png", trajectories, setting.iters, 0, r_max)
    growth = []
    for t, points in trajectories.items():
        shown = [points[i] for i in sorted(set(np.linspace(0, len(points) - 1, 9).round().astype(int)))]
        growth.append(f"- {t}: " + ", ".join(f"{p['step']}: {p['mean']:.2f}/{p['p90']:.0f}/{p['max']:.0f}" for p in shown))
    p = setting.pretraining
    md = [
        f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} minutes on {results['machine']}).",
        "",
        f"Base: tiny `qwen3_moe`, {p.shape.layers} layers x {p.shape.experts} experts (top-{p.shape.top_k}), hidden "
        f"{p.shape.hidden}, expert dim {p.shape.expert_dim}, vocabulary {p.shape.vocab}; every weight pretrained for "
        f"{p.steps} steps (batch {p.batch_size} x {p.seq_length} tokens) on four domains that ship with Python: "
        "the reference documentation (`pydoc_data.topics`), standard-library source, the Unicode character names "
        "(`unicodedata`) and `calendar` month tables. Pretraining loss "
        f"{np.mean(results['pretraining']['losses'][:10]):.2f} → {np.mean(results['pretraining']['losses'][-20:]):.2f}.",
        "",
        "Expert specialisation on held-out text (domain information: mutual information between a token's domain "
        "and its experts over the domain entropy, 0 = routing ignores the domain; router and load entropies over "
        "log(experts), 1 = uniform):",
        "",
        specialisation_table(results["pretraining"]),
        "",
        f"Fine-tuning: {setting.iters} steps, batch {setting.batch_size}, learning rate {setting.learning_rate}, "
        f"prompt masked, {setting.sizes[0]} training examples per task, {setting.sizes[2]} held-out test examples; "
        f"ranks r_init {r_init}, r_target {r_target}, r_max {r_max} on {' and '.join(results['targets'])} of every "
        f"expert; seeds {', '.join(map(str, setting.seeds))} (mean ± std over seeds). Exact match: greedy "
        "generation equals the answer.",
        "",
        results_table(results, tasks, arm_names),
        "",
        "Final ranks of the DR-LoRA and routed arms, and the correlation (Spearman, per layer, averaged) between an expert's "
        "rank and the routing weight the task gives it on held-out data:",
        "",
        rank_table(results, tasks, arm_names, r_target),
        "",
        *([("DR-LoRA against the routed arm's choice (seed against seed; routing weight: the share of the task's "
            "held-out routing, after training, that the experts receive):"), "",
           budget_table(results, tasks, r_init, r_max), ""] if {"drlora", "routed"} <= set(arm_names) else []),
        *([("The routed arms' own held-out routing after training: the share that reaches the experts they chose, "
            "per MoE layer:"), "", coverage_table(results, tasks, arm_names), ""]
          if any(a.startswith("routed") for a in arm_names) else []),
        "Rank growth of DR-LoRA, seed 0 (`figures/rank-growth.png`: per task in the order above, blue, red, green, the "
        "90th percentile of the module ranks dark and the largest light; the mean in black). Per task, optimizer "
        "step: mean/90th percentile/largest module rank, at nine points; every event is in `results.json`):",
        "",
        *growth,
        "",
        *heat,
    ]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration CI runs (< 5 minutes)")
    parser.add_argument("--out", default="experiment-results", help="output folder (default: experiment-results)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks (default: all)")
    parser.add_argument("--arms", default=None, help="comma list of arms (default: all)")
    parser.add_argument("--seeds", default=None, help="comma list of seeds (default: the configuration's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="fine-tuning learning rate of every arm")
    parser.add_argument("--iters", type=int, default=None, help="fine-tuning iterations of every arm")
    parser.add_argument("--report", action="store_true",
                        help="only write results.md and the figures again from OUT/results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        if not (out / "results.json").is_file():
            parser.error(f"{out / 'results.json'} does not exist; run the experiment with --out {out} first")
        results = json.loads((out / "results.json").read_text())
        setting = setting_from_dict(results["setting"])
        ran = [a for a in arms(*setting.ranks) if any(a in entry["arms"] for entry in results["tasks"].values())]
        print(write_report(out, results, setting, list(results["tasks"]), ran))
        return 0

    setting = QUICK if args.quick else DEFAULT
    if args.seeds:
        setting = replace(setting, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.learning_rate:
        setting = replace(setting, learning_rate=args.learning_rate)
    if args.iters:
        setting = replace(setting, iters=args.iters)
    all_arms = arms(*setting.ranks)
    arm_names = args.arms.split(",") if args.arms else list(MAIN_ARMS)
    tasks = args.tasks.split(",")
    unknown = [a for a in arm_names if a not in all_arms] + [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown arm or task {', '.join(unknown)}; arms: {', '.join(all_arms)}; tasks: {', '.join(TASKS)}")
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - tic:6.0f} s] {msg}", flush=True)

    log("pretrained base: building or reading from the cache")
    base, record = pretrained_base(setting.pretraining, log=lambda m: log(m.strip()))
    info = record["specialisation"]["pretrained"]["domain_information"]
    log(f"base {base}: domain information per layer " + ", ".join(f"{v:.2f}" for v in info))
    _, tokenizer = mlx_lm_load(str(base))
    results = {
        "command": " ".join(["python scripts/experiment.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "setting": asdict(setting),
        "targets": list(DRLoRAConfig().targets),
        "pretraining": {**record, "losses": record["losses"]},
        "tasks": {},
    }
    max_new = 6
    for task in tasks:
        data = task_data(task, out / "data" / task, tokenizer, setting)
        entry = {"base": base_scores(str(base), data, setting, max_new), "arms": {}}
        results["tasks"][task] = entry
        log(f"{task}: base model loss {entry['base']['test_loss']:.3f}, exact match {entry['base']['exact_match']:.3f}")
        for name in arm_names:
            for seed in setting.seeds:
                run = finetune(str(base), all_arms[name], data, setting, seed, max_new)
                entry["arms"].setdefault(name, []).append(run)
                extra = (f", rank-routing correlation {run['rank_routing_correlation']:.2f}"
                         if "rank_routing_correlation" in run else "")
                log(f"{task} {name} seed {seed}: loss {run['test_loss']:.3f}, exact match {run['exact_match']:.3f}"
                    f"{extra} ({run['seconds']:.0f} s)")
            results["seconds"] = time.perf_counter() - tic
            (out / "results.json").write_text(json.dumps(results))
    results["seconds"] = time.perf_counter() - tic
    (out / "results.json").write_text(json.dumps(results))
    print(write_report(out, results, setting, tasks, arm_names))
    log(f"done: {out / 'results.md'}, {out / 'results.json'}, {out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
