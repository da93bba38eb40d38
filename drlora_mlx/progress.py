"""What a run shows: a live progress line, report lines, metrics.jsonl, the rank heatmap."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .files import storage

SHADES = " .:-=+*#%@"


class Progress:
    """Report lines on stdout and, when stderr is a terminal, a progress bar
    redrawn in place below them. Nothing is shown when ``enabled`` is False
    (data-parallel ranks other than 0).
    """

    def __init__(self, total: int, stream=None, lines=None, enabled: bool = True, width: int = 24):
        self.total = total
        self.stream = stream or sys.stderr
        self.lines = lines or sys.stdout
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.width = width
        self.done = 0
        self.status = ""
        self.start = time.perf_counter()

    def update(self, done: int, status: str | None = None) -> None:
        self.done = done
        if status is not None:
            self.status = status
        self._draw()

    def _draw(self) -> None:
        if not self.live:
            return
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        line = f"[{bar}] {self.done}/{self.total} {self.status} | {format_time(elapsed)}<{format_time(eta)}"
        self.stream.write("\r\033[K" + line)
        self.stream.flush()

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.lines.write(line + "\n")
        self.lines.flush()
        self._draw()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


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


def format_time(seconds: float) -> str:
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
