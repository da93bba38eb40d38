"""Every error a user can cause is one type, and the command line turns it into one line and exit 2."""

import importlib
import inspect
import pkgutil

import pytest

import drlora_mlx
from drlora_mlx.errors import DRLoRAError, InputError, RunStopped
from drlora_mlx.training import run as train_job

from .helpers import run_cli


def _package_errors():
    found = set()
    for info in pkgutil.walk_packages(drlora_mlx.__path__, "drlora_mlx."):
        if info.name == "drlora_mlx.__main__":
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("drlora_mlx"):
                found.add(cls)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


ERRORS = _package_errors()
INPUT_ERRORS = [c for c in ERRORS if issubclass(c, InputError)]


def test_every_error_type_derives_from_the_one_base():
    assert len(INPUT_ERRORS) >= 12  # config, schedule, data, model, family, checkpoint, adapter, export, ...
    for cls in ERRORS:
        assert issubclass(cls, DRLoRAError), cls
        # Either the user's input (exit 2) or a run stopped for a reason of its own (signal, NaN, divergence).
        assert issubclass(cls, InputError) != issubclass(cls, RunStopped) or cls in (DRLoRAError,), cls


@pytest.mark.parametrize("cls", INPUT_ERRORS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_the_cli_turns_each_input_error_into_one_line_and_exit_2(cls, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise cls("the problem, and the fix")

    monkeypatch.setattr(train_job, "run", fail)
    code, out, err = run_cli(["train", "--iters", "10"], capsys)
    assert code == 2
    assert err == "drlora-mlx: error: the problem, and the fix\n"


def test_runs_stopped_for_other_reasons_keep_their_exit_codes(monkeypatch, capsys, tmp_path):
    from drlora_mlx.training.trainer import DivergenceError, NonFiniteError

    for error, code, line in [
        (NonFiniteError(5, 3, float("nan")), 3, "drlora-mlx: error: non-finite loss or gradient at iteration 5"),
        (DivergenceError(7, 1), 4, "drlora-mlx: error: processes disagree on the rank masks"),
        (train_job.Interrupted(15, 9, tmp_path), 143, "drlora-mlx: SIGTERM at iteration 9: checkpoint written"),
    ]:
        monkeypatch.setattr(train_job, "run", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        got, _, err = run_cli(["train"], capsys)
        assert got == code and err.startswith(line) and err.count("\n") == 1, err
