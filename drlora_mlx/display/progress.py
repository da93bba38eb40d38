"""What a run shows: a live progress panel, report lines, metrics.jsonl and its plot, the rank heatmap."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from rich.box import ROUNDED
from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from ..data.loading import read_jsonl
from ..errors import InputError
from ..files import storage
from .png import training_png

SHADES = " .:-=+*#%@"

# update()'s keyword fields, named as in metrics.jsonl's "train" records: (label, format), in display order.
FIELDS = {
    "loss": ("loss", "{:.3f}"),
    "tokens_per_second": ("tok/s", "{:,.0f}"),
    "peak_memory_gb": ("peak", "{:.2f} GB"),
    "lr": ("lr", "{:.1e}"),
    "mean_rank": ("mean rank", "{:.2f}"),
}
BAR_WIDTH, PANEL_WIDTH = 30, 88
_EIGHTHS = "▏▎▍▌▋▊▉"  # 1/8 .. 7/8 of a bar cell


class Progress:
    """Report lines on stdout and, when stderr is a terminal, a live panel below
    them: a bar with the iteration, the elapsed time and the ETA, then the
    latest loss, throughput, peak memory, learning rate and mean rank. The
    panel is erased before each report line and drawn again after it, so the
    report lines scroll above it as plain text; off a terminal only the report
    lines are written. Nothing is shown when ``enabled`` is False
    (data-parallel ranks other than 0).
    """

    def __init__(self, total: int, stream=None, lines=None, enabled: bool = True):
        self.total = total
        self.stream = stream or sys.stderr
        self.lines = lines or sys.stdout
        self.enabled = enabled
        # A dumb terminal (TERM=dumb, as in editors' shells) cannot move the cursor back over the panel.
        self.live = enabled and self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.console = Console(file=self.stream, force_terminal=True, highlight=False) if self.live else None
        self.done = 0
        self.status = ""
        self.fields: dict[str, float] = {}
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, done) of the first update
        self.height = 0  # terminal lines the panel takes now

    def update(self, done: int, status: str | None = None, *, loss: float | None = None,
               tokens_per_second: float | None = None, peak_memory_gb: float | None = None,
               lr: float | None = None, mean_rank: float | None = None) -> None:
        """Iteration ``done`` of ``total`` has finished. ``status`` (free text)
        and the keyword fields given replace the ones shown; the others stay."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        self.done = done
        if status is not None:
            self.status = status
        given = {"loss": loss, "tokens_per_second": tokens_per_second, "peak_memory_gb": peak_memory_gb, "lr": lr,
                 "mean_rank": mean_rank}
        self.fields.update({k: v for k, v in given.items() if v is not None})
        if self.live:
            self._draw(now)

    def _eta(self, now: float) -> float | None:
        """Seconds left at the mean pace since the first update, which leaves out
        the first iteration (compilation) and the iterations a resumed run skipped;
        None until a second update."""
        if self.first is None or self.done <= self.first[1]:
            return None
        t0, d0 = self.first
        return (now - t0) / (self.done - d0) * (self.total - self.done)

    def _panel(self, now: float) -> Panel:
        eta = self._eta(now)
        fraction = min(max(self.done / max(self.total, 1), 0.0), 1.0)
        filled, rest = bar(fraction, BAR_WIDTH)
        head = Text.assemble(
            (filled, "blue"), (rest, "grey50"),
            (f" {100 * fraction:3.0f}%", "bold blue"), "  ", (f"{self.done:,}", "bold"), (f"/{self.total:,}", "grey50"),
            ("  elapsed ", "grey50"), format_time(now - self.start),
            ("  ETA ", "grey50"), format_time(eta) if eta is not None else "--",
        )
        parts = [Text.assemble((label + " ", "grey50"), (FIELDS[k][1].format(self.fields[k]), "bold"))
                 for k, (label, _) in FIELDS.items() if k in self.fields]
        if self.status:
            parts.append(Text(self.status))
        # A fixed width, so the border stays put while the numbers in it change length.
        return Panel(Group(head, Text("  ").join(parts)), title="drlora-mlx train", title_align="left", box=ROUNDED,
                     border_style="blue", width=min(self.console.width, PANEL_WIDTH))

    def _draw(self, now: float) -> None:
        with self.console.capture() as captured:
            self.console.print(self._panel(now))
        text = captured.get()
        self.stream.write(self._erase() + text)
        self.height = text.count("\n")
        self.stream.flush()

    def _erase(self) -> str:
        # The cursor sits at the start of the line below the panel: go up over it and clear to the end of the screen.
        return f"\x1b[{self.height}A\r\x1b[J" if self.height else ""

    def _clear(self) -> None:
        if self.height:
            self.stream.write(self._erase())
            self.stream.flush()
            self.height = 0

    def log(self, line: str) -> None:
        """A report line on stdout, above the panel."""
        if not self.enabled:
            return
        self._clear()
        self.lines.write(line + "\n")
        self.lines.flush()
        if self.live and self.first is not None:
            self._draw(time.perf_counter())

    def close(self) -> None:
        """Erase the panel: the terminal keeps the report lines only. Later report lines are plain."""
        self._clear()
        self.live = False


