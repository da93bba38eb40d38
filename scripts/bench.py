"""Step time and peak memory of DR-LoRA against mlx-lm's own LoRA, side by side.

One process, one model, the same batches: mlx-lm's LoRA on the routed experts'
up/down projections at r_max, r_target and r_init (its trainer's compiled
step, rebuilt here from mlx-lm's parts), drlora-mlx's uniform LoRA, and
DR-LoRA growing from r_init to r_target within r_max with growth events inside
the measured window, in its default pooled layout and in the masked one
(every expert at r_max). Float and 4-bit bases. Prints a table, the ratios to
mlx-lm and each variant's LoRA state (trainable values, their gradients and
two AdamW moments) as a share of its peak; ``--json`` ends with one JSON object.

    python scripts/bench.py --quick                # < 3 minutes on 2 CPU cores
    python scripts/bench.py                        # the larger default shape
    python scripts/bench.py --shape many-experts   # 128 small experts, 4-bit: the LoRA state dominates
    python scripts/bench.py --shape olmoe          # OLMoE-1B-7B shaped (a GPU machine)

Slices of real models (real widths and vocabulary, two to four layers, random
weights) compare mlx-lm's own trainer step (LoRA at r_target, its gradient
checkpointing, its loss) with ``drlora-mlx train``'s (DR-LoRA, gradient
checkpointing, the chunked loss), each in fresh processes, and set the
estimate of ``drlora-mlx plan`` beside the measured peak:

    python scripts/bench.py --shape qwen3-30b-a3b --tokens 512     # Qwen3-30B-A3B, float and 4-bit
    python scripts/bench.py --shape gpt-oss-20b --bases 4
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linux_blas import reexec_with_openblas  # noqa: E402

reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm import load as mlx_lm_load  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs  # noqa: E402
from drlora_mlx.families.mlx_lm_names import model_classes  # noqa: E402
from drlora_mlx.formats.tiny import TinyShape, family_config, tiny_model_path  # noqa: E402
from drlora_mlx.lora.attach import attach  # noqa: E402
from drlora_mlx.training.trainer import Trainer  # noqa: E402

SHAPES = {
    # hidden, layers, experts, top-k, expert dim; batch x sequence; bases (None: float, else bits)
    "quick": (TinyShape(hidden=256, layers=2, experts=16, top_k=4, expert_dim=256, heads=4, kv_heads=2, vocab=1024),
              2, 128, (None, 4)),
    "default": (TinyShape(hidden=384, layers=4, experts=32, top_k=4, expert_dim=256, heads=6, kv_heads=2, vocab=1024),
                2, 256, (None, 4)),
    # Many small experts on a 4-bit base: the LoRA state, not the weights or activations, is most of the peak.
    "many-experts": (TinyShape(hidden=256, layers=4, experts=128, top_k=4, expert_dim=256, heads=4, kv_heads=2,
                               vocab=1024), 2, 64, (4,)),
    "olmoe": (TinyShape(hidden=2048, layers=16, experts=64, top_k=8, expert_dim=1024, heads=16, kv_heads=16,
                        vocab=1024), 4, 512, (None, 4)),
}
RANKS = (8, 16, 32)  # r_init, r_target, r_max
LR = 1e-4


def batches(n, batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    lengths = mx.array(np.tile([0, seq], (batch, 1)).astype(np.int32))
    return [(mx.array(rng.integers(3, vocab, size=(batch, seq + 1)).astype(np.int32)), lengths) for _ in range(n)]


def _fresh():
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def mlx_lm_step(model_path, rank):
    """mlx-lm's LoRA on the experts' up/down projections, stepped like its trainer."""
    model, _ = mlx_lm_load(model_path)
    model.freeze()
    keys = ["mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": keys})
    return mlx_lm_step_of(model)


def mlx_lm_step_of(model):
    """The compiled step of mlx-lm's trainer (value_and_grad of its loss, AdamW) on ``model`` with LoRA on."""
    optimizer = optim.AdamW(learning_rate=LR, weight_decay=0.0)
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, toks), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss, toks

    def run(b, l):
        loss, toks = step(b, l)
        mx.eval(state, loss, toks)
        return None

    model.train()
    return run, model


