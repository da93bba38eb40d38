"""Data-parallel DR-LoRA over mx.distributed's ring backend on localhost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from drlora_mlx.formats.adapters import load as drlora_load
from drlora_mlx.formats.adapters import read_ranks
from drlora_mlx.training import checkpoint

from .helpers import SHAPE, assert_same_arrays

LAUNCH = [os.path.join(os.path.dirname(sys.executable), "mlx.launch"), "--backend", "ring", "-n", "2",
          "--python", sys.executable]
TRAIN = ["-m", "drlora_mlx", "train", "--iters", "36", "--batch-size", "4", "--learning-rate", "5e-3",
         "--grad-accumulation-steps", "2", "--r-init", "2", "--r-target", "4", "--r-max", "8",
         "--steps-per-report", "1", "--steps-per-eval", "1000", "--mask-prompt"]


def _run(cmd, env=None, timeout=600):
    """Run mlx.launch (or one process) in its own process group, so that a
    hung run is killed with every process it started."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _losses(adapter_path):
    rows = [json.loads(l) for l in (adapter_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _state(adapter_path):
    return {k: np.asarray(v) for k, v in mx.load(str(adapter_path / "drlora_state.safetensors")).items()}


def _adapter(adapter_path):
    return {k: np.asarray(v) for k, v in mx.load(str(adapter_path / "adapters.safetensors")).items()}


def _assert_same_function(a, b, tolerance=1e-4):
    """Two adapters of one model give the same logits, up to ``tolerance`` of the adapter's own effect."""
    model = json.loads((a / "drlora_config.json").read_text())["model"]
    tokens = mx.array(np.random.default_rng(0).integers(3, 384, (4, 32)).astype(np.int32))
    base = np.asarray(drlora_load(model)[0](tokens))
    la, lb = (np.asarray(drlora_load(model, path)[0](tokens)) for path in (a, b))
    effect = np.abs(la - base).max()
    assert effect > 1.0 and np.abs(la - lb).max() < tolerance * effect


@pytest.fixture(scope="module")
def one_and_two(tiny_models, tmp_path_factory):
    """The same run in one process and in two (same data, same global batch)."""
    model = str(tiny_models("qwen3_moe", shape=SHAPE))
    root = tmp_path_factory.mktemp("dp")
    single = _run([sys.executable, *TRAIN, "--model", model, "--adapter-path", str(root / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    double = _run([*LAUNCH, *TRAIN, "--model", model, "--adapter-path", str(root / "two"), "--save-every", "21",
                   "--keep-checkpoints", "3"])
    assert double.returncode == 0, (double.stdout[-2000:], double.stderr[-2000:])
    return model, root, double


def test_two_processes_follow_the_one_process_run(one_and_two):
    _, root, double = one_and_two
    assert "data-parallel over 2 processes" in double.stdout
    assert double.stdout.count("drlora on qwen3_moe") == 1  # only process 0 prints
    one, two = _losses(root / "one"), _losses(root / "two")
    assert len(one) == len(two) == 36
    assert np.allclose(one, two, rtol=1e-4, atol=1e-5)
    masks_one = {k: v for k, v in _state(root / "one").items() if k.endswith("rank_mask")}
    masks_two = {k: v for k, v in _state(root / "two").items() if k.endswith("rank_mask")}
    assert masks_one.keys() == masks_two.keys()
    for k in masks_one:
        assert np.array_equal(masks_one[k], masks_two[k]), k
    ranks = np.concatenate([m.sum(-1) for m in masks_one.values()])
    assert ranks.min() == 2 and ranks.max() > 4  # growth happened
    # Summation order differs between one and two processes. AdamW's per-element normalisation
    # turns rounding-level gradients (the A of a rank whose B is still near zero) into full
    # learning-rate steps, so single factor entries can differ by ~1e-3; the adapted model
    # does not: its logits agree to a small fraction of what the adapter changes (measured:
    # below 1e-4 on one machine, 1.07e-4 on an AMD EPYC with OpenBLAS's Haswell kernels).
    _assert_same_function(root / "one", root / "two", tolerance=5e-4)


def test_every_process_ends_identical(tiny_models, tmp_path):
    model = str(tiny_models("qwen3_moe", shape=SHAPE))
    worker = str(Path(__file__).with_name("distributed_worker.py"))
    run = _run([*LAUNCH, worker, model, str(tmp_path)], env={"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    r0 = mx.load(str(tmp_path / "rank0.safetensors"))
    r1 = mx.load(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and r0["events"].item() > 3
    for k in r0:
        assert mx.array_equal(r0[k], r1[k]), k


def test_a_diverged_mask_is_caught_at_the_next_growth_event(tiny_models, tmp_path):
    model = str(tiny_models("qwen3_moe", shape=SHAPE))
    run = _run([*LAUNCH, *TRAIN, "--model", model, "--adapter-path", str(tmp_path / "a")],
               env={"DRLORA_MLX_FAULT_DIVERGE_RANK": "1"})
    # mlx.launch itself exits 0; it reports each process's exit code (and may
    # stop the other process once one has exited).
    assert "exited with code 4" in run.stderr and "exited with code 0" not in run.stderr
    assert "processes disagree on the rank masks after the growth event at optimizer step" in run.stderr
    assert "Traceback" not in run.stderr


def test_two_process_checkpoint_resumes_in_one_process(one_and_two, tmp_path):
    model, root, _ = one_and_two
    saved = [p.name for p in checkpoint.complete(root / "two")]
    assert "step-0000021" in saved  # mid accumulation cycle
    resumed = tmp_path / "resumed"
    run = _run([sys.executable, *TRAIN, "--model", model, "--adapter-path", str(resumed),
                "--resume-from", str(checkpoint.checkpoint_dir(root / "two") / "step-0000021")])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "at iteration 21 of 36" in run.stdout
    want, got = _state(root / "two"), _state(resumed)
    for k in want:
        if k.endswith("rank_mask"):
            assert np.array_equal(want[k], got[k]), k
    _assert_same_function(root / "two", resumed)
    assert np.allclose(_losses(root / "two")[21:], _losses(resumed), rtol=1e-4, atol=1e-5)


def test_a_killed_process_stops_the_others_in_one_line_and_the_run_resumes(one_and_two, tmp_path):
    model, root, _ = one_and_two
    out = tmp_path / "dp"
    start = time.monotonic()
    run = _run([*LAUNCH, *TRAIN, "--model", model, "--adapter-path", str(out), "--save-every", "10"],
               env={"DRLORA_MLX_FAULT_KILL_AT": "25", "DRLORA_MLX_FAULT_KILL_RANK": "1"}, timeout=300)
    assert time.monotonic() - start < 240  # bounded: nobody waits for the dead process
    ours = [line for line in run.stderr.splitlines() if line.startswith("drlora-mlx: ")]
    assert len(ours) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert ours[0].startswith("drlora-mlx: error: data-parallel process 1 is gone"), ours[0]
    assert "step-0000020, is intact" in ours[0] and "exited with code 6" in run.stderr
    assert [p.name for p in checkpoint.complete(out)][-1] == "step-0000020"
    resumed = _run([*LAUNCH, "-m", "drlora_mlx", "train", "--resume", "--adapter-path", str(out)])
    assert resumed.returncode == 0 and "exited with code" not in resumed.stderr, resumed.stderr[-2000:]
    assert "at iteration 20 of 36" in resumed.stdout
    want, got = _adapter(root / "two"), _adapter(out)  # the uninterrupted two-process run, bit for bit
    assert_same_arrays(want, got)


def _one_and_two_processes_alike(train, model, tmp_path, iterations):
    """``train`` in one process (into tmp_path/one) and in two (tmp_path/two): both finish and log the
    same loss at every iteration."""
    single = _run([sys.executable, *train, "--model", model, "--adapter-path", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    double = _run([*LAUNCH, *train, "--model", model, "--adapter-path", str(tmp_path / "two")])
    assert double.returncode == 0, (double.stdout[-2000:], double.stderr[-2000:])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == iterations and np.allclose(one, two, rtol=1e-4, atol=1e-5)


def test_without_accumulation_two_processes_follow_one(tiny_models, tmp_path):
    """Each batch a whole optimizer step: the loss is scaled by the global token count before the
    backward pass, in one process and across two alike."""
    model = str(tiny_models("qwen3_moe", shape=SHAPE))
    train = list(TRAIN)
    train[train.index("--grad-accumulation-steps") + 1] = "1"
    train[train.index("--iters") + 1] = "16"
    _one_and_two_processes_alike(train, model, tmp_path, iterations=16)
    masks = [{k: v for k, v in _state(tmp_path / run).items() if k.endswith("rank_mask")} for run in ("one", "two")]
    assert_same_arrays(masks[0], masks[1])
    assert np.concatenate([m.sum(-1) for m in masks[0].values()]).max() > 4  # growth happened
    _assert_same_function(tmp_path / "one", tmp_path / "two")


def test_a_routed_run_chooses_the_same_experts_in_two_processes(tiny_models, tmp_path):
    """--method routed profiles routing over the global batch: two processes choose the experts one does."""
    model = str(tiny_models("qwen3_moe", shape=SHAPE))
    train = [*TRAIN, "--method", "routed", "--r-max", "16", "--warmup-ratio", "0.25"]
    train[train.index("--iters") + 1] = "16"
    _one_and_two_processes_alike(train, model, tmp_path, iterations=16)
    ranks = [read_ranks(tmp_path / run) for run in ("one", "two")]
    assert ranks[0]["layers"] == ranks[1]["layers"] and ranks[0]["chosen"] == ranks[1]["chosen"]
    assert all(len(chosen) == 2 for chosen in ranks[0]["chosen"])  # a quarter of 8 experts
    _assert_same_function(tmp_path / "one", tmp_path / "two")
