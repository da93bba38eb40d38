"""Faults a long run meets: a full disk, a read-only folder, undecodable data, two runs on one
folder, and after each, the newest complete checkpoint resumes to the straight run's adapter."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

from drlora_mlx.training import checkpoint

from .helpers import assert_same_adapter, train_command, train_records, wait_for

ROOT = os.geteuid() == 0


def _one_line_error(run, code, *needles):
    """The run ended with ``code`` and exactly one line on stderr that holds every needle."""
    assert run.returncode == code, run.stderr[-3000:]
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _resume(out, env=None):
    return subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--resume", "--adapter-path", str(out)],
                          capture_output=True, text=True, env=env)


def _first_part(path, out):
    """Iterations 1-24 (a NaN stops the run at 25): checkpoints 10 and 20."""
    run = subprocess.run(train_command(path, out, "--save-every", "10"), capture_output=True, text=True,
                         env=dict(os.environ, DRLORA_MLX_FAULT_NAN_AT="25"))
    assert run.returncode == 3, run.stderr[-2000:]
    assert [p.name for p in checkpoint.complete(out)] == ["step-0000010", "step-0000020"]


@contextlib.contextmanager
def _small_disk(tmp_path, megabytes):
    """A folder on a file system of ``megabytes`` (a tmpfs; needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _folder_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(reference_run, tmp_path):
    path, reference = reference_run
    with contextlib.ExitStack() as stack:
        if ROOT:  # a real full disk: a small tmpfs, nearly filled
            disk = stack.enter_context(_small_disk(tmp_path, 64))
            out = disk / "adapters"
            _first_part(path, out)
            step = _folder_bytes(checkpoint.checkpoint_dir(out) / "step-0000020")
            adapter = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
            filler = disk / "filler"
            free = shutil.disk_usage(disk).free
            # Room for the adapter files (written beside the old ones first), not for a checkpoint.
            assert adapter < step
            filler.write_bytes(b"\0" * (free - (adapter + step) // 2))
            env, needle = None, "no space left on the device"
        else:  # a size-limited folder: files may not grow past a limit the checkpoint needs
            out = tmp_path / "adapters"
            _first_part(path, out)
            state = (checkpoint.checkpoint_dir(out) / "step-0000020" / checkpoint.STATE).stat().st_size
            limit = state // 2
            assert all(f.stat().st_size < limit for f in out.glob("*.safetensors"))  # the adapter still fits
            env, needle = dict(os.environ, DRLORA_MLX_FILE_LIMIT=str(limit)), "file-size limit"
        full = subprocess.run(
            [sys.executable, "-c", _LIMITED, "train", "--resume", "--adapter-path", str(out)],
            capture_output=True, text=True, env=env,
        )
        line = _one_line_error(full, 5, "drlora-mlx: error: cannot write checkpoint step-0000030 to", needle,
                               "MB", "step-0000020, is intact")
        assert "needs about" in line
        root = checkpoint.checkpoint_dir(out)
        assert [p.name for p in checkpoint.complete(out)] == ["step-0000010", "step-0000020"]
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # the half-written one is gone
        if ROOT:
            filler.unlink()
        resumed = _resume(out)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "step-0000020 at iteration 20" in resumed.stdout
        assert_same_adapter(reference, out)


# Runs the command line under a file-size limit when DRLORA_MLX_FILE_LIMIT is set (SIGXFSZ ignored, so
# a write past the limit fails with EFBIG instead of killing the process).
_LIMITED = (
    "import os, resource, signal, sys\n"
    "limit = os.environ.get('DRLORA_MLX_FILE_LIMIT')\n"
    "if limit:\n"
    "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))\n"
    "from drlora_mlx.cli import main\n"
    "sys.argv[0] = 'drlora-mlx'\n"
    "main()\n"
)


def test_a_read_only_adapter_folder_ends_the_run_in_one_line(reference_run, tmp_path):
    path, reference = reference_run
    with contextlib.ExitStack() as stack:
        if ROOT:
            disk = stack.enter_context(_small_disk(tmp_path, 256))
            out = disk / "adapters"
            _first_part(path, out)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            needle = "read-only"
        else:
            out = tmp_path / "adapters"
            _first_part(path, out)
            for p in [out, *out.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            needle = "permission denied"
        stopped = _resume(out)
        _one_line_error(stopped, 5, "drlora-mlx: error: cannot write", needle)
        if ROOT:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        else:
            for p in [out, *out.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        assert [p.name for p in checkpoint.complete(out)] == ["step-0000010", "step-0000020"]
        resumed = _resume(out)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert_same_adapter(reference, out)


def test_data_that_is_not_utf8_is_one_line_with_file_and_line(tiny_models, tmp_path):
    from .helpers import SHAPE

    data = tmp_path / "data"
    data.mkdir()
    good = json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n"
    (data / "train.jsonl").write_bytes(good * 2 + b'{"prompt": "caf\xe9", "completion": "b"}\n' + good)
    run = subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--model", str(tiny_models("qwen3_moe", SHAPE)),
                          "--data", str(data), "--adapter-path", str(tmp_path / "a")], capture_output=True, text=True)
    _one_line_error(run, 2, f"{data / 'train.jsonl'}, line 3: not UTF-8 text (byte 0xe9 at column 16)")


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_ones_lock_is_stale(reference_run, tmp_path):
    path, reference = reference_run
    out = tmp_path / "adapters"
    slow = dict(os.environ, DRLORA_MLX_FAULT_SLOW_SAVE="4")  # every checkpoint takes 4 s: the run outlasts the checks
    first = subprocess.Popen(train_command(path, out, "--save-every", "10"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=slow)
    try:
        wait_for(lambda: any(r["step"] >= 12 for r in train_records(out)))
        second = subprocess.run(train_command(path, out, "--save-every", "10"), capture_output=True, text=True)
        _one_line_error(second, 2, f"{out} is in use by another drlora-mlx run (process {first.pid})")
        resume_too = _resume(out)
        _one_line_error(resume_too, 2, "is in use by another drlora-mlx run")
        wait_for(lambda: any(r["step"] >= 22 for r in train_records(out)))
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.wait()
    assert (out / ".drlora-mlx.lock").exists()
    done = checkpoint.complete(out)
    assert done and done[-1].name in ("step-0000020", "step-0000030")
    resumed = _resume(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_adapter(reference, out)


def test_an_incomplete_download_says_what_to_do(tiny_models, tmp_path):
    """A model folder whose weights were not all downloaded (a killed download) is refused in one line."""
    from .helpers import SHAPE

    model = tmp_path / "model"
    shutil.copytree(tiny_models("qwen3_moe", SHAPE), model)
    weights = model / "model.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    weights.rename(model / "model-00001-of-00002.safetensors")
    run = subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--model", str(model), "--adapter-path",
                          str(tmp_path / "a")], capture_output=True, text=True)
    _one_line_error(run, 2, "lacks model-00002-of-00002.safetensors", "if a download was interrupted, download it again")


def test_data_that_changed_since_the_checkpoint_is_refused_on_resume(tiny_models, tmp_path):
    from drlora_mlx.data.loading import bundled_data_dir

    from .helpers import SHAPE

    data = tmp_path / "data"
    shutil.copytree(bundled_data_dir(), data)
    out = tmp_path / "adapters"
    cli = train_command(tiny_models("qwen3_moe", SHAPE), out, "--save-every", "10", "--data", str(data))
    stopped = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ, DRLORA_MLX_FAULT_NAN_AT="15"))
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    lines = (data / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["completion"] += " (edited)"
    (data / "train.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    refused = _resume(out)
    _one_line_error(refused, 2, f"the training data in {data} is not the data the checkpoint",
                    "resume with the same data")