def drlora_step(model_path, config, iters, batch_size):
    """drlora-mlx's Trainer.train_step; returns (step, trainer)."""
    model, _ = mlx_lm_load(model_path)
    drlora = attach(model, config, seed=0)
    trainer = Trainer(model, drlora, TrainingArgs(iters=iters, batch_size=batch_size, learning_rate=LR))
    model.train()

    def run(b, l):
        return trainer.train_step(b, l)[2]

    return run, trainer


def variant_names(quick):
    names = ["mlx_lm_rmax", "mlx_lm_rtarget", "mlx_lm_rinit", "drlora_uniform_rmax", "drlora", "drlora_masked"]
    return names if quick else names[:3] + ["drlora_uniform_rtarget"] + names[3:]


def make_variant(name, model_path, batch, rounds):
    """(step function, model, trainer or None) of one variant. DR-LoRA spends a
    third of its rounds in warm-up (all ranks at r_init), then grows every 2
    steps through every width."""
    r_init, r_target, r_max = RANKS
    if name.startswith("mlx_lm_"):
        rank = {"rmax": r_max, "rtarget": r_target, "rinit": r_init}[name.rsplit("_", 1)[1]]
        return (*mlx_lm_step(model_path, rank), None)
    if name.startswith("drlora_uniform_"):
        rank = {"rmax": r_max, "rtarget": r_target}[name.rsplit("_", 1)[1]]
        config = DRLoRAConfig(method="lora", lora_rank=rank, train_router="never")
    else:
        # grow_fraction 0.5: a module can reach r_max in two events, so a short run crosses every width.
        config = DRLoRAConfig(r_init=r_init, r_target=r_target, r_max=r_max, grow_every=2, growth_buffer=2,
                              warmup_ratio=1 / 3, grow_fraction=0.5, train_router="never",
                              lora_layout="masked" if name == "drlora_masked" else "pooled")
    step, trainer = drlora_step(model_path, config, rounds, batch)
    return step, trainer.model, trainer


def lora_state(model):
    """Bytes of the trainable values with their gradients and two AdamW moments."""
    return 4 * sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


GROWING = ("drlora", "drlora_masked")  # the variants that grow, measured by width and event


def run_base(model_path, shape, batch, seq, n_measure, warmup, quick):
    """Peak memory of each variant alone, then step times measured in rounds
    (one step of every variant per round, order rotating), so that the noise
    of a shared machine hits all variants alike."""
    r_init, r_target, r_max = RANKS
    rounds = warmup + 3 * n_measure
    data = batches(rounds, batch, seq, shape.vocab)
    names = variant_names(quick)
    peaks, states = {}, {}
    for name in names:
        _fresh()
        step, model, made = make_variant(name, model_path, batch, rounds)
        if name in GROWING:  # its peak is at the widest LoRA product
            ranks = made.drlora.ranks()
            ranks[:, 0] = r_max
            made.drlora.set_ranks(ranks)
        for b, l in data[:2]:
            step(b, l)
        peaks[name] = mx.get_peak_memory()
        states[name] = lora_state(model)
        del step, model, made
    _fresh()
    steps, trainers = {}, {}
    for name in names:
        steps[name], _, made = make_variant(name, model_path, batch, rounds)
        if name in GROWING:
            trainers[name] = made
    times = {name: {} for name in steps}  # name -> round -> seconds
    rows = {name: [] for name in GROWING}
    for i, (b, l) in enumerate(data):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            trainer = trainers.get(name)
            width, traces = (trainer.drlora.width, trainer.traces) if trainer else (None, 0)
            tic = time.perf_counter()
            event = steps[name](b, l)
            seconds = time.perf_counter() - tic
            if trainer is not None:
                grew = event is not None and event.total > 0
                seconds -= trainer.grow_seconds if grew else 0.0
                rows[name].append({"i": i, "width": width, "event": grew, "traced": trainer.traces > traces,
                                   "seconds": seconds, "grow_seconds": trainer.grow_seconds if grew else 0.0})
            if i >= warmup:
                times[name][i] = seconds

    def paired(name, ref, rounds):
        """Median over rounds of the ratio of two variants' steps in the same round."""
        return median([times[name][i] / times[ref][i] for i in rounds if i in times[name] and i in times[ref]])

    out = {name: {"step": median(list(times[name].values())), "peak": peaks[name], "state": states[name]}
           for name in names if name not in GROWING}
    for name in names:
        if name.startswith("drlora_uniform_"):
            out[name]["ratio"] = paired(name, name.replace("drlora_uniform", "mlx_lm"), range(warmup, rounds))
    for name in ("mlx_lm_rmax", "mlx_lm_rtarget", "mlx_lm_rinit"):
        out[name]["ratio"] = 1.0
    for name, trainer in trainers.items():
        # Steps that traced a new width are compile time, reported as traces.
        measured = [r for r in rows[name] if r["i"] >= warmup and not r["traced"]]
        first_event = next(r["i"] for r in rows[name] if r["event"])
        early = [r["i"] for r in measured if r["i"] < first_event]
        at_rmax = [r["i"] for r in measured if r["width"] == r_max]
        growing = [r["i"] for r in measured if r["i"] >= first_event]
        events = [r["grow_seconds"] for r in rows[name] if r["event"]]
        out[name] = {
            "step_early": median([times[name][i] for i in early]),
            "step_at_rmax_width": median([times[name][i] for i in at_rmax]),
            "step_growth_window": median([times[name][i] for i in growing]),
            "early_ratio_vs_rinit": paired(name, "mlx_lm_rinit", early),
            "rmax_ratio_vs_rmax": paired(name, "mlx_lm_rmax", at_rmax),
            "growth_ratio_vs_rmax": paired(name, "mlx_lm_rmax", growing),
            "statistics_overhead": paired(name, "drlora_uniform_rmax", at_rmax) - 1,
            "rounds": {"early": len(early), "at_rmax_width": len(at_rmax), "growing": len(growing)},
            "peak": peaks[name],
            "state": states[name],
            "traces": trainer.traces,
            "widths": sorted({max(key[1]) for key in trainer.steps}),
            "events": len(events),
            "event_seconds": median(events),
            "run_seconds": sum(r["seconds"] + r["grow_seconds"] for r in rows[name]),
            "final_mean_rank": float(trainer.drlora.ranks().mean()),
        }
    return out


