"""Checkpoints: the whole training state, written atomically, read back exactly.

A checkpoint is a folder ``<adapter-path>/checkpoints/step-<iteration>/``
holding ``state.safetensors`` (every trained parameter, DR-LoRA's state, the
optimizer state, an unfinished gradient accumulation) and ``trainer.json``
(iteration, data position, router phase, and the settings the run was made
with). It is written into a hidden folder beside it and renamed into place
only when complete, so a process killed at any moment leaves the previous
checkpoints as they were; ``latest`` picks the newest one that reads back.

Training draws no random numbers (no dropout), so no random state is needed to
continue a run exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx

from ..errors import InputError
from ..files import fsync_dir, storage, write_json
from ..version import __version__

CHECKPOINTS = "checkpoints"
STATE = "state.safetensors"
META = "trainer.json"
# Settings that must match for a run to continue exactly. Reporting, saving
# and memory-only settings (grad_checkpoint) may change on resume.
FIXED_TRAINING = ("model", "data", "iters", "batch_size", "learning_rate", "router_learning_rate", "lr_schedule",
                  "optimizer", "optimizer_config", "weight_decay", "max_seq_length", "grad_accumulation_steps",
                  "mask_prompt", "seed")


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message says why."""


def checkpoint_dir(adapter_path: str | os.PathLike) -> Path:
    return Path(adapter_path) / CHECKPOINTS


def _publish(tmp: Path, final: Path) -> None:
    """Make a completely written checkpoint folder visible under its final name."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def save(adapter_path: str | os.PathLike, iteration: int, arrays: dict, meta: dict, keep: int = 2) -> Path:
    """Write checkpoint ``iteration`` atomically and keep the newest ``keep``."""
    root = checkpoint_dir(adapter_path)
    final = root / f"step-{iteration:07d}"
    tmp = root / f".tmp-step-{iteration:07d}-{os.getpid()}"
    needed = sum(v.nbytes for v in arrays.values())
    with storage(f"checkpoint {final.name}", root, needed, [tmp]):
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        mx.save_safetensors(str(tmp / STATE), arrays)
        with open(tmp / STATE, "rb+") as f:
            os.fsync(f.fileno())
        write_json(tmp / META, {**meta, "iteration": iteration, "drlora_mlx_version": __version__,
                                "saved_at": time.time()})
        _publish(tmp, final)
    for old in complete(adapter_path)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read(path: str | os.PathLike) -> tuple[dict, dict]:
    """(arrays, meta) of one checkpoint folder."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        arrays = mx.load(str(path / STATE))
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is unreadable ({first}); use another one") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
        raise CheckpointError(f"checkpoint {path} is unreadable ({META} records no iteration)")
    return arrays, meta


def complete(adapter_path: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(adapter_path)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / META).exists() and (p / STATE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest(adapter_path: str | os.PathLike) -> tuple[Path, dict, dict, list[str]]:
    """The newest checkpoint that reads back whole: (path, arrays, meta, notes),
    the notes saying which newer ones were skipped and why."""
    candidates = complete(adapter_path)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint to resume in {checkpoint_dir(adapter_path)}; train without --resume first "
            "(or give --resume-from a checkpoint folder)"
        )
    notes = []
    for path in reversed(candidates):
        try:
            arrays, meta = read(path)
        except CheckpointError as e:
            notes.append(f"skipped {e}".replace("; use another one", ""))
            continue
        return path, arrays, meta, notes
    raise CheckpointError(f"every checkpoint in {checkpoint_dir(adapter_path)} is unreadable")


def newest_meta(adapter_path: str | os.PathLike) -> dict | None:
    """The record of the newest checkpoint whose record reads, without its arrays (or None)."""
    for path in reversed(complete(adapter_path)):
        try:
            return json.loads((path / META).read_text())
        except (OSError, ValueError):
            continue
    return None


def check_settings(saved: dict, current: dict) -> None:
    """Refuse to continue a run with settings that would change its numbers.

    Both are ``{"training": {...}, "method": {...}}`` as ``config.run_settings`` makes them.
    """
    pairs = [(k, saved["training"].get(k), current["training"].get(k)) for k in FIXED_TRAINING]
    pairs += [(k, v, current["method"].get(k)) for k, v in saved["method"].items()]
    for key, was, now in pairs:
        if was != now:
            raise CheckpointError(
                f"the checkpoint was made with {key}={was!r}, this run asks for {key}={now!r}; "
                "resume with the same setting or train into a new --adapter-path"
            )
