"""The DR-LoRA training loop: one compiled step per iteration, growth events between them.

The step is ``mlx-lm``'s (value_and_grad, gradient accumulation, the
optimizer of ``optimizers``) in one compiled call, plus what DR-LoRA adds: the
routing sums of the loss tokens come out of the forward pass, and at each
optimizer update the rank importance and routing frequency EMAs are updated
from the accumulated gradients and sums before the optimizer moves the factors.
A non-finite loss or gradient is caught inside the graph, which says whether
its update stands; one that does not is undone by putting back the
parameters, optimizer state and statistics it replaced. Nothing is
materialised between the gradient and the update. Growth events run between steps and
change values only (masks, slot tables), so they never retrace; new compiled
steps are made only when the trained set changes (the router unfreezing after
warm-up), the LoRA width moves to the next bucket (``DRLoRA.fit_width``), or
for the three kinds of iteration of gradient accumulation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config.settings import TrainingArgs
from ..data.batches import Batches
from ..display.progress import MetricsLog, Progress
from ..display.report import chosen_experts, event_summary
from ..errors import RunStopped
from ..lora import codec
from ..lora.handle import DRLoRA
from ..method.growth import grow
from ..method.importance import row_sums
from ..method.schedule import GrowthSchedule
from .checkpoint import CheckpointError
from .evaluate import test_loss
from .loss import loss_mask, make_loss
from .optimizers import make_optimizer, needs_rank_guard


class DivergenceError(RunStopped):
    """Data-parallel processes hold different rank masks."""

    exit_code = 4

    def __init__(self, step: int, rank: int):
        super().__init__(
            f"processes disagree on the rank masks after the growth event at optimizer step {step} "
            f"(seen by process {rank}); stopped instead of training on diverged replicas"
        )


class NonFiniteError(RunStopped):
    """A loss or gradient became NaN or infinite."""

    exit_code = 3

    def __init__(self, iteration: int, step: int, loss: float):
        super().__init__(
            f"non-finite loss or gradient at iteration {iteration} (optimizer step {step}, loss {loss}); "
            "stopped without applying it. Lower --learning-rate, or pass --skip-nonfinite N to skip bad batches"
        )
        self.iteration = iteration


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
        if getattr(cls, "_drlora_checkpointed", False):
            continue
        if cls not in _CHECKPOINTED:
            _CHECKPOINTED[cls] = _checkpointed_class(cls)
        layer.__class__ = _CHECKPOINTED[cls]


@dataclass
class TrainResult:
    """What a run did, for the summary, the tests and the scripts."""

    losses: list = field(default_factory=list)  # (optimizer step, mean loss of its batches)
    iteration_losses: list = field(default_factory=list)  # (iteration, loss of its batch)
    val_losses: list = field(default_factory=list)  # (iteration, loss)
    test_loss: float | None = None
    events: list = field(default_factory=list)  # GrowthEvent
    traces: int = 0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    tokens: int = 0
    interrupted: bool = False


class Accumulation(NamedTuple):
    """The sums of an unfinished optimizer step: gradients (flat, by parameter
    path), routing sums (MoE layers x experts) and the loss-token count."""

    grads: dict
    routing: mx.array
    tokens: mx.array


@dataclass
class ReportWindow:
    """The iterations since the last report line."""

    loss: float = 0.0
    tokens: int = 0
    iterations: int = 0
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss += loss
        self.tokens += tokens
        self.iterations += 1
        self.seconds += seconds


class Trainer:
    """Runs ``args.iters`` iterations of DR-LoRA training on ``model``."""

    def __init__(self, model, drlora: DRLoRA, args: TrainingArgs, progress: Progress | None = None,
                 metrics: MetricsLog | None = None, world=None, reporter=None,
                 schedule: GrowthSchedule | None = None):
        """``reporter``: an mlx-lm ``TrainingCallback`` that process 0 gives every
        train and validation report, in mlx-lm's keys; ``schedule``: the growth
        schedule of ``args`` when the caller has made it already."""
        self.model = model
        self.drlora = drlora
        self.args = args
        self.world = world
        self.rank = world.rank() if world is not None else 0
        self.world_size = world.size() if world is not None else 1
        self.schedule = schedule or drlora.schedule(args.optimizer_steps)
        self.optimizer, self.lora_optimizer = make_optimizer(drlora, args, self.schedule.warmup_steps)
        self.optimizer.init(model.trainable_parameters())
        self.progress = progress or Progress(args.iters, enabled=False)
        self.reporter = reporter if self.rank == 0 else None
        self.metrics = metrics or MetricsLog("metrics.jsonl", enabled=False)
        self.loss_and_grad = nn.value_and_grad(
            model, make_loss(drlora, record=self.schedule.n_events > 0, chunk_size=args.loss_chunk_size))
        self.steps: dict = {}
        self.traces = 0
        self.router_trained = drlora.config.train_router == "always"
        self.iteration = 0  # iterations done
        self.accum: Accumulation | None = None  # an unfinished accumulation cycle
        self.mean_rank = float(drlora.ranks().mean())
        self.last_tps = 0.0
        self.grow_seconds = 0.0  # wall time of the last growth event
        self.batch_state = {"epoch": 0, "position": 0}
        self.skipped = 0  # batches skipped for non-finite values
        self.stop_requested = False  # set from a signal handler: stop after this iteration
        if args.grad_checkpoint:
            grad_checkpoint(model)

    # ----- the compiled step ----------------------------------------------------

    def _state(self):
        return [self.model.state, self.optimizer.state, mx.random.state, self.drlora.routing.state]

    def _compiled(self, update: bool):
        # Growth changes values only (masks, slot tables); new steps are traced only when the trained
        # set (router), the LoRA width bucket, or the kind of iteration (with or without an earlier
        # micro-batch, with or without the optimizer update) changes.
        key = (self.router_trained, self.drlora.widths(), self.accum is not None, update)
        if key not in self.steps:
            step = partial(self._step, update=update)
            self.steps[key] = mx.compile(step, inputs=self._state(), outputs=self._state())
        return self.steps[key]

    def _all_sum(self, x):
        return mx.distributed.all_sum(x, group=self.world) if self.world_size > 1 else x

    def _step(self, batch, lengths, accum, may_skip, update: bool):
        """One iteration in one compiled call: the gradients and routing sums of
        this process's share of the batch, added to ``accum`` (the earlier
        micro-batches of the optimizer step); with ``update``, also the step's
        statistics and optimizer update. Returns the batch's mean loss and token
        count over all processes, whether everything was finite everywhere, and
        without ``update`` the new accumulation, with it whether the update
        stands: not when nothing finite was left to apply, nor (``may_skip``
        false: the run is about to stop) when the step's last batch is bad."""
        self.traces += 1  # runs only while tracing
        whole = update and accum is None  # this batch is the whole optimizer step
        scale = 1.0
        if whole:  # the loss as the step's token mean: its gradients need no division afterwards
            tokens = loss_mask(lengths, batch.shape[1] - 1).sum().astype(mx.float32)
            scale = 1.0 / mx.maximum(self._all_sum(tokens), 1.0)
        (ce, n_tokens, routing), grads = self.loss_and_grad(self.model, batch, lengths, scale)
        grads = dict(tree_flatten(grads))  # flat {path: gradient}: saves and restores as is
        # A NaN or infinity anywhere makes a sum non-finite: one pass over each gradient.
        sums = mx.stack([ce] + [row_sums(g.reshape(-1, g.shape[-1])).sum() for g in grads.values()])
        bad = mx.logical_not(mx.isfinite(sums.sum()))
        totals = self._all_sum(mx.stack([ce, n_tokens.astype(mx.float32), bad.astype(mx.float32)]))
        loss = totals[0] if whole else totals[0] / mx.maximum(totals[1], 1.0)
        finite = totals[2] == 0
        if accum is not None:
            grads = {k: g + accum.grads[k] for k, g in grads.items()}
            routing = routing + accum.routing
            n_tokens = n_tokens + accum.tokens
        if not update:  # the caller keeps this accumulation only if it is finite
            return loss, totals[1], finite, Accumulation(grads, routing, n_tokens)
        apply = finite
        if accum is not None:  # a bad last batch: the step is the earlier micro-batches alone
            grads = {k: mx.where(finite, g, accum.grads[k]) for k, g in grads.items()}
            routing = mx.where(finite, routing, accum.routing)
            n_tokens = mx.where(finite, n_tokens, accum.tokens)
            apply = mx.logical_or(finite, may_skip)
        n_tokens = mx.maximum(self._all_sum(n_tokens).astype(mx.float32), 1.0)
        if whole:
            grads = {k: self._all_sum(g) for k, g in grads.items()}
        else:
            grads = {k: self._all_sum(g) / n_tokens for k, g in grads.items()}
        self._update(tree_unflatten(list(grads.items())), self._all_sum(routing), n_tokens)
        return loss, totals[1], finite, apply

    def _update(self, grads: dict, routing: mx.array, n_tokens: mx.array):
        """The optimizer update of an accumulation cycle, after the statistics:
        ``grads`` the token-mean gradient over every micro-batch and process,
        ``routing`` their routing sums and ``n_tokens`` their loss tokens."""
        if self.schedule.n_events:  # uniform LoRA never grows: no statistics to keep
            self.drlora.update_statistics(grads, routing, n_tokens)
        guard = needs_rank_guard(self.args) and self.drlora.config.resolved_lora_layout == "masked"
        before = self.drlora.factors() if guard else None
        self.optimizer.update(self.model, grads)
        if before is not None:
            self.drlora.keep_masked_ranks(before)

    def _set_router(self, trained: bool) -> None:
        if trained == self.router_trained:
            return
        self.drlora.set_router_trainable(trained)
        self.optimizer.init(self.model.trainable_parameters())
        self.router_trained = trained

    # ----- evaluation -----------------------------------------------------------

    def evaluate(self, dataset, batches: int) -> float:
        """The loss on the first ``batches`` batches of ``dataset`` (see ``evaluate.test_loss``)."""
        return test_loss(self.model, self.drlora, dataset, self.args.batch_size, self.args.max_seq_length, batches,
                         self.world if self.world_size > 1 else None, self.args.loss_chunk_size)

    # ----- one iteration --------------------------------------------------------

    def _run_step(self, batch, lengths, update: bool):
        """The compiled step on one batch, evaluated: (loss, tokens, finite, accumulation or None).
        An update that does not stand is undone by putting the arrays it replaced back: the
        compiled step decides, and no pass over the state is spent on keeping them."""
        may_skip = mx.array(self.skipped < self.args.skip_nonfinite)
        before = tree_map(lambda x: x, self._state()) if update else None  # containers copied, arrays shared
        out = self._compiled(update)(mx.array(batch), mx.array(lengths), self.accum, may_skip)
        if not update:
            mx.eval(out)
            return out
        loss, tokens, finite, apply = out
        mx.eval(out, self._state())
        if not apply.item():
            _put_back(self._state(), before)
        return loss, tokens, finite, None

    def train_step(self, batch, lengths):
        """One iteration: a batch through the compiled step, which at the end of
        an accumulation cycle also makes the optimizer update; then, at the end
        of a cycle, the growth event. A batch with a non-finite loss or gradient
        never reaches the weights: it is skipped (up to ``skip_nonfinite``
        times) or ends the run with ``NonFiniteError``. Returns (loss, loss
        tokens, growth event or None)."""
        args = self.args
        it = self.iteration + 1
        opt_step = (it - 1) // args.grad_accumulation_steps + 1
        do_update = it % args.grad_accumulation_steps == 0
        if self.drlora.config.train_router == "after-warmup":
            self._set_router(opt_step > self.schedule.warmup_steps)
        loss, n_tokens, finite, accum = self._run_step(batch, lengths, do_update)
        self.iteration = it
        if not finite.item():
            self.skipped += 1
            if self.skipped > args.skip_nonfinite:
                raise NonFiniteError(it, opt_step, float(loss.item()))
            self.progress.log(f"iter {it}: non-finite loss or gradient, batch skipped "
                              f"({self.skipped} of --skip-nonfinite {args.skip_nonfinite})")
        elif not do_update:
            self.accum = accum
        event = None
        if do_update:
            self.accum = None
            event = self._grow(opt_step)
        return loss.item(), int(n_tokens.item()), event

    def _grow(self, opt_step: int):
        tic = time.perf_counter()
        event = grow(self.drlora, opt_step, self.schedule)
        if event is not None:
            if self.world_size > 1:
                self._check_agreement(opt_step)
            self.mean_rank = float(self.drlora.ranks().mean())
            self.grow_seconds = time.perf_counter() - tic
        return event

    def _check_agreement(self, step: int) -> None:
        """Every process must hold the same rank masks after a growth event:
        compare a fingerprint of them (two integer checksums) across processes."""
        flat = self.drlora.ranks().ravel().astype(np.int64)
        weights = np.arange(1, flat.size + 1, dtype=np.int64)
        fingerprint = mx.array([int((flat * weights).sum() % 2_000_003), int((flat * flat).sum() % 2_000_003)],
                               dtype=mx.int32)
        low = mx.distributed.all_min(fingerprint, group=self.world, stream=mx.cpu)
        high = mx.distributed.all_max(fingerprint, group=self.world, stream=mx.cpu)
        if not mx.array_equal(low, high).item():
            raise DivergenceError(step, self.rank)

    # ----- checkpoints ----------------------------------------------------------

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(arrays, meta) that let ``restore`` continue this run exactly."""
        arrays = {f"param.{k}": v for k, v in tree_flatten(self.model.trainable_parameters())}
        arrays.update({f"state.{k}": v for k, v in codec.encode(self.drlora).items()})
        arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        if self.accum is not None:
            # Sums over every process, so a run with another process count can continue it.
            arrays.update({f"accum.grads.{k}": self._all_sum(v) for k, v in self.accum.grads.items()})
            arrays["accum.routing"] = self._all_sum(self.accum.routing)
            arrays["accum.tokens"] = self._all_sum(self.accum.tokens)
        meta = {"router_trained": self.router_trained, "batches": self.batch_state, "skipped": self.skipped}
        return arrays, meta

    def restore(self, arrays: dict, meta: dict) -> None:
        """Continue from ``checkpoint_state``'s output (on a freshly attached model)."""
        self._set_router(bool(meta["router_trained"]))
        params = _section(arrays, "param.")
        known = dict(tree_flatten(self.model.parameters()))
        misfits = [k for k in params if k not in known or known[k].shape != params[k].shape]
        if misfits:
            raise CheckpointError(
                f"the checkpoint's parameters do not fit this model ({', '.join(misfits[:3])}); resume with the "
                "model and settings it was made with"
            )
        self.model.load_weights(list(params.items()), strict=False)
        codec.restore(self.drlora, _section(arrays, "state."))
        self.optimizer.state = tree_unflatten(list(_section(arrays, "optimizer.").items()))
        self.optimizer.init(self.model.trainable_parameters())  # adds the empty branches flattening dropped
        grads = _section(arrays, "accum.grads.")
        self.accum = Accumulation(grads, arrays["accum.routing"], arrays["accum.tokens"]) if grads else None
        if self.accum is not None and self.rank != 0:  # the saved sums count once, on process 0
            self.accum = Accumulation(*tree_map(mx.zeros_like, tuple(self.accum)))
        self.iteration = int(meta["iteration"])
        self.batch_state = dict(meta["batches"])
        self.skipped = int(meta.get("skipped", 0))
        self.mean_rank = float(self.drlora.ranks().mean())
        mx.eval(self.model.parameters(), self.optimizer.state, self.drlora.routing.parameters())

    # ----- the loop -------------------------------------------------------------

    def run(self, train_set, valid_set=None, on_save=None) -> TrainResult:
        """Train until ``args.iters``, evaluating, reporting and calling
        ``on_save(iteration)`` every ``save_every`` iterations and at the end."""
        args = self.args
        result = TrainResult()
        batches = Batches(train_set, args.batch_size, args.max_seq_length, args.seed, self.rank, self.world_size)
        batches.restore(self.batch_state)
        window, step_losses = ReportWindow(), []
        mx.reset_peak_memory()
        start = time.perf_counter()
        self.model.train()
        while self.iteration < args.iters and not self.stop_requested:
            it = self.iteration + 1
            if valid_set is not None and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
                self._validate(valid_set, it, result)
            tic = time.perf_counter()
            loss, n_tokens, event = self.train_step(*next(batches))
            threshold = args.clear_cache_threshold
            if threshold is not None and mx.get_cache_memory() > threshold:
                mx.clear_cache()
            self.batch_state = batches.state()
            window.add(loss, n_tokens, time.perf_counter() - tic)
            step_losses.append(loss)
            result.iteration_losses.append((it, loss))
            if it % args.grad_accumulation_steps == 0:
                result.losses.append((it // args.grad_accumulation_steps, float(np.mean(step_losses))))
                step_losses = []
            if event is not None and event.total:
                self._log_growth(event, it, result)
            lr = float(self.lora_optimizer.learning_rate.item())
            peak = mx.get_peak_memory() / 1e9
            if it % args.steps_per_report == 0 or it == args.iters:
                self._report(window, it, lr, peak, result)
                window = ReportWindow()
            self.progress.update(it, loss=loss, tokens_per_second=self.last_tps, peak_memory_gb=peak, lr=lr,
                                 mean_rank=self.mean_rank)
            if on_save is not None and (it % args.save_every == 0 or it == args.iters):
                on_save(it)
        result.interrupted = self.iteration < args.iters
        result.seconds = time.perf_counter() - start
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        result.traces = self.traces
        return result

    def _validate(self, valid_set, it: int, result: TrainResult) -> None:
        tic = time.perf_counter()
        val = self.evaluate(valid_set, self.args.val_batches)
        result.val_losses.append((it, val))
        self.progress.log(f"iter {it}: valid loss {val:.3f}")
        self.metrics.write({"kind": "val", "step": it, "val_loss": val})
        if self.reporter is not None:  # mlx-lm counts the iterations done before the evaluation
            self.reporter.on_val_loss_report({"iteration": it - 1, "val_loss": val,
                                              "val_time": time.perf_counter() - tic})

    def _log_growth(self, event, it: int, result: TrainResult) -> None:
        result.events.append(event)
        self.progress.log("grow " + event_summary(self.drlora, event)[:160])
        record = {"kind": "growth", "step": it, "optimizer_step": event.step, "grown": event.total,
                  "mean_rank": self.mean_rank}
        if event.routed is not None:
            record.update(chosen=chosen_experts(event.routed.ranks, self.drlora.n_experts),
                          unspent=[int(u) for u in event.routed.unspent])
        self.metrics.write(record)

    def _report(self, window: ReportWindow, it: int, lr: float, peak: float, result: TrainResult) -> None:
        tokens_per_second = window.tokens / max(window.seconds, 1e-9)  # tokens already counted over every process
        result.tokens += window.tokens
        record = {
            "kind": "train",
            "step": it,
            "loss": window.loss / window.iterations,
            "lr": lr,
            "tokens_per_second": tokens_per_second,
            "peak_memory_gb": peak,
            "mean_rank": self.mean_rank,
            "trained_tokens": result.tokens,
        }
        self.metrics.write(record)
        if self.reporter is not None:
            self.reporter.on_train_loss_report({
                "iteration": it,
                "train_loss": record["loss"],
                "learning_rate": lr,
                "iterations_per_second": window.iterations / max(window.seconds, 1e-9),
                "tokens_per_second": tokens_per_second,
                "trained_tokens": result.tokens,
                "peak_memory": peak,
            })
        self.progress.log(
            f"iter {it}: loss {record['loss']:.3f} | lr {lr:.2e} | "
            f"{tokens_per_second:,.0f} tok/s | peak {peak:.2f} GB | mean rank {self.mean_rank:.2f}"
        )
        self.last_tps = tokens_per_second


def _put_back(tree, before) -> None:
    """In place: every array of ``tree`` becomes the one ``before`` held at its place."""
    keys = [k for k in tree if k in before] if isinstance(tree, dict) else range(min(len(tree), len(before)))
    for key in keys:
        new, old = tree[key], before[key]
        if isinstance(new, (dict, list)):
            _put_back(new, old)
        elif new is not old:
            tree[key] = old


def _section(arrays: dict, prefix: str) -> dict:
    """The arrays whose names start with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
