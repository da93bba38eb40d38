"""One training run, start to finish: model, data, adapter, loop, outputs.

``run(args, config)`` is what ``drlora-mlx train`` does; the CLI only parses.
Without ``args.model`` it trains the built-in tiny MoE (made and cached on
first use) on the bundled tasks, offline, with a preset fit for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import checkpoint
from .adapters import save_adapter
from .attach import attach
from .config import DRLoRAConfig
from .data import bundled_data_dir, check_lengths, load_datasets
from .export import EXPORT_INFO, import_peft, read_export
from .memory import available_bytes, estimate_peak_bytes, memory_warning
from .modelio import load_base
from .progress import MetricsLog, Progress, format_time, rank_heatmap
from .tiny import TinyShape, tiny_model_path
from .trainer import Trainer, TrainingArgs, TrainResult

BUILTIN_FAMILY = "qwen3_moe"
BUILTIN_SHAPE = TinyShape(hidden=128, layers=4, experts=16, top_k=4, expert_dim=64, heads=4, kv_heads=2, vocab=512)
# Training settings for the built-in tiny model (random weights, small data);
# they apply only where neither the command line nor the config file says otherwise.
BUILTIN_PRESET = {
    "iters": 200,
    "batch_size": 8,
    "learning_rate": 2e-3,
    "steps_per_eval": 50,
    "val_batches": 10,
    "save_every": 100,
    "mask_prompt": True,
}


def builtin_model() -> str:
    """The path of the built-in tiny MoE checkpoint (built on first use)."""
    return str(tiny_model_path(BUILTIN_FAMILY, BUILTIN_SHAPE))


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, iteration: int, adapter_path: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at iteration {iteration}: checkpoint written; continue with "
            f"drlora-mlx train --resume --adapter-path {adapter_path}"
        )
        self.exit_code = 128 + signum


def settings(args: TrainingArgs, config: DRLoRAConfig) -> dict:
    """What a checkpoint records of the run's settings (compared on resume)."""
    return {"training": {k: v for k, v in vars(args).items()}, "method": config.to_dict()}


def _find_checkpoint(args: TrainingArgs):
    if args.resume_from:
        path = Path(args.resume_from)
        if not (path / checkpoint.META).exists():
            raise checkpoint.CheckpointError(
                f"{path} is not a drlora-mlx checkpoint folder (no {checkpoint.META}); give a folder from "
                f"{checkpoint.CHECKPOINTS}/ of an adapter path"
            )
        return (path, *checkpoint.read(path))
    return checkpoint.latest(args.adapter_path)


def is_peft_export(path: str) -> bool:
    return (Path(path) / EXPORT_INFO).exists()


def _check_export_settings(path: str, config: DRLoRAConfig) -> None:
    recorded = read_export(path)["method"]
    for key, value in recorded.items():
        if config.to_dict().get(key) != value:
            raise checkpoint.CheckpointError(
                f"the PEFT export was trained with {key}={value!r}, this run asks for "
                f"{key}={config.to_dict().get(key)!r}; leave {key} as it was"
            )


def _check_fresh_output(adapter_path: Path) -> None:
    """A new run may replace a finished one, never an unfinished one."""
    done = checkpoint.complete(adapter_path)
    if done:
        meta = json.loads((done[-1] / checkpoint.META).read_text())
        if meta["iteration"] < meta["settings"]["training"]["iters"]:
            raise checkpoint.CheckpointError(
                f"{adapter_path} holds an unfinished run (iteration {meta['iteration']} of "
                f"{meta['settings']['training']['iters']}); continue it with --resume or choose another --adapter-path"
            )


def _clear_finished_run(adapter_path: Path) -> None:
    if not adapter_path.exists():
        return
    shutil.rmtree(checkpoint.checkpoint_dir(adapter_path), ignore_errors=True)
    (adapter_path / "metrics.jsonl").unlink(missing_ok=True)


def _barrier(world) -> None:
    if world is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))


@contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT / SIGTERM finish the current iteration, then stop the loop; a
    second signal stops at once (the last checkpoint stays as it was)."""
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        trainer.stop_requested = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(args: TrainingArgs, config: DRLoRAConfig, world=None, out=None) -> TrainResult:
    """Train (or continue with ``args.resume`` / ``args.resume_from``), save
    the adapter and checkpoints to ``args.adapter_path`` and print a summary."""
    if world is None:
        launched = mx.distributed.init()
        world = launched if launched.size() > 1 else None
    rank = world.rank() if world is not None else 0
    out = out or (lambda line: print(line, flush=True))
    say = out if rank == 0 else (lambda line: None)
    model_name = args.model or builtin_model()
    if args.model is None:
        say(f"No --model given: training the built-in tiny {BUILTIN_FAMILY} ({model_name})")
    data = args.data or str(bundled_data_dir())
    if args.data is None:
        say(f"No --data given: using the bundled tasks ({data})")
    adapter_path = Path(args.adapter_path)
    warm_start = args.resume_from if args.resume_from and is_peft_export(args.resume_from) else None
    resume = _find_checkpoint(args) if (args.resume or args.resume_from) and not warm_start else None
    if resume is not None:
        checkpoint.check_settings(resume[2]["settings"], settings(args, config))
    else:
        _check_fresh_output(adapter_path)
    if warm_start:
        _check_export_settings(warm_start, config)
    if world is not None:
        say(f"data-parallel over {world.size()} processes: each takes {args.batch_size // world.size()} of the "
            f"{args.batch_size} examples of every batch")

    model, tokenizer = load_base(model_name)
    mx.random.seed(args.seed)
    if warm_start:
        # A new run that starts from the exported adapter's weights and ranks.
        drlora = import_peft(model, warm_start)
        say(f"starting from the PEFT export {warm_start} (its ranks and weights; statistics start afresh)")
    else:
        drlora = attach(model, config, seed=args.seed)
    train_set, valid_set, test_set = load_datasets(data, tokenizer, args.mask_prompt, need_test=args.test)
    truncated = check_lengths(train_set, args.max_seq_length)
    if truncated:
        say(f"warning: {truncated} training examples are longer than --max-seq-length {args.max_seq_length} and will be truncated")
    say(drlora.report())
    trainer = Trainer(model, drlora, args, progress=Progress(args.iters, enabled=rank == 0), world=world)
    schedule = trainer.schedule
    if config.method == "drlora":
        say(
            f"growth: {schedule.n_events} events every {schedule.grow_every} optimizer steps from step "
            f"{schedule.warmup_steps} to {schedule.end_step}, {schedule.quota} ranks per layer per event, "
            f"budget {schedule.budget} per layer (exhausted at step {schedule.budget_exhausted_step()})"
        )
    longest = max(len(train_set[i][0]) for i in range(len(train_set)))
    warning = memory_warning(
        estimate_peak_bytes(model, drlora, args.batch_size, min(longest, args.max_seq_length), args.grad_checkpoint),
        available_bytes(),
    )
    if warning:
        say(warning)
    if resume is not None:
        path, arrays, meta = resume
        trainer.restore(arrays, meta)
        say(f"resuming from {path} at iteration {trainer.iteration} of {args.iters}")
    else:
        _barrier(world)  # every process has checked the output folder before it changes
        if rank == 0:
            _clear_finished_run(adapter_path)
    if rank == 0:
        adapter_path.mkdir(parents=True, exist_ok=True)
    trainer.metrics = MetricsLog(adapter_path / "metrics.jsonl", enabled=rank == 0)
    extra = {"drlora_training": {**vars(args), "model": model_name, "data": data}}
    saved_at = []

    def on_save(it: int) -> None:
        arrays, meta = trainer.checkpoint_state()
        mx.eval(arrays)  # collectives are lazy: every process must evaluate its part
        if rank == 0:
            save_adapter(drlora, adapter_path, model_name, extra=extra)
            meta["settings"] = settings(args, config)
            pause = float(os.environ.get("DRLORA_MLX_FAULT_SLOW_SAVE", "0") or 0)
            checkpoint.save(adapter_path, it, arrays, meta, keep=args.keep_checkpoints, pause=pause)
        saved_at.append(it)

    with _stop_on_signals(trainer) as received:
        result = trainer.run(train_set, valid_set, on_save=on_save)
    trainer.progress.close()
    if result.interrupted:
        if not saved_at or saved_at[-1] != trainer.iteration:
            on_save(trainer.iteration)
        raise Interrupted(received[0] if received else signal.SIGINT, trainer.iteration, adapter_path)
    if args.test:
        result.test_loss = trainer.evaluate(test_set, args.test_batches)
        say(f"test loss {result.test_loss:.3f}, perplexity {np.exp(result.test_loss):.3f}")
        trainer.metrics.write({"kind": "test", "step": args.iters, "test_loss": result.test_loss})
    if rank == 0:
        written = save_adapter(drlora, adapter_path, model_name, extra=extra)
        say(summary(drlora, result, args))
        say(f"saved the adapter to {adapter_path}/ (mlx-lm format: adapters.safetensors + adapter_config.json)")
        if written["router_trained"]:
            if written["router_in_mlx_lm_adapter"]:
                say("the trained router is in adapters.safetensors (as an exact LoRA) and in router.safetensors")
            else:
                say(
                    "note: the trained router is in router.safetensors only: mlx-lm's adapter format cannot carry "
                    "it for this model, so mlx_lm.load(adapter_path=...) gives the untrained router; "
                    "drlora_mlx.load() applies it"
                )
    return result


def summary(drlora, result: TrainResult, args: TrainingArgs) -> str:
    """The end-of-run summary: rank heatmap and a table of what was reached."""
    r_init, r_target, r_max = drlora.config.ranks
    ranks = drlora.ranks()
    counts = drlora.parameter_counts()
    last = [loss for _, loss in result.losses[-max(1, args.steps_per_report):]]
    lines = [
        rank_heatmap(ranks, drlora.targets, drlora.n_experts, r_init, r_max, [l.index for l in drlora.layers]),
        "",
        f"  {'train loss (last report)':<28}{np.mean(last):.3f}",
    ]
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
        f"allocated at r_max: {counts['expert_lora_allocated']:,})",
        f"  {'trainable parameters':<28}{counts['trainable']:,}",
    ]
    return "\n".join(lines)
