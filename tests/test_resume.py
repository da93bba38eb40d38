"""Exact resume, interruption, a kill during a checkpoint write, non-finite losses."""

import json
import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_lm_load

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
from drlora_mlx.data.loading import bundled_data_dir, load_datasets
from drlora_mlx.formats.adapters import mlx_lm_adapter
from drlora_mlx.lora.attach import attach
from drlora_mlx.training import checkpoint
from drlora_mlx.training.trainer import Trainer

from .helpers import (
    SHAPE,
    adapter_weights,
    assert_same_adapter,
    assert_same_arrays,
    run_cli,
    train_command,
    train_records,
    wait_for,
)

CONFIG = dict(r_init=2, r_target=4, r_max=8)
ARGS = dict(iters=48, batch_size=4, learning_rate=5e-3, grad_accumulation_steps=2, steps_per_report=1000,
            steps_per_eval=1000, mask_prompt=True, weight_decay=0.01)


def _fresh_trainer(model_path, tokenizer_data=None, **overrides):
    model, tokenizer = mlx_lm_load(str(model_path))
    drlora = attach(model, DRLoRAConfig(**CONFIG), seed=0)
    train, _, _ = load_datasets(bundled_data_dir(), tokenizer, mask_prompt=True)
    return Trainer(model, drlora, TrainingArgs(**{**ARGS, **overrides})), train


def _final_state(trainer):
    arrays, _ = trainer.checkpoint_state()
    return {k: np.asarray(v) for k, v in arrays.items() if k.startswith(("param.", "state.", "optimizer."))}


def test_resume_is_bitwise_exact(tiny_models, tmp_path):
    path = tiny_models("qwen3_moe", shape=SHAPE)
    straight, train = _fresh_trainer(path)
    full = straight.run(train)
    assert len(full.events) > 4

    first, train = _fresh_trainer(path, save_every=1)
    first.run(train, on_save=lambda it: setattr(first, "stop_requested", it >= 21))  # stops mid-cycle
    assert first.iteration == 21 and first.accum is not None
    arrays, meta = first.checkpoint_state()
    saved = checkpoint.save(tmp_path, first.iteration, arrays, meta)

    second, train = _fresh_trainer(path)
    second.restore(*checkpoint.read(saved))
    rest = second.run(train)

    events_before = [e.step for e in full.events if e.step <= 10]
    events_after = [e.step for e in rest.events]
    assert events_before and events_after  # growth on both sides of the cut
    assert [e.step for e in full.events if e.step > 10] == events_after
    assert rest.iteration_losses == full.iteration_losses[21:]  # the loss of every later batch, bitwise
    assert len(rest.iteration_losses) == 27
    want, got = _final_state(straight), _final_state(second)
    assert_same_arrays(want, got)


