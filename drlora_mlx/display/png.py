"""Heatmaps and line charts as PNG images, written with numpy and the standard library alone."""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A perceptually ordered dark-blue -> yellow ramp (viridis end points and midpoints).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB (uint8) for values in [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (v - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - t) + _RAMP[hi] * t).astype(np.uint8)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def heatmap_png(path: str | Path, panels: list[np.ndarray], ranges: list[tuple[float, float]], cell: int = 12) -> None:
    """Panels (2-D arrays) side by side with white gaps between them; panel i
    is coloured from ranges[i][0] (dark) to ranges[i][1] (yellow)."""
    gap = cell
    rows = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) * cell + gap * (len(panels) + 1)
    image = np.full((rows * cell + 2 * gap, width, 3), 255, dtype=np.uint8)
    x = gap
    for panel, (lo, hi) in zip(panels, ranges):
        colours = colormap((np.asarray(panel, dtype=np.float64) - lo) / max(hi - lo, 1e-12))
        block = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
        image[gap : gap + block.shape[0], x : x + block.shape[1]] = block
        x += block.shape[1] + gap
    write_png(path, image)


def rank_heatmap_png(path: str | Path, panels: list[np.ndarray], r_min: int, r_max: int, cell: int = 12) -> None:
    """One panel (layers x experts) per projection, side by side, white gaps
    between them; colour runs from r_min (dark) to r_max (yellow)."""
    heatmap_png(path, panels, [(r_min, max(r_max, r_min + 1))] * len(panels), cell)


# A 5 x 7 pixel font (the classic character-LCD one): rows top to bottom, '#' = ink.
_FONT = {
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.", "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####", "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.", "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.", "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.", "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ".": ".....|.....|.....|.....|.....|.##..|.##..", "-": ".....|.....|.....|#####|.....|.....|.....",
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "a": ".....|.....|.###.|....#|.####|#...#|.####", "b": "#....|#....|#.##.|##..#|#...#|#...#|####.",
    "c": ".....|.....|.###.|#....|#....|#...#|.###.", "d": "....#|....#|.##.#|#..##|#...#|#...#|.####",
    "e": ".....|.....|.###.|#...#|#####|#....|.###.", "f": "..##.|.#..#|.#...|###..|.#...|.#...|.#...",
    "g": ".....|.####|#...#|#...#|.####|....#|.###.", "h": "#....|#....|#.##.|##..#|#...#|#...#|#...#",
    "i": "..#..|.....|.##..|..#..|..#..|..#..|.###.", "j": "...#.|.....|..##.|...#.|...#.|#..#.|.##..",
    "k": "#....|#....|#..#.|#.#..|##...|#.#..|#..#.", "l": ".##..|..#..|..#..|..#..|..#..|..#..|.###.",
    "m": ".....|.....|##.#.|#.#.#|#.#.#|#...#|#...#", "n": ".....|.....|#.##.|##..#|#...#|#...#|#...#",
    "o": ".....|.....|.###.|#...#|#...#|#...#|.###.", "p": ".....|.....|####.|#...#|####.|#....|#....",
    "q": ".....|.....|.##.#|#..##|.####|....#|....#", "r": ".....|.....|#.##.|##..#|#....|#....|#....",
    "s": ".....|.....|.###.|#....|.###.|....#|####.", "t": ".#...|.#...|###..|.#...|.#...|.#..#|..##.",
    "u": ".....|.....|#...#|#...#|#...#|#..##|.##.#", "v": ".....|.....|#...#|#...#|#...#|.#.#.|..#..",
    "w": ".....|.....|#...#|#...#|#.#.#|#.#.#|.#.#.", "x": ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#",
    "y": ".....|.....|#...#|#...#|.####|....#|.###.", "z": ".....|.....|#####|...#.|..#..|.#...|#####",
}
_GLYPHS = {ch: np.array([[c == "#" for c in row] for row in rows.split("|")]) for ch, rows in _FONT.items()}
GLYPH_W, GLYPH_H, ADVANCE = 5, 7, 6  # pixels at scale 1; ADVANCE includes the gap after a glyph


def text_width(text: str, scale: int = 2) -> int:
    """Pixels from the left of the first glyph to the right of the last."""
    return (len(text) * ADVANCE - (ADVANCE - GLYPH_W)) * scale if text else 0


def draw_text(image: np.ndarray, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 2) -> None:
    """Digits, '.', '-', spaces and lowercase letters with their top-left corner at (x, y)."""
    h, w, _ = image.shape
    for i, ch in enumerate(text):
        pixels = np.repeat(np.repeat(_GLYPHS[ch], scale, axis=0), scale, axis=1)
        x0 = x + i * ADVANCE * scale
        ys, xs = np.nonzero(pixels)
        keep = (y + ys >= 0) & (y + ys < h) & (x0 + xs >= 0) & (x0 + xs < w)
        image[y + ys[keep], x0 + xs[keep]] = colour


