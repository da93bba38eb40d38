"""The loss of an adapter on held-out data, during a run or on its own.

``test_loss`` is the one evaluation there is: the validation loss during
training, the ``--test`` figure after it, and ``drlora-mlx test`` (what
``mlx_lm.lora --test`` without ``--train`` does) all call it, so an adapter
evaluated on its own gives the figure its training run printed.

``evaluate_adapter`` evaluates a saved adapter without changing it: the
settings it was trained with (model, data, batch size, sequence length, test
batches, data format keys) are the defaults, the YAML file and the command line
override them, and nothing is written to the adapter folder.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config.settings import ConfigError, TrainingArgs, resolve
from ..data.batches import eval_batches
from ..data.loading import FEATURES
from ..formats.adapters import load_into, read_adapter_config
from .loss import make_loss


def test_loss(model, drlora, dataset, batch_size: int, max_seq_length: int, batches: int, world=None,
              chunk_size: int | None = None) -> float:
    """Mean next-token cross-entropy over the loss tokens of the first ``batches`` batches
    (-1: all) of ``dataset``; data-parallel processes (``world``) each take their rows of
    every batch and the sums are added over all of them. ``chunk_size``: as the training
    loss's (``loss.make_loss``)."""
    rank, size = (world.rank(), world.size()) if world is not None else (0, 1)
    was_training = model.training
    model.eval()
    loss_fn = make_loss(drlora, record=False, chunk_size=chunk_size)
    total, count = mx.array(0.0), mx.array(0.0)
    for batch, lengths in eval_batches(dataset, batch_size, max_seq_length, batches, rank, size):
        ce_sum, n, _ = loss_fn(model, mx.array(batch), mx.array(lengths))
        total, count = total + ce_sum, count + n
        mx.eval(total, count)
    if size > 1:
        total = mx.distributed.all_sum(total, group=world)
        count = mx.distributed.all_sum(count, group=world)
    if was_training:
        model.train()
    return (total / mx.maximum(count, 1)).item()


def recorded_settings(adapter_path: str | Path) -> dict:
    """The training settings a saved adapter records (its model and data resolved to what the run used)."""
    record = read_adapter_config(adapter_path)
    known = set(TrainingArgs.__dataclass_fields__)
    return {k: v for k, v in record.get("training", {}).items() if k in known}


def evaluation_settings(given: dict, file_settings: dict, source: str) -> TrainingArgs:
    """The settings of an evaluation: the adapter's recorded ones, under the YAML file's, under the
    command line's. Training-only settings (iters, learning rate, growth ...) are checked but unused."""
    layered = {**file_settings, **given}
    adapter_path = layered.get("adapter_path") or TrainingArgs.__dataclass_fields__["adapter_path"].default
    base = recorded_settings(adapter_path)
    # An evaluation trains nothing: iters 0 and train: false are how it is asked for.
    file_settings = {k: v for k, v in file_settings.items() if k not in ("iters", "train")}
    given = {k: v for k, v in given.items() if k not in ("iters", "train")}
    args, _ = resolve({**given, "adapter_path": adapter_path}, file_settings, source, base)
    return args


def evaluate_adapter(args: TrainingArgs, world=None, out=None) -> float:
    """Load ``args.model`` with the adapter in ``args.adapter_path``, evaluate the test split of
    ``args.data`` and print the loss; the adapter folder is only read."""
    from ..data.loading import load_datasets
    from ..formats.base_model import load_base
    from ..formats.tiny import builtin_model_path

    say = out or (lambda line: print(line, flush=True))
    if world is not None and world.rank() != 0:
        say = lambda line: None  # noqa: E731
    if args.data is None and args.hf_dataset is None:
        raise ConfigError("the adapter records no data; give --data with the test split")
    model, tokenizer = load_base(args.model or str(builtin_model_path()), trust_remote_code=args.trust_remote_code)
    drlora = load_into(model, args.adapter_path)
    notes: list[str] = []
    features = {name: getattr(args, name) for name in FEATURES}
    _, _, test_set = load_datasets(args.data, tokenizer, args.mask_prompt, need_test=True, features=features,
                                   hf_dataset=args.hf_dataset, notes=notes, need_train=False)
    for note in notes:
        say(note)
    loss = test_loss(model, drlora, test_set, args.batch_size, args.max_seq_length, args.test_batches, world,
                     args.loss_chunk_size)
    say(f"test loss {loss:.3f}, perplexity {np.exp(loss):.3f} ({args.adapter_path} on {args.data or 'hf_dataset'})")
    return loss
