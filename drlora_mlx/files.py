"""Writing files so that a reader never sees half of one, and saying so when the disk refuses.

Every file drlora-mlx writes goes to a temporary name beside its target and is
renamed over it once complete (a rename within one folder is atomic), so a
run killed mid-write leaves the previous version. Files that belong together
(the adapter's weights, state and records) are all written first and renamed
together (``FileSet``). A write that fails (a full disk, a read-only or vanished
folder, a file-size limit) removes its temporary files and raises
``StorageError``: one line naming the folder, what it needed and what is free.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import RunStopped


class StorageError(RunStopped):
    """A file could not be written; the message names the folder and the space it needed."""

    exit_code = 5


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _reason(error: BaseException, folder: Path, needed: int) -> str:
    code = getattr(error, "errno", None)
    free = _free_bytes(folder)
    space = f"needs about {needed / 2**20:,.1f} MB" + (f", {free / 2**20:,.1f} MB free" if free is not None else "")
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < needed + 2**20):
        return f"no space left on the device ({space}); free some space or write to another folder"
    if code == errno.EFBIG:
        return f"a file-size limit was reached ({space}); raise the limit or write to another folder"
    if code == errno.EROFS:
        return "the file system is read-only; write to a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied; write to a folder you can write to"
    if code == errno.ENOENT:
        return "the folder (or a folder above it) disappeared during the run"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{first} ({space})"


@contextmanager
def storage(what: str, folder: str | os.PathLike, needed: int = 0, cleanup=()):
    """Turn a failed write of ``what`` into ``folder`` into ``StorageError``,
    removing ``cleanup`` (temporary files or folders) first."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # mx.save_safetensors raises RuntimeError("[write] ...")
        if isinstance(e, RuntimeError) and "write" not in str(e).lower() and "open" not in str(e).lower():
            raise
        for path in cleanup:
            path = Path(path)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise StorageError(f"cannot write {what} to {folder}: {_reason(e, Path(folder), needed)}") from None


def _temporary(path: Path) -> Path:
    # Keeps the suffix: mx.save_safetensors appends ".safetensors" to names without it.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _sync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _encode_json(obj) -> bytes:
    """``obj`` as indented JSON with sorted keys (stable files, readable diffs)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class FileSet:
    """Files written to temporary names, then renamed into place together (``publish``)."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder)
        self.what = what
        self.pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def _add(self, path: str | os.PathLike, write, size: int) -> None:
        path = Path(path)
        tmp = _temporary(path)
        self.pending.append((tmp, path))
        with storage(self.what, self.folder, size, [t for t, _ in self.pending]):
            write(tmp)
            _sync(tmp)

    def bytes(self, path, data: bytes) -> None:
        self._add(path, lambda tmp: tmp.write_bytes(data), len(data))

    def json(self, path, obj) -> None:
        self.bytes(path, _encode_json(obj))

    def safetensors(self, path, arrays: dict, metadata: dict | None = None) -> None:
        import mlx.core as mx

        size = sum(v.nbytes for v in arrays.values())
        self._add(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=metadata), size)

    def publish(self) -> None:
        with storage(self.what, self.folder, 0, [t for t, _ in self.pending]):
            for tmp, path in self.pending:
                os.replace(tmp, path)
        self.pending = []


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    files = FileSet(Path(path).parent, Path(path).name)
    files.bytes(path, data)
    files.publish()


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON with sorted keys, written atomically."""
    write_bytes(path, _encode_json(obj))


def write_safetensors(path: str | os.PathLike, arrays: dict, metadata: dict | None = None) -> None:
    """MLX arrays as a safetensors file, written atomically."""
    files = FileSet(Path(path).parent, Path(path).name)
    files.safetensors(path, arrays, metadata)
    files.publish()


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
