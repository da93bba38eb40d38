"""Where a run starts, decided once under the run's lock (``run.run``).

- fresh: a new run into ``--adapter-path`` (which may hold a finished run,
  never an unfinished one);
- resume: continue from the newest checkpoint that reads back whole
  (``--resume``; newer damaged ones are skipped, and the notes say so) or from
  a named one (``--resume-from <checkpoint folder>``);
- warm: a new run that starts from the weights and ranks of a PEFT export
  made by ``drlora-mlx export`` (``--resume-from <export folder>``).

A resumed run keeps its own settings and a warm start the export's method
settings; ``base_settings`` gives them to ``config.resolve`` and ``check``
refuses a run whose settings would change the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config.settings import run_settings
from ..formats.peft import EXPORT_INFO, read_export
from . import checkpoint
from .checkpoint import CheckpointError

# Settings a resumed run takes from the command line, not from its checkpoint.
_OWN_SETTINGS = ("resume", "resume_from", "adapter_path")


@dataclass
class Start:
    """The decision: ``kind`` is fresh, resume or warm."""

    kind: str
    source: Path | None = None  # the checkpoint folder or the PEFT export
    arrays: dict | None = None  # a checkpoint's arrays
    meta: dict | None = None  # a checkpoint's trainer.json, or an export's drlora_export.json
    notes: list[str] = field(default_factory=list)

    def _saved_settings(self) -> dict:
        saved = self.meta.get("settings")
        if not isinstance(saved, dict) or not {"training", "method"} <= set(saved):
            raise CheckpointError(f"checkpoint {self.source} records no settings; it cannot be resumed")
        return saved

    def base_settings(self) -> dict | None:
        """The settings a run starting here keeps unless told otherwise."""
        if self.kind == "resume":
            saved = self._saved_settings()
            # Checkpoints made before the pooled layout existed hold masked factors.
            method = {"lora_layout": "masked", **saved["method"]}
            return {k: v for k, v in {**saved["training"], **method}.items() if k not in _OWN_SETTINGS}
        if self.kind == "warm":
            return dict(self.meta["method"])
        return None

    def check(self, args, config) -> None:
        """Refuse settings that would change the numbers of the run this continues."""
        if self.kind == "resume":
            checkpoint.check_settings(self._saved_settings(), run_settings(args, config))
        elif self.kind == "warm":
            current = config.to_dict()
            for key, value in self.meta["method"].items():
                if current.get(key) != value:
                    raise CheckpointError(
                        f"the PEFT export was trained with {key}={value!r}, this run asks for "
                        f"{key}={current.get(key)!r}; leave {key} as it was"
                    )


def _fresh(adapter_path: Path) -> Start:
    meta = checkpoint.newest_meta(adapter_path)
    if meta is not None:
        iters = meta.get("settings", {}).get("training", {}).get("iters")
        if iters is not None and meta.get("iteration", iters) < iters:
            raise CheckpointError(
                f"{adapter_path} holds an unfinished run (iteration {meta['iteration']} of {iters}); "
                "continue it with --resume or choose another --adapter-path"
            )
    return Start("fresh")


def decide(adapter_path: str, resume: bool = False, resume_from: str | None = None) -> Start:
    """Where a run with these settings starts, having read what it starts from."""
    if resume_from:
        path = Path(resume_from)
        if (path / EXPORT_INFO).exists():
            return Start("warm", path, meta=read_export(path))
        if not (path / checkpoint.META).exists():
            raise CheckpointError(
                f"{path} is not a drlora-mlx checkpoint folder (no {checkpoint.META}); give a folder from "
                f"{checkpoint.CHECKPOINTS}/ of an adapter path, or a `drlora-mlx export` folder"
            )
        arrays, meta = checkpoint.read(path)
        return Start("resume", path, arrays, meta)
    if resume:
        path, arrays, meta, notes = checkpoint.latest(adapter_path)
        return Start("resume", path, arrays, meta, notes)
    return _fresh(Path(adapter_path))
