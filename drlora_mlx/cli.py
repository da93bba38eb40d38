"""The ``drlora-mlx`` command line.

Every ``train`` flag is a field of ``TrainingArgs`` or ``DRLoRAConfig``
(``--r-init`` is ``r_init``), so the flags, the YAML file given with ``-c`` and
the Python API are one set of names (``config.settings.resolve`` layers them); the
command line only parses, and ``training.run.run`` decides and trains.

An error a user can cause ends with one line on stderr and exit code 2; a run
stopped for another reason (a non-finite step, a signal) with its own code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields

import click

from .config.settings import DRLoRAConfig, TrainingArgs, read_yaml
from .errors import DRLoRAError, InputError

EXIT_BAD_INPUT = InputError.exit_code


def _fail(message: str, code: int = EXIT_BAD_INPUT, label: str = "error") -> None:
    prefix = f"drlora-mlx: {label}: " if label else "drlora-mlx: "
    click.echo(prefix + message.replace("\n", " "), err=True)
    sys.exit(code)


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


def _options(dataclass_type, only=None, required=()):
    """One click option per field (``only``: these fields), with the field's help text; mappings
    (optimizer_config, hf_dataset) are YAML only, as in mlx_lm.lora."""
    opts = []
    for f in fields(dataclass_type):
        if only is not None and f.name not in only or str(f.type).startswith("dict"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            opts.append(click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=f.metadata.get("help")))
        else:
            opts.append(click.Option([flag], type=_click_type(f), default=None, required=f.name in required,
                                     help=f.metadata.get("help")))
    return opts


def _given(ctx: click.Context) -> dict:
    """The options the user typed on the command line."""
    return {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }


# ----- commands ---------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="drlora-mlx")
def cli():
    """DR-LoRA fine-tuning of Mixture-of-Experts models with MLX."""


def _train(ctx: click.Context, config_file: str | None, **_):
    from .training.run import run

    given = _given(ctx)
    given.pop("config_file", None)
    file_settings = read_yaml(config_file) if config_file else {}
    layered = {**file_settings, **given}
    if layered.get("train") is False or layered.get("iters") == 0:
        # mlx_lm.lora --test without --train: evaluate the adapter in --adapter-path, train nothing.
        if not layered.get("test"):
            raise InputError("nothing to do: with --iters 0 (or train: false) add --test to evaluate the adapter "
                             "in --adapter-path, or give --iters to train")
        _evaluate(ctx, config_file)
        return
    run(file_settings=file_settings, source=f"config file {config_file}", **given)


def _make_train_command():
    params = [click.Option(["-c", "--config", "config_file"], type=str, default=None,
                           help="YAML file of settings (keys: the flag names with underscores; mlx_lm.lora's "
                                "config files work too)."),
              click.Option(["--fine-tune-type"], type=click.Choice(["lora", "dora", "full"]), default=None,
                           help="mlx_lm.lora's name for --method lora (dora and full are not supported).")]
    params += _options(TrainingArgs) + _options(DRLoRAConfig)
    return click.Command(
        "train",
        callback=click.pass_context(_train),
        params=params,
        help="Fine-tune an MoE model with DR-LoRA (or uniform LoRA). With no arguments: the built-in tiny MoE on "
             "the bundled tasks.",
    )


cli.add_command(_make_train_command())

# The method settings a growth plan depends on.
_PLAN_METHOD = ("r_init", "r_target", "r_max", "grow_every", "grow_fraction", "warmup_ratio", "growth_buffer",
                "targets", "allocation", "lora_layout")


# What the memory of a run depends on besides the model and the ranks.
_PLAN_MEMORY = ("batch_size", "max_seq_length", "grad_checkpoint", "loss_chunk_size")
_PLAN_ROUTER = ("train_router",)


def _plan(ctx: click.Context, layers: int | None, experts: int | None, model: str | None, at_steps: str | None,
          as_json: bool, **_):
    given = _given(ctx)
    if model is not None and (layers is not None or experts is not None):
        raise InputError("give --model, or --layers and --experts, not both: the model sets its layers and experts")
    if model is None and (layers is None or experts is None):
        raise InputError("give --model (a model folder or Hugging Face id), or --layers and --experts")
    if model is None and any(k in given for k in _PLAN_MEMORY):
        raise InputError("--batch-size, --max-seq-length, --grad-checkpoint and --loss-chunk-size size the memory "
                         "plan, which needs --model")
    method = {k: v for k, v in given.items() if k in _PLAN_METHOD + _PLAN_ROUTER}
    config = DRLoRAConfig(**method)
    memory = None
    if model is not None:
        from .training.memory import memory_plan

        args = TrainingArgs(model=model, **{k: v for k, v in given.items() if k in _PLAN_MEMORY + ("iters",)})
        memory = memory_plan(model, config, args.batch_size, args.max_seq_length, args.grad_checkpoint,
                             args.loss_chunk_size)
        layers, experts = memory["moe_layers"], memory["experts"]
    if layers < 1 or experts < 1:
        raise InputError("--layers and --experts must be at least 1")
    iters = given["iters"] // given.get("grad_accumulation_steps", 1)
    schedule = config.schedule(iters, len(config.targets) * experts)
    try:
        steps = [int(s) for s in at_steps.split(",") if s.strip()] if at_steps else []
    except ValueError:
        raise InputError(f"--at must be a comma list of steps, got {at_steps!r}") from None
    if not steps:
        steps = sorted({0, *schedule.event_steps()[:: max(1, len(schedule.event_steps()) // 8)], iters})
    pooled = layers if config.allocation == "global" else 1  # per-layer pools all grow alike
    summary = schedule.summary(steps, n_layers=pooled, allocation=config.allocation)
    summary["layers"] = layers
    summary["total_budget"] = schedule.budget * layers
    if as_json:
        click.echo(json.dumps({**summary, **(memory or {})}))
        return
    click.echo(
        f"T={iters} optimizer steps, {layers} layers x {schedule.n_modules} modules, "
        f"ranks {schedule.r_init} -> {schedule.r_target} (max {schedule.r_max})"
    )
    click.echo(
        f"warm-up until step {summary['warmup_steps']}, growth every {summary['grow_every']} steps until step "
        f"{summary['end_step']}: {summary['events']} events"
    )
    click.echo(
        f"quota {summary['quota']} ranks per layer per event, {summary['module_step']} per module per walk; "
        f"budget {summary['cap']} per layer, exhausted at step {summary['budget_exhausted_step']}"
    )
    if summary["quota"] > schedule.n_modules * schedule.module_step:
        click.echo(
            f"note: one walk places at most {schedule.n_modules * schedule.module_step} ranks per layer, less than "
            "the quota, so each event walks the modules more than once"
        )
    click.echo("step      mean rank (as the allocator delivers it)")
    for s, r in summary["mean_rank"].items():
        click.echo(f"{int(s):>8}  {r:>9.2f}")
    if memory is not None:
        _print_memory(memory, config)


def _print_memory(m: dict, config: DRLoRAConfig) -> None:
    """The memory part of ``plan --model``."""
    r_init, r_target, r_max = config.ranks
    q = m["quantization"]
    weights = f"{q['bits']}-bit (group {q['group_size']}{', ' + q['mode'] if 'mode' in q else ''})" if q else (
        f"{m['dtype']} ({m['dtype_from']})")
    masked, pooled = m["layouts"]["masked"], m["layouts"]["pooled"]
    router = {"never": "frozen", "always": "trains"}.get(config.train_router, "trains after warm-up")

    def row(label: str, n: int, note: str = "") -> None:
        click.echo(f"  {label:<30}{n / 1e9:>8.2f} GB" + (f"   {note}" if note else ""))

    click.echo(f"model: {m['family']}, {m['moe_layers']} MoE layers x {m['experts']} experts (top-{m['top_k']}), "
               f"hidden {m['hidden']}, expert dim {m['expert_dim']}, {weights} weights")
    click.echo(f"memory at batch {m['batch_size']} x {m['max_seq_length']} tokens, "
               f"{'with' if m['grad_checkpoint'] else 'without'} gradient checkpointing, {m['lora_layout']} layout:")
    row("base weights", m["base_weight_bytes"])
    row("expert LoRA state", m["lora_state_bytes"],
        f"uniform LoRA at r_target {r_target}: {m['uniform_lora_state_bytes'] / 1e9:.2f} GB")
    if m["gathered_factor_bytes"]:
        row("gathered LoRA factors", m["gathered_factor_bytes"], f"one layer at r_max {r_max}, with their gradient")
    row(f"router ({router})", m["router_state_bytes"])
    loss = (f"chunked loss, {m['loss_chunk_tokens']} tokens per chunk" if m["loss_chunk_tokens"] else
            "plain loss: every token's logits")
    row("activations", m["activation_bytes"] - m["logits_bytes"])
    row("logits", m["logits_bytes"], loss)
    row("peak", m["peak_bytes"])
    if m["loss_chunk_tokens"]:
        click.echo(f"  with the plain loss (every token's logits, as mlx-lm): {m['plain_loss_peak_bytes'] / 1e9:.2f} GB "
                   f"peak; mlx-lm's LoRA at rank {r_target}: {m['mlx_lm_peak_bytes'] / 1e9:.2f} GB")
    click.echo(f"  layouts: pooled {pooled['peak_bytes'] / 1e9:.2f} GB peak; masked "
               f"{masked['peak_bytes'] / 1e9:.2f} GB peak, its expert LoRA state "
               f"{masked['lora_state_bytes'] / 1e9:.2f} GB at r_max {r_max}")
    click.echo(f"this machine can give {m['available_bytes'] / 1e9:.1f} GB: the run "
               + ("fits" if m["fits"] else "does not fit"))
    largest = m["largest_r_max"]
    click.echo("largest r_max that fits, masked layout: "
               + (str(largest) if largest >= r_target else f"none (r_max must be at least r_target {r_target})"))
    fitting = m["largest_r_target"]
    fitting = f"{fitting}, with --r-init below it" if 0 < fitting <= r_init else str(fitting or "none")
    click.echo(f"the pooled layout's LoRA state follows r_target, not r_max: largest r_target that fits at r_max "
               f"{r_max}: {fitting}")
    if m["warning"]:
        click.echo(m["warning"])


def _make_plan_command():
    params = [
        click.Option(["--model"], type=str, default=None,
                     help="Model folder or Hugging Face id: also plan the memory of a run (only config.json is read)."),
        click.Option(["--layers"], type=int, default=None, help="MoE layers (without --model)."),
        click.Option(["--experts"], type=int, default=None, help="Routed experts per layer (without --model)."),
        *_options(TrainingArgs, only=("iters", "grad_accumulation_steps") + _PLAN_MEMORY, required=("iters",)),
        *_options(DRLoRAConfig, only=_PLAN_METHOD + _PLAN_ROUTER),
        click.Option(["--at", "at_steps"], type=str, default=None, help="Comma list of steps to report the mean rank at."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print one JSON object."),
    ]
    return click.Command("plan", callback=click.pass_context(_plan), params=params,
                         help="Print the growth plan of a configuration; with --model, also the memory a run needs "
                              "and whether it fits this machine (no weights are read).")


cli.add_command(_make_plan_command())


@cli.command()
@click.option("--adapter-path", default="adapters", show_default=True, help="A drlora-mlx adapter directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranks as one JSON object.")
@click.option("--png", "png_path", type=str, default=None, help="Also write a heatmap image (layers x experts per projection).")
def ranks(adapter_path, as_json, png_path):
    """Show the active rank of every expert module of a trained adapter."""
    from .display.png import rank_heatmap_png
    from .display.progress import rank_heatmap
    from .formats.adapters import read_ranks

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
        if "chosen" in info:
            click.echo("chosen experts (routed): " + "; ".join(
                f"L{layer['layer']}: experts {','.join(map(str, chosen))}"
                for layer, chosen in zip(info["layers"], info["chosen"])))
    if png_path:
        import numpy as np

        panels = [np.array([layer[t] for layer in info["layers"]]) for t in info["targets"]]
        rank_heatmap_png(png_path, panels, info["r_init"], info["r_max"])
        if not as_json:
            click.echo(f"wrote {png_path}")


@cli.command()
@click.option("--adapter-path", default="adapters", show_default=True, help="A drlora-mlx adapter directory.")
@click.option("--out", default=None, help="The PNG to write (default: <adapter-path>/training.png).")
def plot(adapter_path, out):
    """Plot the training and validation loss and the mean rank over the steps of a run (its metrics.jsonl)."""
    from .display.progress import plot_training

    click.echo(f"wrote {plot_training(adapter_path, out)}")


@cli.command()
@click.option("--adapter-path", default="adapters", show_default=True, help="A drlora-mlx adapter directory.")
@click.option("--out", required=True, help="Directory to write the exported adapter to.")
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="Export format: Hugging Face PEFT LoRA.")
@click.option("--layout", type=click.Choice(["fused", "per-expert"]), default="fused", show_default=True,
              help="fused: experts as fused parameters (transformers >= 5); per-expert: one module per expert "
                   "(transformers 4.x).")
@click.option("--for-transformers", "for_transformers", default=None,
              help="The transformers version that will load the export (default: the one installed here, if any); "
                   "a layout it would load without applying is refused.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def export(adapter_path, out, fmt, layout, for_transformers, as_json):
    """Export a trained adapter for PEFT / transformers (and from there vLLM, TGI, the Hub)."""
    from dataclasses import asdict

    from .formats.peft import export_peft

    report = export_peft(adapter_path, out, layout, for_transformers)
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
    from .formats.fuse import fuse as fuse_model

    click.echo(fuse_model(model, adapter_path, save_path, dequantize=dequantize, requantize=requantize).summary())


def _evaluate(ctx: click.Context, config_file: str | None, **_):
    from .training.distributed import launched_world
    from .training.evaluate import evaluate_adapter, evaluation_settings

    given = _given(ctx)
    given.pop("config_file", None)
    file_settings = read_yaml(config_file) if config_file else {}
    evaluate_adapter(evaluation_settings(given, file_settings, f"config file {config_file}"), launched_world())


# The settings an evaluation reads (mlx-lm's --test without --train).
_TEST_FIELDS = ("model", "data", "adapter_path", "batch_size", "max_seq_length", "test_batches", "mask_prompt",
                "prompt_feature", "completion_feature", "chat_feature", "text_feature", "trust_remote_code",
                "loss_chunk_size")


def _make_test_command():
    params = [click.Option(["-c", "--config", "config_file"], type=str, default=None,
                           help="YAML file of settings (a train config works: training-only keys are ignored).")]
    params += _options(TrainingArgs, only=_TEST_FIELDS)
    return click.Command(
        "test", callback=click.pass_context(_evaluate), params=params,
        help="Evaluate a saved adapter on the test split, without training it (the adapter is only read). "
             "Defaults: the settings it was trained with.")


cli.add_command(_make_test_command())


def main(argv=None) -> None:
    """Entry point of the console script and ``python -m drlora_mlx``."""
    try:
        cli.main(args=argv, prog_name="drlora-mlx", standalone_mode=False)
    except DRLoRAError as e:
        _fail(str(e), e.exit_code, e.label)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", 130, "")
    except click.ClickException as e:
        _fail(e.format_message())
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        _fail(f"{e.strerror}: {e.filename}")
