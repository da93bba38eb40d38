"""Rank heatmaps as PNG images, written with the standard library alone."""

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


def rank_heatmap_png(path: str | Path, panels: list[np.ndarray], r_min: int, r_max: int, cell: int = 12) -> None:
    """One panel (layers x experts) per projection, side by side, white gaps
    between them; colour runs from r_min (dark) to r_max (yellow)."""
    gap = cell
    rows = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) * cell + gap * (len(panels) + 1)
    image = np.full((rows * cell + 2 * gap, width, 3), 255, dtype=np.uint8)
    x = gap
    span = max(r_max - r_min, 1)
    for panel in panels:
        colours = colormap((np.asarray(panel) - r_min) / span)
        block = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
        image[gap : gap + block.shape[0], x : x + block.shape[1]] = block
        x += block.shape[1] + gap
    write_png(path, image)
