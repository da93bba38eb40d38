"""The ``drlora-mlx`` command line.

Every ``train`` flag is a field of ``TrainingArgs`` or ``DRLoRAConfig``
(``--r-init`` is ``r_init``), so the flags, the YAML file given with ``-c`` and
the Python API are one set of names. Precedence: command line, then the YAML
file, then (for the built-in tiny model) its preset, then the defaults.

Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import fields
from pathlib import Path

import click

from .config import ConfigError, DRLoRAConfig

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_DIVERGED = 4


class InputError(Exception):
    """Any error that is the user's input, not the program's fault."""


def _bad_input_types() -> tuple:
    from .adapters import AdapterError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .export import ExportError
    from .families import UnsupportedModelError
    from .fuse import FuseError
    from .hf_checkpoint import HFLayoutError
    from .modelio import ModelError
    from .schedule import ScheduleError

    return (InputError, ConfigError, DataError, ModelError, ScheduleError, AdapterError, UnsupportedModelError,
            CheckpointError, ExportError, FuseError, HFLayoutError)


def _fail(message: str) -> None:
    click.echo(f"drlora-mlx: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


# ----- options made from the dataclasses ----------------------------------------


def _click_type(f):
    choices = f.metadata.get("choices")
    if choices:
        return click.Choice(choices)
    kind = str(f.type)
    if "tuple" in kind or "str" in kind:
        return str
    if "float" in kind:
        return float
    if "int" in kind:
        return int
    return str


def _options(dataclass_type, skip=()):
    opts = []
    for f in fields(dataclass_type):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            decls = [f"{flag}/--no-{flag[2:]}"] if f.default is True else [flag]
            opts.append(click.Option(decls, is_flag=True, default=None, help=f.metadata.get("help")))
        else:
            opts.append(click.Option([flag], type=_click_type(f), default=None, help=f.metadata.get("help")))
    return opts


def _given(ctx: click.Context) -> dict:
    """The options the user typed on the command line."""
    return {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"config file {path}{where}: not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"config file {path}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


def _check_type(key: str, value, kind: str, source: str):
    """A YAML value of the field's type (ints where floats are expected are fine)."""
    if value is None and "None" in kind:
        return value
    if key == "targets" and isinstance(value, (list, str)):
        return value
    if "bool" in kind:
        ok = isinstance(value, bool)
    elif "float" in kind:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif "int" in kind:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = next(t for t in ("bool", "float", "int", "str") if t in kind)
        raise InputError(f"{source}: {key} must be {want}, got {value!r}")
    return float(value) if "float" in kind else value


def build_configs(given: dict, yaml_settings: dict, source: str = "config file", base: dict | None = None):
    """(TrainingArgs, DRLoRAConfig) from command-line and YAML settings, over
    ``base`` (a resumed run's own settings) and the defaults."""
    import difflib

    from .train import BUILTIN_PRESET
    from .trainer import TrainingArgs

    train_names = {f.name for f in fields(TrainingArgs)}
    method_names = {f.name for f in fields(DRLoRAConfig)}
    known = sorted(train_names | method_names)
    for key in yaml_settings:
        if key not in known:
            close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"{source}: unknown key {key!r}{hint}")
    types_of = {f.name: str(f.type) for f in fields(TrainingArgs) + fields(DRLoRAConfig)}
    settings = dict(base or {})
    settings.update({k: _check_type(k, v, types_of[k], source) for k, v in yaml_settings.items()})
    settings.update(given)
    if settings.get("model") is None:
        settings = {**BUILTIN_PRESET, **settings}
    args = TrainingArgs(**{k: v for k, v in settings.items() if k in train_names})
    config = DRLoRAConfig(**{k: v for k, v in settings.items() if k in method_names})
    return args, config


# ----- commands ---------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="drlora-mlx")
def cli():
    """DR-LoRA fine-tuning of Mixture-of-Experts models with MLX."""


