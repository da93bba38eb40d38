"""One training run, start to finish: model, data, adapter, loop, outputs.

``run(...)`` is what ``drlora-mlx train`` does; the command line only parses.
Without ``args.model`` it trains the built-in tiny MoE (made and cached on
first use) on the bundled tasks, offline.
"""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config.settings import DRLoRAConfig, TrainingArgs, resolve, run_settings
from ..data.loading import (
    FEATURES,
    bundled_data_dir,
    check_lengths,
    fingerprint,
    load_datasets,
)
from ..display.progress import MetricsLog, Progress
from ..display.report import routed_plan, run_summary
from ..errors import InputError, RunStopped
from ..files import StorageError
from ..formats.adapters import save_adapter
from ..formats.base_model import load_base
from ..formats.peft import import_peft
from ..formats.tiny import BUILTIN_FAMILY, builtin_model_path
from ..lora.attach import attach
from . import checkpoint, faults
from .adapter_start import start_from_adapter_file
from .checkpoint import CheckpointError
from .distributed import PeerLost, Peers, barrier, launched_world, watchdog
from .lock import holding
from .memory import available_bytes, estimate_peak_bytes, memory_warning
from .start import Start, decide
from .trainer import Trainer, TrainResult


class Interrupted(RunStopped):
    """The run stopped on a signal after writing a checkpoint."""

    label = ""

    def __init__(self, signum: int, iteration: int, adapter_path: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at iteration {iteration}: checkpoint written; continue with "
            f"drlora-mlx train --resume --adapter-path {adapter_path}"
        )
        self.exit_code = 128 + signum


def _clear_finished_run(adapter_path: Path) -> None:
    if not adapter_path.exists():
        return
    shutil.rmtree(checkpoint.checkpoint_dir(adapter_path), ignore_errors=True)
    (adapter_path / "metrics.jsonl").unlink(missing_ok=True)


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
            if signal.getsignal(s) is handler:  # (a handler the run replaced on its way out stays)
                signal.signal(s, h)