def base_summary(r, tokens):
    """The ratios of one base (float or 4-bit) for the JSON summary."""
    d = r["drlora"]
    return {
        "step_ratio_vs_mlx_lm_rmax": d["rmax_ratio_vs_rmax"],
        "growth_window_ratio_vs_mlx_lm_rmax": d["growth_ratio_vs_rmax"],
        "early_step_ratio_vs_mlx_lm_rinit": d["early_ratio_vs_rinit"],
        "peak_memory_ratio_vs_mlx_lm_rmax": d["peak"] / r["mlx_lm_rmax"]["peak"],
        "peak_memory_ratio_vs_mlx_lm_rtarget": d["peak"] / r["mlx_lm_rtarget"]["peak"],
        "lora_state_share_of_peak": d["state"] / d["peak"],
        "mlx_lm_rtarget_lora_state_share_of_peak": r["mlx_lm_rtarget"]["state"] / r["mlx_lm_rtarget"]["peak"],
        "traces": d["traces"],
        "growth_event_share_of_run": d["event_seconds"] * d["events"] / d["run_seconds"],
        "statistics_overhead": d["statistics_overhead"],
        "uniform_lora_ratio_vs_mlx_lm_rmax": r["drlora_uniform_rmax"]["ratio"],
        "mlx_lm_rmax_tokens_per_second": tokens / r["mlx_lm_rmax"]["step"],
        "drlora_tokens_per_second": tokens / d["step_at_rmax_width"],
        # The masked layout (every expert at r_max), measured in the same rounds.
        "masked_step_ratio_vs_mlx_lm_rmax": r["drlora_masked"]["rmax_ratio_vs_rmax"],
        "masked_early_step_ratio_vs_mlx_lm_rinit": r["drlora_masked"]["early_ratio_vs_rinit"],
        "masked_peak_memory_ratio_vs_mlx_lm_rtarget": r["drlora_masked"]["peak"] / r["mlx_lm_rtarget"]["peak"],
    }


# ----- slices of real models -------------------------------------------------------------------------------------