def test_sigint_writes_a_checkpoint_and_resume_finishes_identically(reference_run, tmp_path):
    path, reference = reference_run
    out = tmp_path / "adapters"
    proc = subprocess.Popen(train_command(path, out, "--save-every", "1000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(r["step"] >= 22 for r in train_records(out)))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT at iteration" in err and "drlora-mlx train --resume --adapter-path" in err
    assert "Traceback" not in err
    stopped = checkpoint.complete(out)
    assert len(stopped) == 1 and 22 <= int(stopped[0].name.split("-")[1]) < 60
    resumed = subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--resume", "--adapter-path", str(out)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert_same_adapter(reference, out)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(reference_run, tmp_path):
    path, reference = reference_run
    out = tmp_path / "adapters"
    env = dict(os.environ, DRLORA_MLX_FAULT_SLOW_SAVE="3")
    proc = subprocess.Popen(train_command(path, out, "--save-every", "10"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    root = checkpoint.checkpoint_dir(out)
    wait_for(lambda: root.is_dir() and any(p.name.startswith(".tmp-step-0000020") for p in root.iterdir()))
    proc.kill()
    proc.wait()
    assert [p.name for p in checkpoint.complete(out)] == ["step-0000010"]
    assert checkpoint.read(root / "step-0000010")[1]["iteration"] == 10
    resumed = subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--resume", "--adapter-path", str(out)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-0000010 at iteration 10" in resumed.stdout
    assert_same_adapter(reference, out)
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def test_nonfinite_loss_stops_with_exit_3_and_keeps_the_last_checkpoint(tiny_models, tmp_path):
    path = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path / "adapters"
    env = dict(os.environ, DRLORA_MLX_FAULT_NAN_AT="25")
    run = subprocess.run(train_command(path, out, "--save-every", "10"), env=env, capture_output=True, text=True)
    assert run.returncode == 3
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("drlora-mlx: error: non-finite loss or gradient at iteration 25 (optimizer step 13")
    assert "Traceback" not in run.stderr
    assert [p.name for p in checkpoint.complete(out)] == ["step-0000010", "step-0000020"]
    arrays, meta = checkpoint.read(checkpoint.checkpoint_dir(out) / "step-0000020")
    assert meta["iteration"] == 20
    assert all(np.isfinite(np.asarray(v)).all() for v in arrays.values() if v.dtype == mx.float32)
    # The adapter beside the checkpoints is the one of iteration 20: what the checkpoint restores to.
    model, _ = mlx_lm_load(str(path))
    drlora = attach(model, DRLoRAConfig(**CONFIG), seed=0)
    Trainer(model, drlora, TrainingArgs(**{**ARGS, "iters": 60, "weight_decay": 0.0})).restore(arrays, meta)
    saved = mx.load(str(out / "adapters.safetensors"))
    restored = mlx_lm_adapter(drlora)[1]
    assert saved.keys() == restored.keys()
    for k, v in saved.items():
        assert np.array_equal(np.asarray(v), np.asarray(restored[k])), k


def test_skip_nonfinite_skips_the_bad_batch_and_goes_on(tiny_models, tmp_path):
    path = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path / "adapters"
    env = dict(os.environ, DRLORA_MLX_FAULT_NAN_AT="25")
    run = subprocess.run(train_command(path, out, "--skip-nonfinite", "1"), env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "iter 25: non-finite loss or gradient, batch skipped (1 of --skip-nonfinite 1)" in run.stdout
    assert all(np.isfinite(v).all() for v in adapter_weights(out).values())


def test_resume_refuses_other_settings_and_fresh_runs_refuse_unfinished_ones(tiny_models, tmp_path, capsys):
    path = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path / "adapters"
    base = ["train", "--model", str(path), "--adapter-path", str(out), "--batch-size", "4", "--r-init", "2",
            "--r-target", "4", "--r-max", "8", "--save-every", "10", "--iters", "40"]
    checkpoint.save(out, 10, {"x": mx.zeros(1)}, {"settings": {"training": {"iters": 40}, "method": {}}})
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "holds an unfinished run (iteration 10 of 40); continue it with --resume" in err
    code, _, err = run_cli([*base, "--resume", "--r-max", "16"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["train", "--resume", "--adapter-path", str(tmp_path / "none")], capsys)
    assert code == 2 and "no checkpoint to resume" in err


def _stopped_at_15(argv, capsys):
    """Run the command line with a NaN at iteration 15: it stops with exit 3, checkpoint 10 written."""
    os.environ["DRLORA_MLX_FAULT_NAN_AT"] = "15"
    try:
        code, _, _ = run_cli(argv, capsys)
    finally:
        del os.environ["DRLORA_MLX_FAULT_NAN_AT"]
    assert code == 3


def test_resume_names_the_mismatched_setting(tiny_models, tmp_path, capsys):
    path = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path / "adapters"
    base = ["train", "--model", str(path), "--adapter-path", str(out), "--batch-size", "4", "--r-init", "2",
            "--r-target", "4", "--r-max", "8", "--save-every", "10", "--iters", "40"]
    _stopped_at_15(base, capsys)
    code, _, err = run_cli([*base, "--resume", "--r-max", "16"], capsys)
    assert code == 2
    assert err.strip() == ("drlora-mlx: error: the checkpoint was made with r_max=8, this run asks for r_max=16; "
                           "resume with the same setting or train into a new --adapter-path")
    code, _, err = run_cli([*base, "--resume", "--learning-rate", "0.1"], capsys)
    assert code == 2 and "learning_rate=" in err


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(reference_run, tmp_path):
    path, reference = reference_run
    out = tmp_path / "adapters"
    stopped = subprocess.run(train_command(path, out, "--save-every", "10"), env=dict(os.environ, DRLORA_MLX_FAULT_NAN_AT="45"),
                             capture_output=True, text=True)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert [p.name for p in checkpoint.complete(out)] == ["step-0000030", "step-0000040"]
    damaged = checkpoint.checkpoint_dir(out) / "step-0000040" / checkpoint.STATE
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a torn write
    resumed = subprocess.run([sys.executable, "-m", "drlora_mlx", "train", "--resume", "--adapter-path", str(out)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    notes = [line for line in resumed.stdout.splitlines() if "step-0000040" in line]
    assert len(notes) == 1 and notes[0].startswith("skipped checkpoint ") and "is unreadable" in notes[0], notes
    assert "resuming from" in resumed.stdout and "step-0000030 at iteration 30" in resumed.stdout
    assert_same_adapter(reference, out)


def test_a_checkpoint_from_before_the_pooled_layout_resumes_masked(tiny_models, tmp_path, capsys):
    """Checkpoints written before lora_layout existed hold every expert at r_max: they resume in the masked layout."""
    path = tiny_models("qwen3_moe", shape=SHAPE)
    out = tmp_path / "adapters"
    base = ["train", "--model", str(path), "--adapter-path", str(out), "--batch-size", "4", "--r-init", "2",
            "--r-target", "4", "--r-max", "8", "--save-every", "10", "--iters", "20", "--lora-layout", "masked"]
    _stopped_at_15(base, capsys)
    record = checkpoint.checkpoint_dir(out) / "step-0000010" / checkpoint.META
    meta = json.loads(record.read_text())
    del meta["settings"]["method"]["lora_layout"]
    record.write_text(json.dumps(meta))
    code, text, err = run_cli(["train", "--resume", "--adapter-path", str(out)], capsys)
    assert code == 0, err
    assert "resuming from" in text and "at iteration 10 of 20" in text and "(masked layout)" in text
    assert json.loads((out / "drlora_config.json").read_text())["method"]["lora_layout"] == "masked"