class _Run:
    """The pieces of one run, put together step by step by ``run``."""

    def __init__(self, args: TrainingArgs, config: DRLoRAConfig, world, out, start: Start):
        self.args, self.config, self.world, self.start = args, config, world, start
        self.rank = world.rank() if world is not None else 0
        out = out or (lambda line: print(line, flush=True))
        self.say = out if self.rank == 0 else (lambda line: None)
        self.adapter_path = Path(args.adapter_path)
        self.model_name = args.model or str(builtin_model_path())
        # A Hugging Face dataset replaces the bundled tasks, as it replaces --data.
        self.data = args.data or (None if args.hf_dataset else str(bundled_data_dir()))
        self.saved_at: list[int] = []
        self.reporter = None

    def sources(self) -> None:
        """Say where the run starts and what it trains on."""
        for note in self.start.notes:
            self.say(note)
        if self.args.model is None:
            self.say(f"No --model given: training the built-in tiny {BUILTIN_FAMILY} ({self.model_name})")
        if self.data is not None and self.args.data is None:
            self.say(f"No --data given: using the bundled tasks ({self.data})")
        if self.world is not None:
            size = self.world.size()
            self.peers = Peers(self.world)
            self.say(f"data-parallel over {size} processes: each takes {self.args.batch_size // size} of the "
                     f"{self.args.batch_size} examples of every batch")
        if self.rank == 0:
            self.reporter = reporting_callback(self.args, self.config)

    def load(self) -> None:
        """The model with its adapter attached (or imported from a PEFT export), and the data."""
        args = self.args
        self.model, tokenizer = load_base(self.model_name, trust_remote_code=args.trust_remote_code)
        mx.random.seed(args.seed)
        if self.start.kind == "warm":
            # A new run that starts from the exported adapter's weights and ranks.
            self.drlora = import_peft(self.model, self.start.source, self.start.meta)
            self.say(f"starting from the PEFT export {self.start.source} (its ranks and weights; statistics start "
                     "afresh)")
        else:
            self.drlora = attach(self.model, self.config, seed=args.seed)
        if args.resume_adapter_file and self.start.kind == "warm":
            raise InputError("resume_from (a PEFT export) and resume_adapter_file both give starting weights; give one")
        if args.resume_adapter_file and self.start.kind == "fresh":  # a resumed run has the weights already
            for note in start_from_adapter_file(self.drlora, args.resume_adapter_file):
                self.say(note)
            self.say(f"starting from the mlx-lm adapter {args.resume_adapter_file} (its weights fill the first ranks; "
                     "statistics and optimizer start afresh)")
        features = {name: getattr(args, name) for name in FEATURES}
        notes: list[str] = []
        self.train_set, self.valid_set, self.test_set = load_datasets(self.data, tokenizer, args.mask_prompt,
                                                                      need_test=args.test, features=features,
                                                                      hf_dataset=args.hf_dataset, notes=notes)
        for note in notes:
            self.say(note)
        truncated = check_lengths(self.train_set, args.max_seq_length)
        if truncated:
            self.say(f"warning: {truncated} training examples are longer than --max-seq-length "
                     f"{args.max_seq_length} and will be truncated")
        self.data_sha256 = fingerprint(self.train_set)

    def prepare(self) -> None:
        """The output folder, then the trainer, what it will do, and the state it starts from."""
        args, drlora = self.args, self.drlora
        self.say(drlora.report())
        schedule = drlora.schedule(args.optimizer_steps)  # refused, if it must be, before the folder changes
        self._prepare_folder()
        self.trainer = Trainer(self.model, drlora, args, progress=Progress(args.iters, enabled=self.rank == 0),
                               metrics=MetricsLog(self.adapter_path / "metrics.jsonl", enabled=self.rank == 0),
                               world=self.world, reporter=self.reporter, schedule=schedule)
        if self.config.method == "routed":
            self.say(routed_plan(drlora, schedule))
        if self.config.method == "drlora":
            self.say(
                f"growth: {schedule.event_count} events every {schedule.grow_every} optimizer steps from step "
                f"{schedule.warmup_steps} to {schedule.end_step}, {schedule.quota} ranks per layer per event, "
                f"budget {schedule.budget} per layer (exhausted at step {schedule.budget_exhausted_step()})"
            )
        longest = max(len(self.train_set[i][0]) for i in range(len(self.train_set)))
        estimate = estimate_peak_bytes(self.model, drlora, args.batch_size, min(longest, args.max_seq_length),
                                       args.grad_checkpoint, args.loss_chunk_size)
        warning = memory_warning(estimate, available_bytes())
        if warning:
            self.say(warning)
        if self.start.kind == "resume":
            self.trainer.restore(self.start.arrays, self.start.meta)
            self.say(f"resuming from {self.start.source} at iteration {self.trainer.iteration} of {args.iters}")

    def _prepare_folder(self) -> None:
        """A resumed run checks that its data is the checkpoint's; a new one clears the finished run
        the folder may hold. Either way the folder exists afterwards."""
        if self.start.kind == "resume":
            recorded = self.start.meta.get("data_sha256")
            if recorded is not None and recorded != self.data_sha256:
                raise CheckpointError(
                    f"the training data in {self.data or 'hf_dataset'} is not the data the checkpoint "
                    f"{self.start.source} was trained "
                    "on (its examples changed); resume with the same data or train into a new --adapter-path"
                )
        else:
            barrier(self.world)  # every process has checked the output folder before it changes
            if self.rank == 0:
                _clear_finished_run(self.adapter_path)
        if self.rank == 0:
            self.adapter_path.mkdir(parents=True, exist_ok=True)

    def save_adapter(self) -> dict:
        """The adapter as it is now (process 0 only); what was written."""
        training = {**self.args.to_dict(), "model": self.model_name, "data": self.data}
        return save_adapter(self.drlora, self.adapter_path, self.model_name, training=training)

    def save(self, iteration: int) -> None:
        """The adapter and a checkpoint of ``iteration``; a write the disk refuses ends the run with
        one line, the newest complete checkpoint as it was."""
        arrays, meta = self.trainer.checkpoint_state()
        mx.eval(arrays)  # collectives are lazy: every process must evaluate its part
        if self.rank == 0:
            try:
                self.save_adapter()
                checkpoint.save(self.adapter_path, iteration, arrays,
                                {**meta, "settings": run_settings(self.args, self.config),
                                 "data_sha256": self.data_sha256},
                                keep=self.args.keep_checkpoints)
            except StorageError as e:
                raise StorageError(f"{e}; {self._last_checkpoint()}") from None
        self.saved_at.append(iteration)

    def _watchdog(self):
        """A data-parallel process that waits in a collective for longer than --peer-timeout seconds
        after the last finished iteration stops, saying so."""
        timeout = self.args.peer_timeout
        return watchdog(self.world, lambda: self.trainer.iteration, timeout,
                        lambda it: f"no progress for {timeout} s after iteration {it}: {self.peers.lost()} stopped "
                                   f"answering; {self._last_checkpoint()}")

    def _last_checkpoint(self) -> str:
        done = checkpoint.complete(self.adapter_path)
        if not done:
            return "no checkpoint was written yet"
        return (f"the newest complete checkpoint, {done[-1].name}, is intact: continue with drlora-mlx train "
                f"--resume --adapter-path {self.adapter_path}")

    def train(self) -> TrainResult:
        """The loop, with checkpoints, signals and the faults the tests ask for."""
        with faults.installed(self.trainer), _stop_on_signals(self.trainer) as received, self._watchdog():
            try:
                result = self.trainer.run(self.train_set, self.valid_set, on_save=self.save)
            except RuntimeError as e:
                if self.world is None or "[ring]" not in str(e) and "peer" not in str(e):
                    raise
                # mlx.launch stops the other processes with SIGTERM once one has died: this one is stopping
                # anyway and says why.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                raise PeerLost(self.peers.lost(), self.trainer.iteration, self._last_checkpoint()) from None
            finally:
                self.trainer.progress.close()
            if result.interrupted:
                if not self.saved_at or self.saved_at[-1] != self.trainer.iteration:
                    self.save(self.trainer.iteration)
                raise Interrupted(received[0] if received else signal.SIGINT, self.trainer.iteration,
                                  self.adapter_path)
        return result

    def finish(self, result: TrainResult) -> None:
        """The test loss, the final adapter and the summary."""
        args = self.args
        if args.test:
            result.test_loss = self.trainer.evaluate(self.test_set, args.test_batches)
            self.say(f"test loss {result.test_loss:.3f}, perplexity {np.exp(result.test_loss):.3f}")
            self.trainer.metrics.write({"kind": "test", "step": args.iters, "test_loss": result.test_loss})
        if self.rank != 0:
            return
        written = self.save_adapter()
        self.say(run_summary(self.drlora, result, args.steps_per_report))
        self.say(f"saved the adapter to {self.adapter_path}/ (mlx-lm format: adapters.safetensors + "
                 "adapter_config.json)")
        if written["router_trained"]:
            if written["router_in_mlx_lm_adapter"]:
                self.say("the trained router is in adapters.safetensors (as an exact LoRA) and in "
                         "drlora_state.safetensors")
            else:
                self.say(
                    "note: the trained router is in drlora_state.safetensors only: mlx-lm's adapter format cannot "
                    "carry it for this model, so mlx_lm.load(adapter_path=...) gives the untrained router; "
                    "drlora_mlx.load() applies it"
                )


