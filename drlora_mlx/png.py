"""Heatmaps and line charts as PNG images, written with numpy and the standard library alone."""

from __future__ import annotations

import struct
import zlib
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


# 3 x 5 pixel digits for axis labels, row by row.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010",
}


def draw_text(image: np.ndarray, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 2) -> None:
    """Digits (and '.') with their top-left corner at (x, y)."""
    for i, ch in enumerate(text):
        glyph = np.array([int(b) for b in _GLYPHS[ch]], dtype=bool).reshape(5, 3)
        pixels = np.repeat(np.repeat(glyph, scale, axis=0), scale, axis=1)
        x0 = x + i * 4 * scale
        region = image[y : y + pixels.shape[0], x0 : x0 + pixels.shape[1]]
        region[pixels[: region.shape[0], : region.shape[1]]] = colour


def draw_line(image: np.ndarray, p0, p1, colour, thickness: int = 2) -> None:
    """A straight segment from p0 to p1 (x, y pixel coordinates)."""
    (x0, y0), (x1, y1) = p0, p1
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.round(np.linspace(x0, x1, n)).astype(int)
    ys = np.round(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = image.shape
    for dx in range(thickness):
        for dy in range(thickness):
            image[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = colour


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
    next point), as ranks change at growth events."""
    width, height = size
    left, right, top, bottom = 40, 16, 12, 28
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x, y):
        return (left + x / max(x_max, 1e-12) * plot_w, top + (y_max - y) / max(y_max - y_min, 1e-12) * plot_h)

    y = y_min
    while y <= y_max + 1e-9:
        draw_line(image, px(0, y), px(x_max, y), (225, 225, 225), 1)
        label = f"{y:g}"
        draw_text(image, left - 6 - 8 * len(label), int(px(0, y)[1]) - 5, label)
        y += y_step
    draw_line(image, px(0, y_min), px(0, y_max), (0, 0, 0), 1)
    draw_line(image, px(0, y_min), px(x_max, y_min), (0, 0, 0), 1)
    draw_text(image, left, height - bottom + 8, "0")
    draw_text(image, int(px(x_max, y_min)[0]) - 8 * len(f"{x_max:g}"), height - bottom + 8, f"{x_max:g}")
    for xs, ys, colour in series:
        points = [px(x, v) for x, v in zip(xs, ys)] + [px(x_max, ys[-1])]
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            draw_line(image, (xa, ya), (xb, ya), colour)
            draw_line(image, (xb, ya), (xb, yb), colour)
    write_png(path, image)