def draw_line(image: np.ndarray, p0, p1, colour, thickness: int = 2) -> None:
    """A straight segment from p0 to p1 (x, y pixel coordinates): every pixel
    (round(x) + i, round(y) + j), 0 <= i, j < thickness, of points along it."""
    (x0, y0), (x1, y1) = p0, p1
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.round(np.linspace(x0, x1, n)).astype(int)
    ys = np.round(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = image.shape
    for dx in range(thickness):
        for dy in range(thickness):
            image[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = colour


def nice_ticks(lo: float, hi: float, most: int = 6, whole: bool = False) -> np.ndarray:
    """Tick values covering [lo, hi]: multiples of the smallest step of 1, 2 or
    5 x 10^k (at least 1 if ``whole``) that needs at most ``most`` intervals,
    from the last multiple at or below ``lo`` to the first at or above ``hi``.
    An empty range is widened by 1 on either side first."""
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        lo, hi = lo - 1.0, hi + 1.0
    exponent = math.floor(math.log10((hi - lo) / most))
    if whole:
        exponent = max(exponent, 0)
    while True:
        for m in (1, 2, 5):
            step = m * 10.0**exponent
            first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            if last - first <= most:
                return np.arange(first, last + 1) * step
        exponent += 1


def tick_label(value: float, ticks: np.ndarray) -> str:
    """``value`` with as many decimals as the spacing of ``ticks`` needs."""
    step = float(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class Axes:
    """A plot area of ``width`` x ``height`` pixels with its top-left corner at
    (left, top), showing x in [x_lo, x_hi] left to right and y in [y_lo, y_hi]
    bottom to top."""

    left: int
    top: int
    width: int
    height: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def px(self, x: float, y: float) -> tuple[float, float]:
        """The pixel (x, y) of a data point."""
        return (self.left + (x - self.x_lo) / max(self.x_hi - self.x_lo, 1e-12) * self.width,
                self.top + (self.y_hi - y) / max(self.y_hi - self.y_lo, 1e-12) * self.height)


GRID, INK = (225, 225, 225), (0, 0, 0)


def draw_axes(image: np.ndarray, axes: Axes, x_ticks, y_ticks, x_labels: bool = True) -> None:
    """Light grid lines at the ticks, the left and bottom axis lines, y labels
    right-aligned left of the area and, if ``x_labels``, x labels centred below it."""
    bottom = axes.top + axes.height
    for y in y_ticks:
        _, py = axes.px(axes.x_lo, y)
        draw_line(image, (axes.left, py), (axes.left + axes.width, py), GRID, 1)
        label = tick_label(y, y_ticks)
        # Centred on the grid line: half a glyph's height (7 rows at scale 2) above it.
        draw_text(image, axes.left - 8 - text_width(label), round(py) - GLYPH_H, label)
    for x in x_ticks:
        px, _ = axes.px(x, axes.y_lo)
        draw_line(image, (px, axes.top), (px, bottom), GRID, 1)
        if x_labels:
            label = tick_label(x, x_ticks)
            draw_text(image, round(px) - text_width(label) // 2, bottom + 8, label)
    draw_line(image, (axes.left, axes.top), (axes.left, bottom), INK, 1)
    draw_line(image, (axes.left, bottom), (axes.left + axes.width, bottom), INK, 1)


def draw_series(image: np.ndarray, axes: Axes, xs, ys, colour, held: bool = False) -> None:
    """Points joined by straight lines or, if ``held``, by steps (the value
    holds until the next point, as ranks between growth events)."""
    points = [axes.px(x, y) for x, y in zip(xs, ys)]
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        if held:
            draw_line(image, (xa, ya), (xb, ya), colour)
            draw_line(image, (xb, ya), (xb, yb), colour)
        else:
            draw_line(image, (xa, ya), (xb, yb), colour)
    if len(points) == 1:
        draw_line(image, points[0], points[0], colour)


def draw_markers(image: np.ndarray, axes: Axes, xs, ys, colour, size: int = 7) -> None:
    """A filled square of ``size`` pixels centred on each point."""
    h, w, _ = image.shape
    for x, y in zip(xs, ys):
        cx, cy = (round(v) for v in axes.px(x, y))
        half = size // 2
        image[max(cy - half, 0) : min(cy + half + 1, h), max(cx - half, 0) : min(cx + half + 1, w)] = colour


def draw_legend(image: np.ndarray, x: int, y: int, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    """Entries (label, colour) left to right from (x, y): a short line in the colour, then the label."""
    for label, colour in entries:
        draw_line(image, (x, y + GLYPH_H - 1), (x + 20, y + GLYPH_H - 1), colour, 3)
        draw_text(image, x + 28, y, label)
        x += 28 + text_width(label) + 24


def line_chart_png(
    path: str | Path,
    series: list[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]],
    x_max: float,
    y_min: float,
    y_max: float,
    y_step: float = 1.0,
    size: tuple[int, int] = (480, 240),
) -> None:
    """Lines (xs, ys, rgb) on a white canvas: x from 0 to x_max, y from y_min
    to y_max, a light grid line and a label every y_step, x labelled at 0 and
    x_max. Steps between points are drawn as steps (the value holds until the
    next point, and the last until x_max), as ranks change at growth events."""
    width, height = size
    left, right, top, bottom = 56, 24, 12, 32
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    axes = Axes(left, top, width - left - right, height - top - bottom, 0.0, x_max, y_min, y_max)
    y_ticks = np.arange(y_min, y_max + 1e-9, y_step)
    draw_axes(image, axes, np.array([0.0, x_max]), y_ticks)
    for xs, ys, colour in series:
        draw_series(image, axes, [*xs, x_max], [*ys, ys[-1]], colour, held=True)
    write_png(path, image)


# The training plot's colours and geometry (pixels), as its docstring states them.
TRAIN_LOSS, VALID_LOSS, MEAN_RANK = (31, 119, 180), (255, 127, 14), (44, 160, 44)
TRAINING_SIZE = (800, 600)
PLOT_LEFT, PLOT_RIGHT = 96, 776
LOSS_TOP, LOSS_BOTTOM = 40, 340
RANK_TOP, RANK_BOTTOM = 396, 536


def training_png(path: str | Path, train, valid, rank) -> None:
    """The curves of a training run, each (steps, values), as an 800 x 600 PNG
    of two panels sharing the step axis, both spanning pixel columns 96 to 776.
    Top, rows 40 to 340: the training loss (blue, 31 119 180) and the
    validation loss (orange, 255 127 14, a square on each evaluation). Bottom,
    rows 396 to 536: the mean rank (green, 44 160 44), held between records.
    Step s sits at column 96 + 680 s / x_hi and value v at row
    top + (y_hi - v) / (y_hi - y_lo) * (bottom - top). The ranges are the outer
    ticks of ``nice_ticks``: x over [0, last step] (whole steps, at most 8
    intervals), y over the panel's values (at most 6 intervals for the loss,
    both curves together, and 4 for the rank)."""
    width, height = TRAINING_SIZE
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    last_step = max(float(steps[-1]) for steps, _ in (train, valid, rank) if len(steps))
    x_ticks = nice_ticks(0.0, last_step, most=8, whole=True)
    losses = np.concatenate([train[1], valid[1]])
    loss_ticks = nice_ticks(losses.min(), losses.max())
    rank_ticks = nice_ticks(rank[1].min(), rank[1].max(), most=4)  # a shorter panel: fewer labels

    def axes(top: int, bottom: int, y_ticks: np.ndarray) -> Axes:
        return Axes(PLOT_LEFT, top, PLOT_RIGHT - PLOT_LEFT, bottom - top, x_ticks[0], x_ticks[-1], y_ticks[0],
                    y_ticks[-1])

    loss_axes, rank_axes = axes(LOSS_TOP, LOSS_BOTTOM, loss_ticks), axes(RANK_TOP, RANK_BOTTOM, rank_ticks)
    draw_axes(image, loss_axes, x_ticks, loss_ticks, x_labels=False)  # the rank panel below labels the steps
    draw_axes(image, rank_axes, x_ticks, rank_ticks)
    draw_series(image, loss_axes, *train, TRAIN_LOSS)
    draw_series(image, loss_axes, *valid, VALID_LOSS)
    draw_markers(image, loss_axes, *valid, VALID_LOSS)
    draw_series(image, rank_axes, *rank, MEAN_RANK, held=True)
    loss_legend = [("train loss", TRAIN_LOSS)] + ([("valid loss", VALID_LOSS)] if len(valid[0]) else [])
    draw_legend(image, PLOT_LEFT, LOSS_TOP - 28, loss_legend)
    draw_legend(image, PLOT_LEFT, RANK_TOP - 28, [("mean rank", MEAN_RANK)])
    draw_text(image, (PLOT_LEFT + PLOT_RIGHT - text_width("step")) // 2, RANK_BOTTOM + 34, "step")
    write_png(path, image)