# Real widths (hidden, experts, top-k, expert dim, heads, head size, vocabulary), few layers, random weights, built in
# memory: (family, shape, config keys over the family's tiny config). Layers: the repeating unit of each model.
SLICES = {
    "qwen3-30b-a3b": ("qwen3_moe", TinyShape(hidden=2048, layers=2, experts=128, top_k=8, expert_dim=768, heads=32,
                                             kv_heads=4, vocab=151936), {"head_dim": 128}),
    "olmoe-1b-7b": ("olmoe", TinyShape(hidden=2048, layers=2, experts=64, top_k=8, expert_dim=1024, heads=16,
                                       kv_heads=16, vocab=50304), {}),
    "gpt-oss-20b": ("gpt_oss", TinyShape(hidden=2880, layers=2, experts=32, top_k=4, expert_dim=2880, heads=64,
                                         kv_heads=8, vocab=201088), {"head_dim": 64, "sliding_window": 128}),
    # three gated-delta layers, then full attention
    "qwen3.5-35b-a3b": ("qwen3_5_moe", TinyShape(hidden=2048, layers=4, experts=256, top_k=8, expert_dim=512,
                                                 heads=16, kv_heads=2, vocab=248320),
                        {"head_dim": 256, "full_attention_interval": 4, "linear_num_value_heads": 32,
                         "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128}),
}
SLICE_VARIANTS = ("mlx_lm", "drlora")


def slice_model(name: str, bits: int | None, evaluate: bool = True):
    """The slice's model with seeded random weights (float32: the CPU backend's expert products need it), or
    quantized as ``mlx_lm.convert -q`` quantizes (group 64, layers whose input is a multiple of 64); without
    ``evaluate``, lazy: nothing allocated."""
    family, shape, keys = SLICES[name]
    config = family_config(family, shape)
    text = config.get("text_config", config)
    text.update(keys)
    model_class, args_class = model_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    if bits:
        nn.quantize(model, group_size=64, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    if evaluate:
        mx.eval(model.parameters())
    return model


def expert_keys(model) -> list[str]:
    """mlx-lm's ``keys`` for LoRA on the routed experts' up and down projections of a decoder layer."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    from drlora_mlx.families.mlx_lm_names import projection_name

    for path, module in model.layers[0].named_modules():
        if isinstance(module, (SwitchGLU, SwitchMLP)):
            return [f"{path}.{projection_name(module, t)}" for t in ("up_proj", "down_proj")]
    raise SystemExit("no routed experts in the slice's first layer")


def slice_worker(name: str, variant: str, bits: int | None, seq: int, steps: int) -> dict:
    """One variant on one slice, alone in its process: peak memory above the weights of a step at batch 1 x
    ``seq`` with gradient checkpointing, and the median seconds of ``steps`` steps."""
    from mlx_lm.tuner.trainer import grad_checkpoint as mlx_lm_grad_checkpoint

    model = slice_model(name, bits)
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    r_init, r_target, r_max = RANKS
    if variant == "mlx_lm":
        model.freeze()
        linear_to_lora_layers(model, len(model.layers),
                              {"rank": r_target, "scale": 2.0, "dropout": 0.0, "keys": expert_keys(model)})
        mlx_lm_grad_checkpoint(model.layers[0])
        step, _ = mlx_lm_step_of(model)
    else:
        drlora = attach(model, DRLoRAConfig(r_init=r_init, r_target=r_target, r_max=r_max, train_router="never"),
                        seed=0)
        ranks = drlora.ranks()  # one expert per module at r_max: the widest product, as late in growth
        ranks[:, 0] = r_max
        drlora.set_ranks(ranks)
        trainer = Trainer(model, drlora, TrainingArgs(iters=steps + 1, batch_size=1, learning_rate=LR,
                                                      grad_checkpoint=True))
        step = trainer.train_step
    data = batches(steps + 1, 1, seq, SLICES[name][1].vocab)
    step(*data[0])  # compiled and warm
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    seconds = []
    for b, l in data[1:]:
        tic = time.perf_counter()
        step(b, l)
        seconds.append(time.perf_counter() - tic)
    return {"weights": weights, "above": mx.get_peak_memory() - weights, "seconds": statistics.median(seconds)}


def slice_plan(name: str, bits: int | None, seq: int) -> dict:
    """``drlora-mlx plan``'s estimates for the slice (its model built without weights), above the weights:
    DR-LoRA with the chunked loss and mlx-lm's LoRA at r_target with its plain loss."""
    from drlora_mlx.training import memory

    model = slice_model(name, bits, evaluate=False)
    config = DRLoRAConfig(r_init=RANKS[0], r_target=RANKS[1], r_max=RANKS[2], train_router="never")
    shape = memory.model_shape(model, config.targets, vars(model.args))
    chunk = memory.chunk_tokens(shape.vocab, None)
    drlora = memory.peak_estimate(shape, config, "pooled", 1, seq, True, chunk_tokens=chunk)
    mlx_lm = memory.mlx_lm_peak_bytes(shape, RANKS[1], 1, seq, True)
    return {"drlora": int(drlora) - shape.base_weight_bytes, "mlx_lm": mlx_lm - shape.base_weight_bytes}


def run_slice(name: str, seq: int, bases, rounds: int, steps: int) -> dict:
    """Every variant on every base, each round in fresh processes (the order alternating), so that neither
    variant inherits the other's memory or patched classes."""
    results = {}
    for bits in bases:
        label = f"{bits}bit" if bits else "float"
        runs = {v: [] for v in SLICE_VARIANTS}
        for r in range(rounds):
            for variant in SLICE_VARIANTS[:: 1 if r % 2 == 0 else -1]:
                job = json.dumps({"name": name, "variant": variant, "bits": bits, "seq": seq, "steps": steps})
                out = subprocess.run([sys.executable, __file__, "--slice-worker", job], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{name} {label} {variant}: {out.stderr.strip().splitlines()[-1]}")
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  {label} round {r + 1} {variant}: {runs[variant][-1]}", flush=True)
        results[label] = runs
    return results


def spread(values) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def print_slice(name: str, seq: int, results: dict) -> dict:
    """The slice's table: per variant the median (range) over rounds, plan's estimate over the measured peak,
    and DR-LoRA's ratios to mlx-lm."""
    family, shape, _ = SLICES[name]
    print(f"\n{name} slice ({family}, {shape.layers} layers, hidden {shape.hidden}, {shape.experts} experts top-"
          f"{shape.top_k}, expert dim {shape.expert_dim}, vocabulary {shape.vocab:,}), batch 1 x {seq}, "
          f"--grad-checkpoint; median (range) over rounds")
    print(f"{'base':<6} {'variant':<8} {'weights GB':>10} {'peak above weights GB':>24} {'MB/token':>9} "
          f"{'plan/measured peak':>19} {'above weights':>14} {'step s':>22}")
    summary = {}
    for label, runs in results.items():
        plan = slice_plan(name, None if label == "float" else int(label[:-3]), seq)
        summary[label] = {}
        for variant, rows in runs.items():
            above = statistics.median(r["above"] for r in rows)
            weights = rows[0]["weights"]
            whole, part = (plan[variant] + weights) / (above + weights), plan[variant] / above
            print(f"{label:<6} {variant:<8} {weights / 1e9:>10.2f} {spread([r['above'] / 1e9 for r in rows]):>24} "
                  f"{above / 1e6 / seq:>9.2f} {whole:>18.3f}x {part:>13.3f}x "
                  f"{spread([r['seconds'] for r in rows]):>22}")
            summary[label][variant] = {"above_bytes": above, "weights_bytes": weights, "plan_ratio": whole,
                                       "plan_ratio_above_weights": part,
                                       "seconds": statistics.median(r["seconds"] for r in rows)}
        peak = [d["above"] / m["above"] for d, m in zip(runs["drlora"], runs["mlx_lm"])]
        step = [d["seconds"] / m["seconds"] for d, m in zip(runs["drlora"], runs["mlx_lm"])]
        print(f"{label:<6} DR-LoRA / mlx-lm: peak above weights {spread(peak)}, step time {spread(step)}")
        summary[label].update({"peak_ratio": statistics.median(peak), "step_ratio": statistics.median(step)})
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape, few steps (< 3 minutes on 2 CPU cores)")
    parser.add_argument("--shape", choices=sorted(SHAPES) + sorted(SLICES), default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per variant")
    parser.add_argument("--tokens", type=int, default=512, help="sequence length of a real-model slice")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a real-model slice, fresh processes each")
    parser.add_argument("--bases", default="float,4", help="bases of a real-model slice: float and/or bits")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument("--slice-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slice_worker:
        job = json.loads(args.slice_worker)
        print(json.dumps(slice_worker(job["name"], job["variant"], job["bits"], job["seq"], job["steps"])))
        return
    if args.shape in SLICES:
        bases = [None if b == "float" else int(b) for b in args.bases.split(",")]
        print(f"device {mx.default_device()}, {platform.machine()} {platform.system()}, slice {args.shape}, "
              f"ranks r_init/r_target/r_max {RANKS}; mlx-lm's LoRA at r_target {RANKS[1]}", flush=True)
        results = run_slice(args.shape, args.tokens, bases, args.rounds, args.steps or 2)
        summary = print_slice(args.shape, args.tokens, results)
        if args.json:
            print(json.dumps({"shape": args.shape, "tokens": args.tokens, **summary, "runs": results}))
        return
    shape_name = args.shape or ("quick" if args.quick else "default")
    shape, batch, seq, bases = SHAPES[shape_name]
    few = args.quick or shape_name == "many-experts"  # a 1-3 minute run, like --quick
    n_measure = args.steps or (8 if few else 10)
    warmup = 2 if few else 3
    print(f"device {mx.default_device()}, {platform.machine()} {platform.system()}, shape {shape_name}: {shape}, "
          f"batch {batch} x {seq}, ranks r_init/r_target/r_max {RANKS}", flush=True)
    results = {}
    for bits in bases:
        path = str(tiny_model_path("qwen3_moe", shape, quantize_bits=bits))
        label = "4bit" if bits else "float"
        tic = time.perf_counter()
        results[label] = run_base(path, shape, batch, seq, n_measure, warmup, few)
        print(f"  {label}: measured in {time.perf_counter() - tic:.0f} s", flush=True)

    print()
    print("step time: median over rounds; ratio: median over rounds of the paired ratio to mlx-lm in the same round;")
    print("LoRA state: trainable values, gradients and two AdamW moments, and their share of the variant's peak")
    print(f"{'base':<6} {'variant':<34} {'step ms':>9} {'ratio':>8} {'peak MB':>9} {'ratio':>8} {'state MB':>9} "
          f"{'share':>6}")
    for label, r in results.items():
        ref = r["mlx_lm_rmax"]
        for name, ref_name in (("mlx_lm_rmax", "mlx_lm_rmax"), ("mlx_lm_rtarget", "mlx_lm_rtarget"),
                               ("mlx_lm_rinit", "mlx_lm_rinit"), ("drlora_uniform_rtarget", "mlx_lm_rtarget"),
                               ("drlora_uniform_rmax", "mlx_lm_rmax")):
            if name in r:
                v = r[name]
                print(f"{label:<6} {name:<34} {v['step'] * 1e3:>9.1f} {v['ratio']:>7.3f}x "
                      f"{v['peak'] / 1e6:>9.1f} {v['peak'] / r[ref_name]['peak']:>7.3f}x "
                      f"{v['state'] / 1e6:>9.1f} {100 * v['state'] / v['peak']:>5.1f}%")
        for name, title in (("drlora", "DR-LoRA"), ("drlora_masked", "DR-LoRA masked")):
            d = r[name]
            print(f"{label:<6} {title + ' early (all at r_init)':<34} {d['step_early'] * 1e3:>9.1f} "
                  f"{d['early_ratio_vs_rinit']:>7.3f}x {'':>9} (vs mlx-lm at r_init)")
            print(f"{label:<6} {title + ' growth window':<34} {d['step_growth_window'] * 1e3:>9.1f} "
                  f"{d['growth_ratio_vs_rmax']:>7.3f}x")
            print(f"{label:<6} {title + ' at r_max width':<34} {d['step_at_rmax_width'] * 1e3:>9.1f} "
                  f"{d['rmax_ratio_vs_rmax']:>7.3f}x {d['peak'] / 1e6:>9.1f} {d['peak'] / ref['peak']:>7.3f}x "
                  f"{d['state'] / 1e6:>9.1f} {100 * d['state'] / d['peak']:>5.1f}%")
            print(f"{label:<6}   peak vs mlx-lm at r_target: {d['peak'] / r['mlx_lm_rtarget']['peak']:.3f}x")
            print(f"{label:<6}   rounds {d['rounds']}; traces {d['traces']} (widths {d['widths']}); "
                  f"{d['events']} growth events, median {d['event_seconds'] * 1e3:.1f} ms = "
                  f"{100 * d['event_seconds'] * d['events'] / d['run_seconds']:.2f}% of the run; "
                  f"statistics overhead at r_max width {100 * d['statistics_overhead']:+.1f}%; "
                  f"final mean rank {d['final_mean_rank']:.2f}")
    summary = {"shape": shape_name, "device": str(mx.default_device()), "tokens_per_step": batch * seq}
    for label, r in results.items():
        suffix = "_4bit" if label == "4bit" else ""
        summary.update({key + suffix: value for key, value in base_summary(r, batch * seq).items()})
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