def _train(ctx: click.Context, config_file: str | None, **_):
    from .trainer import TrainingArgs  # noqa: F401  (imports mlx lazily)
    from .train import run

    from . import checkpoint
    from .export import read_export
    from .train import is_peft_export

    given = _given(ctx)
    given.pop("config_file", None)
    yaml_settings = read_yaml(config_file) if config_file else {}
    layered = {**yaml_settings, **given}
    base = None
    if layered.get("resume_from") and is_peft_export(layered["resume_from"]):
        # Starting from a PEFT export: its method settings, the rest as given.
        base = read_export(layered["resume_from"])["method"]
    elif layered.get("resume") or layered.get("resume_from"):
        # A resumed run keeps its own settings unless told otherwise.
        meta = checkpoint.find_meta(layered.get("adapter_path", "adapters"), layered.get("resume_from"))
        saved = meta["settings"]
        base = {k: v for k, v in {**saved["training"], **saved["method"]}.items()
                if k not in ("resume", "resume_from", "adapter_path")}
    args, config = build_configs(given, yaml_settings, f"config file {config_file}", base)
    run(args, config)


def _make_train_command():
    from .trainer import TrainingArgs

    params = [click.Option(["-c", "--config", "config_file"], type=str, default=None, help="YAML file of settings (keys: the flag names with underscores).")]
    params += _options(TrainingArgs) + _options(DRLoRAConfig)
    return click.Command(
        "train",
        callback=click.pass_context(_train),
        params=params,
        help="Fine-tune an MoE model with DR-LoRA (or uniform LoRA). With no arguments: the built-in tiny MoE on the bundled tasks.",
    )


cli.add_command(_make_train_command())