def bar(fraction: float, width: int) -> tuple[str, str]:
    """A bar of ``width`` cells for ``fraction`` in [0, 1]: (the filled part in
    full blocks, to an eighth of a cell; the rest in light shade)."""
    full, part = divmod(int(fraction * width * 8), 8)
    filled = "█" * full + (_EIGHTHS[part - 1] if part else "")
    return filled, "░" * (width - len(filled))


class MetricsLog:
    """Appends one JSON object per line to ``<adapter-path>/metrics.jsonl``."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with storage("metrics.jsonl", self.path.parent):
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class MetricsError(InputError):
    """A metrics.jsonl that is missing or cannot be plotted; the message names the file (and record)."""


# The numbers each kind of record must carry to be plotted; records of other kinds are passed over.
_NEEDED = {"train": ("step", "loss", "mean_rank"), "val": ("step", "val_loss"), "growth": ("step", "mean_rank")}


def read_metrics(adapter_path: str | os.PathLike) -> list[dict]:
    """The records of ``<adapter-path>/metrics.jsonl`` in file order. A line
    that is not a JSON object is a ``DataError`` naming it; a record without
    the numbers its kind carries, a ``MetricsError`` naming it."""
    folder = Path(adapter_path)
    path = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise MetricsError(f"{folder} is not a folder; give the --adapter-path of a drlora-mlx train run")
    if not path.is_file():
        raise MetricsError(f"{folder} has no metrics.jsonl; drlora-mlx train writes it there as the run goes")
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        kind = record.get("kind")
        if not isinstance(kind, str):
            raise MetricsError(f'{path}, record {number}: a metrics record needs a "kind"')
        missing = [k for k in _NEEDED.get(kind, ())
                   if isinstance(record.get(k), bool) or not isinstance(record.get(k), (int, float))]
        if missing:
            raise MetricsError(f"{path}, record {number}: a {kind!r} record needs a number for "
                               + ", ".join(map(repr, missing)))
    return records


def curve(records: list[dict], kind: str | tuple[str, ...], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` in the records of ``kind``, by step. A step
    recorded twice (a resumed run repeats the iterations after its checkpoint)
    keeps the later value; non-finite values are left out."""
    kinds = (kind,) if isinstance(kind, str) else kind
    by_step = {r["step"]: float(r[key]) for r in records if r["kind"] in kinds}
    steps = sorted(s for s, v in by_step.items() if math.isfinite(v))
    return np.array(steps, dtype=np.float64), np.array([by_step[s] for s in steps], dtype=np.float64)


def plot_training(adapter_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the training and validation loss and the mean rank of a run over
    its steps, from its metrics.jsonl, into ``out`` (default
    ``<adapter-path>/training.png``); returns the path written."""
    records = read_metrics(adapter_path)
    train = curve(records, "train", "loss")
    if not len(train[0]):
        raise MetricsError(f"{Path(adapter_path) / 'metrics.jsonl'} has no training records with a finite loss "
                           "yet; the first is written after --steps-per-report iterations")
    out = Path(out) if out is not None else Path(adapter_path) / "training.png"
    training_png(out, train, curve(records, "val", "val_loss"), curve(records, ("train", "growth"), "mean_rank"))
    return out


def format_time(seconds: float) -> str:
    """``seconds`` as minutes and seconds ("4m05s"), or hours and minutes ("2h13m") from an hour on."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def rank_heatmap(ranks: np.ndarray, targets, n_experts: int, r_init: int, r_max: int, layer_ids=None) -> str:
    """The active rank of every expert module as a block of characters:
    one row per layer and projection, one column per expert, darker = higher."""
    ranks = np.asarray(ranks)
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(ranks.shape[0]))
    span = max(r_max - r_init, 1)
    lines = [f"active rank per expert: ' ' = r_init {r_init} ... '@' = r_max {r_max}"]
    name_w = max(len(t) for t in targets)
    for l, row in enumerate(ranks):
        for p, target in enumerate(targets):
            r = row[p * n_experts : (p + 1) * n_experts]
            levels = np.clip(((r - r_init) * (len(SHADES) - 1) + span // 2) // span, 0, len(SHADES) - 1)
            cells = "".join(SHADES[int(v)] for v in levels)
            lines.append(f"  L{layer_ids[l]:<3d} {target:<{name_w}} |{cells}|  mean {r.mean():6.2f}")
    return "\n".join(lines)
