"""Writing files so that a reader never sees half of one.

Every file drlora-mlx writes goes to a temporary name beside its target and is
renamed over it once complete (a rename within one folder is atomic), so a
run killed mid-write leaves the previous version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _temporary(path: Path) -> Path:
    # Keeps the suffix: mx.save_safetensors appends ".safetensors" to names without it.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON with sorted keys (stable files, readable diffs)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_safetensors(path: str | os.PathLike, arrays: dict, metadata: dict | None = None) -> None:
    """MLX arrays as a safetensors file."""
    import mlx.core as mx

    path = Path(path)
    tmp = _temporary(path)
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (where the file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