@cli.command()
@click.option("--layers", type=int, required=True, help="MoE layers.")
@click.option("--experts", type=int, required=True, help="Routed experts per layer.")
@click.option("--r-init", type=int, required=True)
@click.option("--r-max", type=int, required=True)
@click.option("--r-target", type=int, required=True)
@click.option("--iters", type=int, required=True, help="Optimizer steps T.")
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--grow-every", type=int, default=None, help="T_grow [default: 200, less for short runs]")
@click.option("--growth-buffer", type=int, default=None, help="T_buffer [default: 200, less for short runs]")
@click.option("--grow-fraction", type=float, default=0.1, show_default=True)
@click.option("--modules-per-expert", type=int, default=2, show_default=True, help="Adapted projections per expert.")
@click.option("--at", "at_steps", type=str, default=None, help="Comma list of steps to report the mean rank at.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(layers, experts, r_init, r_max, r_target, iters, warmup_ratio, grow_every, growth_buffer, grow_fraction,
         modules_per_expert, at_steps, as_json):
    """Print the growth plan of a configuration, without any model."""
    if layers < 1 or experts < 1 or modules_per_expert < 1:
        raise InputError("--layers, --experts and --modules-per-expert must be at least 1")
    targets = ("gate_proj", "up_proj", "down_proj")[-modules_per_expert:] if modules_per_expert <= 3 else None
    if targets is None:
        raise InputError(f"--modules-per-expert must be 1, 2 or 3; got {modules_per_expert}")
    config = DRLoRAConfig(
        r_init=r_init, r_max=r_max, r_target=r_target, warmup_ratio=warmup_ratio, grow_every=grow_every,
        growth_buffer=growth_buffer, grow_fraction=grow_fraction, targets=targets,
    )
    schedule = config.schedule(iters, modules_per_expert * experts)
    try:
        steps = [int(s) for s in at_steps.split(",") if s.strip()] if at_steps else []
    except ValueError:
        raise InputError(f"--at must be a comma list of steps, got {at_steps!r}") from None
    if not steps:
        steps = sorted({0, *schedule.event_steps()[:: max(1, len(schedule.event_steps()) // 8)], iters})
    summary = schedule.summary(steps)
    summary["layers"] = layers
    summary["total_budget"] = schedule.budget * layers
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"T={iters} optimizer steps, {layers} layers x {modules_per_expert * experts} modules, "
        f"ranks {r_init} -> {r_target} (max {r_max})"
    )
    click.echo(
        f"warm-up until step {summary['warmup_steps']}, growth every {summary['grow_every']} steps until step "
        f"{summary['end_step']}: {summary['n_events']} events"
    )
    click.echo(
        f"quota {summary['quota']} ranks per layer per event, at most {summary['module_step']} per module per event; "
        f"budget {summary['cap']} per layer, exhausted at step {summary['budget_exhausted_step']}"
    )
    if summary["quota"] > schedule.n_modules * schedule.module_step:
        click.echo(
            f"warning: one event can place at most {schedule.n_modules * schedule.module_step} ranks per layer, "
            "less than the quota: growth will lag; raise --grow-fraction or --iters"
        )
    click.echo("step      mean rank")
    for s, r in summary["mean_rank"].items():
        click.echo(f"{int(s):>8}  {r:>9.2f}")


@cli.command()
@click.option("--adapter-path", default="adapters", show_default=True, help="A drlora-mlx adapter directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranks as one JSON object.")
@click.option("--png", "png_path", type=str, default=None, help="Also write a heatmap image (layers x experts per projection).")
def ranks(adapter_path, as_json, png_path):
    """Show the active rank of every expert module of a trained adapter."""
    from .adapters import read_ranks
    from .png import rank_heatmap_png
    from .progress import rank_heatmap

    info = read_ranks(adapter_path)
    if as_json:
        click.echo(json.dumps(info))
    else:
        import numpy as np

        targets = info["targets"]
        rows = np.array([np.concatenate([layer[t] for t in targets]) for layer in info["layers"]])
        n_experts = len(info["layers"][0][targets[0]])
        click.echo(
            rank_heatmap(rows, targets, n_experts, info["r_init"], info["r_max"], [l["layer"] for l in info["layers"]])
        )
    if png_path:
        import numpy as np

        panels = [np.array([layer[t] for layer in info["layers"]]) for t in info["targets"]]
        rank_heatmap_png(png_path, panels, info["r_init"], info["r_max"])
        if not as_json:
            click.echo(f"wrote {png_path}")


@cli.command()
@click.option("--adapter-path", default="adapters", show_default=True, help="A drlora-mlx adapter directory.")
@click.option("--out", required=True, help="Directory to write the exported adapter to.")
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="Export format: Hugging Face PEFT LoRA.")
@click.option("--layout", type=click.Choice(["fused", "per-expert"]), default="fused", show_default=True,
              help="fused: experts as fused parameters (transformers >= 5); per-expert: one module per expert "
                   "(transformers 4.x).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def export(adapter_path, out, fmt, layout, as_json):
    """Export a trained adapter for PEFT / transformers (and from there vLLM, TGI, the Hub)."""
    from dataclasses import asdict

    from .export import export_peft

    report = export_peft(adapter_path, out, layout)
    if as_json:
        click.echo(json.dumps({**asdict(report), "out": str(report.out)}))
    else:
        click.echo(report.summary())


@cli.command()
@click.option("--model", default=None, help="Base model (default: the model the adapter was trained on).")
@click.option("--adapter-path", default="adapters", show_default=True, help="A drlora-mlx adapter directory.")
@click.option("--save-path", required=True, help="Directory to write the fused model to.")
@click.option("--dequantize", is_flag=True, help="Write the whole model in float (transformers reads it).")
@click.option("--requantize", is_flag=True,
              help="Quantize the merged layers again with the base's settings; prints the error it introduces.")
def fuse(model, adapter_path, save_path, dequantize, requantize):
    """Merge the adapter (and a trained router) into the base model and save it."""
    from .fuse import fuse as fuse_model

    click.echo(fuse_model(model, adapter_path, save_path, dequantize=dequantize, requantize=requantize).summary())


def main(argv=None) -> None:
    """Entry point of the console script and ``python -m drlora_mlx``."""
    from .train import Interrupted
    from .trainer import DivergenceError, NonFiniteError

    bad_input = _bad_input_types()
    try:
        cli.main(args=argv, prog_name="drlora-mlx", standalone_mode=False)
    except NonFiniteError as e:
        click.echo(f"drlora-mlx: error: {e}", err=True)
        sys.exit(EXIT_NONFINITE)
    except DivergenceError as e:
        click.echo(f"drlora-mlx: error: {e}", err=True)
        sys.exit(EXIT_DIVERGED)
    except Interrupted as e:
        click.echo(f"drlora-mlx: {e}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("drlora-mlx: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        _fail(e.format_message().replace("\n", " "))
    except bad_input as e:
        _fail(str(e).replace("\n", " "))
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            _fail(f"{e.strerror}: {e.filename}")
        raise