def reporting_callback(args: TrainingArgs, config: DRLoRAConfig):
    """mlx-lm's reporting callback for ``args.report_to`` (None without one), made
    as mlx_lm.lora makes it: the run's settings as its config, the adapter folder
    as its log folder."""
    if not args.report_to:
        return None
    from mlx_lm.tuner import callbacks

    for name in (n.strip().lower() for n in args.report_to.split(",") if n.strip()):
        if name not in callbacks.SUPPORT_CALLBACK:
            raise InputError(f"report_to: unknown service {name!r}; choose from "
                             f"{', '.join(callbacks.SUPPORT_CALLBACK)}")
        if getattr(callbacks, name, None) is None:  # mlx-lm imports each service's package if it is there
            raise InputError(f"report_to {name}: the {name} package is not installed; pip install {name}")
    settings = {**args.to_dict(), **config.to_dict()}
    return callbacks.get_reporting_callbacks(args.report_to, project_name=args.project_name,
                                             log_dir=args.adapter_path, config=settings)


def run(args: TrainingArgs | None = None, config: DRLoRAConfig | None = None, *, world=None, out=None,
        file_settings: dict | None = None, source: str = "config file", **settings) -> TrainResult:
    """Train (or continue, with ``resume`` / ``resume_from``), save the adapter
    and checkpoints to ``adapter_path`` and print a summary.

    The settings come resolved, as ``args`` and ``config``, or as a user gives
    them: by name (``run(model=..., iters=200, r_init=4)``, the command line's
    flags with underscores) over ``file_settings`` (a YAML file's, ``source``
    in messages) over the defaults; a resumed run then keeps its own settings
    where these name none. The adapter folder is locked for the whole run, and
    where the run starts is decided once, under that lock; a second run into
    the folder is refused. ``out``: where the report lines go (print)."""
    if (args is not None or config is not None) and (settings or file_settings):
        raise InputError("give run() TrainingArgs and DRLoRAConfig, or settings by name, not both")
    world = world if world is not None else launched_world()
    if args is not None or config is not None:
        args, config = args or TrainingArgs(), config or DRLoRAConfig()
        adapter_path, resume, resume_from = args.adapter_path, args.resume, args.resume_from
    else:
        layered = {**(file_settings or {}), **settings}
        adapter_path = layered.get("adapter_path") or TrainingArgs.__dataclass_fields__["adapter_path"].default
        resume, resume_from = bool(layered.get("resume")), layered.get("resume_from")
    with holding(adapter_path, world):
        start = decide(adapter_path, resume, resume_from)
        if args is None:
            args, config = resolve(settings, file_settings, source, start.base_settings())
        start.check(args, config)
        job = _Run(args, config, world, out, start)
        job.sources()
        job.load()
        job.prepare()
        result = job.train()
        job.finish(result)
    return result
