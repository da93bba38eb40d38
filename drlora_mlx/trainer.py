"""The DR-LoRA training loop: a compiled step, growth events between steps.

The step is ``mlx-lm``'s (value_and_grad, gradient accumulation, AdamW)
compiled once per phase, plus what DR-LoRA adds inside it: the routing sums of
the loss tokens come out of the forward pass, and at each optimizer update the
rank importance and routing frequency EMAs are updated from the accumulated
gradients and sums before AdamW moves A and B. Growth events run between steps
and change mask values only, so they never retrace; a new compiled step is
made only when the trained set changes (the router unfreezing after warm-up).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from .attach import DRLoRA
from .config import ConfigError
from .data import Batches, eval_batches
from .progress import MetricsLog, Progress, format_time, rank_heatmap

LR_SCHEDULES = ("linear", "cosine", "constant")


def _help(text: str, **extra):
    return {"help": text, **extra}


@dataclass
class TrainingArgs:
    """How to train: data, optimisation, reporting. (The method is ``DRLoRAConfig``.)"""

    model: str | None = field(default=None, metadata=_help("Local model folder or Hugging Face id (default: the built-in tiny MoE)."))
    data: str | None = field(default=None, metadata=_help("Folder with train.jsonl, valid.jsonl, test.jsonl (default: the bundled tasks)."))
    adapter_path: str = field(default="adapters", metadata=_help("Where the adapter, metrics and state are written."))
    iters: int = field(default=1000, metadata=_help("Training iterations (batches)."))
    batch_size: int = field(default=4, metadata=_help("Examples per batch."))
    learning_rate: float = field(default=1e-5, metadata=_help("Peak AdamW learning rate."))
    lr_schedule: str = field(default="linear", metadata=_help("Decay after the warm-up.", choices=LR_SCHEDULES))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (never applied to inactive ranks)."))
    max_seq_length: int = field(default=2048, metadata=_help("Longer examples are truncated."))
    grad_accumulation_steps: int = field(default=1, metadata=_help("Batches per optimizer update."))
    grad_checkpoint: bool = field(default=False, metadata=_help("Recompute activations in the backward pass to save memory."))
    mask_prompt: bool = field(default=False, metadata=_help("Train on completions only (completions and chat data)."))
    steps_per_report: int = field(default=10, metadata=_help("Iterations between loss reports."))
    steps_per_eval: int = field(default=200, metadata=_help("Iterations between validation-loss evaluations."))
    val_batches: int = field(default=25, metadata=_help("Validation batches per evaluation (-1: all)."))
    save_every: int = field(default=100, metadata=_help("Iterations between adapter saves."))
    seed: int = field(default=0, metadata=_help("Random seed (LoRA initialisation and batch order)."))
    test: bool = field(default=False, metadata=_help("Evaluate the test set after training."))
    test_batches: int = field(default=500, metadata=_help("Test batches to evaluate (-1: all)."))

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        positive = ("iters", "batch_size", "max_seq_length", "grad_accumulation_steps", "steps_per_report",
                    "steps_per_eval", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive; got {self.learning_rate}")
        if self.iters % self.grad_accumulation_steps:
            raise ConfigError(
                f"iters ({self.iters}) must be a multiple of grad_accumulation_steps ({self.grad_accumulation_steps})"
            )

    @property
    def optimizer_steps(self) -> int:
        return self.iters // self.grad_accumulation_steps


def learning_rate_schedule(args: TrainingArgs, warmup_steps: int):
    """Linear warm-up to the peak over the growth warm-up, then the chosen decay."""
    total = args.optimizer_steps
    peak = args.learning_rate
    decay_steps = max(total - warmup_steps, 1)
    if args.lr_schedule == "linear":
        decay = optim.linear_schedule(peak, 0.0, decay_steps)
    elif args.lr_schedule == "cosine":
        decay = optim.cosine_decay(peak, decay_steps)
    else:
        decay = lambda _: peak  # noqa: E731
    if warmup_steps <= 0:
        return decay
    warmup = optim.linear_schedule(peak / warmup_steps, peak, warmup_steps - 1) if warmup_steps > 1 else (lambda _: peak)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def make_loss(drlora: DRLoRA):
    """mlx-lm's masked next-token loss, also returning the step's routing sums."""

    def loss(model, batch, lengths):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        with drlora.recorder.capture(mask):
            logits = model(inputs)
            routing = drlora.recorder.sums()
        n_tokens = mask.sum()
        ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum() / n_tokens
        return ce, n_tokens, routing

    return loss


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_drlora_checkpointed": True})


def grad_checkpoint(model: nn.Module) -> None:
    """Recompute each decoder layer's forward in the backward pass to save memory.

    mlx-lm's recipe, but per instance: each layer gets a subclass of its own
    class, so no other model in the process is affected.
    """
    for layer in model.layers:
        cls = type(layer)
        if not getattr(cls, "_drlora_checkpointed", False):
            layer.__class__ = _CHECKPOINTED.setdefault(cls, _checkpointed_class(cls))


@dataclass
class TrainResult:
    """What a run did, for the summary, the tests and the scripts."""

    losses: list = field(default_factory=list)  # (optimizer step, mean loss of its batches)
    val_losses: list = field(default_factory=list)  # (iteration, loss)
    test_loss: float | None = None
    events: list = field(default_factory=list)  # GrowthEvent
    traces: int = 0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    tokens: int = 0


class Trainer:
    """Runs ``args.iters`` iterations of DR-LoRA training on ``model``."""

    def __init__(self, model, drlora: DRLoRA, args: TrainingArgs, progress: Progress | None = None,
                 metrics: MetricsLog | None = None, world=None):
        self.model = model
        self.drlora = drlora
        self.args = args
        self.world = world
        self.rank = world.rank() if world is not None else 0
        self.world_size = world.size() if world is not None else 1
        self.schedule = drlora.schedule(args.optimizer_steps)
        self.optimizer = optim.AdamW(
            learning_rate=learning_rate_schedule(args, self.schedule.warmup_steps), weight_decay=args.weight_decay
        )
        self.optimizer.init(model.trainable_parameters())
        self.progress = progress or Progress(args.iters, enabled=False)
        self.metrics = metrics or MetricsLog("metrics.jsonl", enabled=False)
        self.loss_and_grad = nn.value_and_grad(model, make_loss(drlora))
        self.steps: dict = {}
        self.traces = 0
        self.router_trained = drlora.config.train_router == "always"
        self.iteration = 0  # iterations done
        self.accum = None  # gradients and routing sums of an unfinished accumulation cycle
        self.mean_rank = float(drlora.ranks().mean())
        self.last_tps = 0.0
        if args.grad_checkpoint:
            grad_checkpoint(model)

    # ----- the compiled step ----------------------------------------------------

    def _state(self):
        return [self.model.state, self.optimizer.state, mx.random.state, self.drlora.state.state]

    def _compiled_step(self):
        key = self.router_trained
        if key not in self.steps:
            self.steps[key] = mx.compile(self._step, inputs=self._state(), outputs=self._state())
        return self.steps[key]

    def _step(self, batch, lengths, accum, do_update):
        self.traces += 1  # runs only while tracing
        (loss, n_tokens, routing), grads = self.loss_and_grad(self.model, batch, lengths)
        if accum is not None:
            grads = tree_map(lambda g, a: g + a, grads, accum[0])
            routing = routing + accum[1]
            total = n_tokens + accum[2]
        else:
            total = n_tokens
        if not do_update:
            return loss, n_tokens, (grads, routing, total)
        if self.world_size > 1:
            grads = nn.average_gradients(grads)
            routing = mx.distributed.all_sum(routing)
            total = mx.distributed.all_sum(total)
        if self.args.grad_accumulation_steps > 1:
            grads = tree_map(lambda g: g / self.args.grad_accumulation_steps, grads)
        self.drlora.update_statistics(grads, routing, total)
        before = self.drlora.factors() if self.args.weight_decay > 0 else None
        self.optimizer.update(self.model, grads)
        if before is not None:
            self.drlora.keep_masked_ranks(before)
        return loss, n_tokens, None

    def _set_router(self, trained: bool) -> None:
        if trained == self.router_trained:
            return
        self.drlora.set_router_trainable(trained)
        self.optimizer.init(self.model.trainable_parameters())
        self.router_trained = trained

    # ----- evaluation -----------------------------------------------------------

    def evaluate(self, dataset, batches: int) -> float:
        self.model.eval()
        total, count = mx.array(0.0), mx.array(0.0)
        loss_fn = make_loss(self.drlora)
        for batch, lengths in eval_batches(dataset, self.args.batch_size, self.args.max_seq_length, batches,
                                           self.rank, self.world_size):
            loss, n, _ = loss_fn(self.model, mx.array(batch), mx.array(lengths))
            total = total + loss * n
            count = count + n
            mx.eval(total, count)
        if self.world_size > 1:
            total = mx.distributed.all_sum(total, stream=mx.cpu)
            count = mx.distributed.all_sum(count, stream=mx.cpu)
        self.model.train()
        return (total / mx.maximum(count, 1)).item()

    # ----- the loop -------------------------------------------------------------

    def train_step(self, batch, lengths):
        """One iteration: a batch through the compiled step; at the end of an
        accumulation cycle also the optimizer update and the growth event.
        Returns (loss, loss tokens, growth event or None)."""
        args = self.args
        it = self.iteration + 1
        opt_step = (it - 1) // args.grad_accumulation_steps + 1
        do_update = it % args.grad_accumulation_steps == 0
        if self.drlora.config.train_router == "after-warmup":
            self._set_router(opt_step > self.schedule.warmup_steps)
        loss, n_tokens, self.accum = self._compiled_step()(mx.array(batch), mx.array(lengths), self.accum, do_update)
        mx.eval(self._state(), loss, n_tokens, self.accum)
        self.iteration = it
        event = self.drlora.grow(opt_step, self.schedule) if do_update else None
        if event is not None:
            self.mean_rank = float(self.drlora.ranks().mean())
        return loss.item(), int(n_tokens.item()), event

    def run(self, train_set, valid_set=None, on_save=None) -> TrainResult:
        """Train until ``args.iters``, evaluating, reporting and calling
        ``on_save(iteration)`` every ``save_every`` iterations and at the end."""
        args, drlora = self.args, self.drlora
        result = TrainResult()
        batches = Batches(train_set, args.batch_size, args.max_seq_length, args.seed, self.rank, self.world_size)
        report_loss, report_tokens, report_steps, report_time = 0.0, 0, 0, 0.0
        step_losses = []
        mx.reset_peak_memory()
        start = time.perf_counter()
        self.model.train()
        while self.iteration < args.iters:
            it = self.iteration + 1
            if valid_set is not None and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
                val = self.evaluate(valid_set, args.val_batches)
                result.val_losses.append((it, val))
                self.progress.log(f"iter {it}: valid loss {val:.3f}")
                self.metrics.write({"kind": "val", "step": it, "val_loss": val})
            tic = time.perf_counter()
            loss, n_tokens, event = self.train_step(*next(batches))
            report_time += time.perf_counter() - tic
            step_losses.append(loss)
            report_loss += loss
            report_tokens += n_tokens
            report_steps += 1
            if it % args.grad_accumulation_steps == 0:
                result.losses.append((it // args.grad_accumulation_steps, float(np.mean(step_losses))))
                step_losses = []
            if event is not None and event.total:
                result.events.append(event)
                self.progress.log("grow " + event.summary(drlora)[:160])
                self.metrics.write(
                    {"kind": "growth", "step": it, "optimizer_step": event.step, "grown": event.total,
                     "mean_rank": self.mean_rank}
                )
            lr = float(self.optimizer.learning_rate.item())
            peak = mx.get_peak_memory() / 1e9
            if it % args.steps_per_report == 0 or it == args.iters:
                tokens = report_tokens * self.world_size
                record = {
                    "kind": "train",
                    "step": it,
                    "loss": report_loss / report_steps,
                    "lr": lr,
                    "tokens_per_second": tokens / max(report_time, 1e-9),
                    "peak_memory_gb": peak,
                    "mean_rank": self.mean_rank,
                    "trained_tokens": result.tokens + tokens,
                }
                result.tokens += tokens
                self.metrics.write(record)
                self.progress.log(
                    f"iter {it}: loss {record['loss']:.3f} | lr {lr:.2e} | "
                    f"{record['tokens_per_second']:,.0f} tok/s | peak {peak:.2f} GB | mean rank {self.mean_rank:.2f}"
                )
                self.last_tps = record["tokens_per_second"]
                report_loss, report_tokens, report_steps, report_time = 0.0, 0, 0, 0.0
            self.progress.update(
                it,
                f"loss {loss:.3f} | {self.last_tps:,.0f} tok/s | {peak:.2f} GB | lr {lr:.1e} | rank {self.mean_rank:.2f}",
            )
            if on_save is not None and (it % args.save_every == 0 or it == args.iters):
                on_save(it)
        result.seconds = time.perf_counter() - start
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        result.traces = self.traces
        return result
