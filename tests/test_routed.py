"""The routed method (--method routed): routing profiled over the warm-up with the
expert LoRA off, then each layer's most routed experts get uniform LoRA's budget.
Checked against hand-built routing tables and hand-counted ranks, and through
stock mlx-lm, real PEFT and an exact resume."""

import json

import mlx.core as mx
import numpy as np
import pytest
import transformers
from mlx_lm import load as mlx_lm_load

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
from drlora_mlx.data.loading import bundled_data_dir, load_datasets
from drlora_mlx.display.report import event_summary, routed_plan
from drlora_mlx.errors import ConfigError
from drlora_mlx.formats.adapters import read_ranks
from drlora_mlx.formats.peft import export_peft
from drlora_mlx.formats.peft_support import refusal
from drlora_mlx.lora.attach import attach
from drlora_mlx.method.growth import grow
from drlora_mlx.method.routed import RoutedSchedule, routed_ranks, select_experts
from drlora_mlx.training import checkpoint
from drlora_mlx.training.adapter_start import AdapterFileError, start_from_adapter_file
from drlora_mlx.training.trainer import Trainer

from .helpers import (
    SHAPE,
    TOKENS,
    TOL,
    assert_same_arrays,
    attached,
    ours,
    padded_batch,
    read_metrics,
    run_cli,
    theirs,
)

# Two layers x six experts; layer 1 has a tie between experts 0 and 4.
TABLE = np.array([[0.05, 0.30, 0.10, 0.25, 0.20, 0.10],
                  [0.20, 0.10, 0.05, 0.40, 0.20, 0.05]])


# ----- the method's numbers (numpy) ---------------------------------------------------------------

def test_the_top_fraction_by_routing_frequency_is_chosen():
    chosen = select_experts(TABLE, fraction=0.5)  # 3 of 6
    assert [np.flatnonzero(r).tolist() for r in chosen] == [[1, 3, 4], [0, 3, 4]]
    chosen = select_experts(TABLE, fraction=0.25)  # ceil(1.5) = 2: in layer 1 the tie goes to expert 0
    assert [np.flatnonzero(r).tolist() for r in chosen] == [[1, 3], [0, 3]]
    assert select_experts(TABLE, fraction=0.01).sum(axis=1).tolist() == [1, 1]
    assert select_experts(np.zeros((1, 4)), fraction=0.5).tolist() == [[True, True, False, False]]


def test_esft_share_threshold_chooses_the_fewest_experts_reaching_it():
    # layer 0 sorted: 0.30, 0.25, 0.20 -> 0.75 reaches 0.7; layer 1: 0.40, 0.20, 0.20 -> 0.80 reaches 0.7
    chosen = select_experts(TABLE, fraction=0.25, share=0.7)
    assert [np.flatnonzero(r).tolist() for r in chosen] == [[1, 3, 4], [0, 3, 4]]
    chosen = select_experts(TABLE, fraction=0.25, share=0.4)  # layer 1's top expert alone holds 0.40
    assert [np.flatnonzero(r).tolist() for r in chosen] == [[1, 3], [3]]
    assert select_experts(TABLE * 7, fraction=0.25, share=1.0).all()  # shares, not raw frequencies


def test_the_chosen_experts_spend_exactly_uniform_loras_budget():
    # 6 experts x r_target 4 = 24 ranks per projection; 3 chosen -> 8 each, 2 projections.
    out = routed_ranks(select_experts(TABLE, 0.5), TABLE, n_targets=2, r_target=4, r_max=8)
    assert out.ranks.tolist() == [[0, 8, 0, 8, 8, 0] * 2, [8, 0, 0, 8, 8, 0] * 2]
    assert out.unspent.tolist() == [0, 0] and out.wanted.tolist() == [8.0, 8.0]
    # 24 ranks over 5 experts: 4 each and one more for the 4 most routed (the remainder), exact again.
    chosen = np.array([[True, True, True, True, True, False]] * 2)
    out = routed_ranks(chosen, TABLE, n_targets=1, r_target=4, r_max=8)
    assert out.ranks.tolist() == [[4, 5, 5, 5, 5, 0], [5, 5, 4, 5, 5, 0]]
    assert (out.ranks.sum(axis=1) == 6 * 4).all() and out.unspent.tolist() == [0, 0]
    for k in range(1, 7):  # every count, two projections: spent + unspent is the budget
        chosen = np.zeros((1, 6), bool)
        chosen[0, :k] = True
        out = routed_ranks(chosen, TABLE[:1], n_targets=2, r_target=4, r_max=10)
        assert out.ranks.sum() + out.unspent[0] == 2 * 6 * 4
        assert out.unspent[0] == 2 * max(0, 24 - 10 * k)


def test_the_cap_is_r_max_and_what_it_leaves_is_reported():
    out = routed_ranks(select_experts(TABLE, 0.25), TABLE, n_targets=2, r_target=4, r_max=8)
    assert out.ranks.tolist() == [[0, 8, 0, 8, 0, 0] * 2, [8, 0, 0, 8, 0, 0] * 2]
    assert out.wanted.tolist() == [12.0, 12.0]
    assert out.unspent.tolist() == [2 * (24 - 16)] * 2


def test_one_event_at_the_end_of_warm_up():
    schedule = RoutedSchedule(total_steps=100, n_modules=12, r_init=0, r_target=4, r_max=8, warmup_ratio=0.1)
    assert schedule.event_steps() == [10] and schedule.n_events == 1
    assert [s for s in range(1, 101) if schedule.is_event(s)] == [10]
    assert schedule.target_growth(9) == 0 and schedule.target_growth(10) == schedule.budget == 48
    assert DRLoRAConfig(method="routed").schedule(100, 12) == RoutedSchedule(
        total_steps=100, n_modules=12, r_init=0, r_target=16, r_max=32, grow_every=2, growth_buffer=5)


def test_routed_settings():
    config = DRLoRAConfig(method="routed", r_target=4, r_max=16)
    assert config.ranks == (0, 4, 16) and config.resolved_lora_layout == "pooled"
    assert DRLoRAConfig(method="routed", lora_layout="masked").resolved_lora_layout == "masked"
    for bad in [{"routed_fraction": 0}, {"routed_fraction": 1.5}, {"routed_share": -0.1}, {"routed_share": 1.2},
                {"r_target": 16, "r_max": 8}]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DRLoRAConfig(method="routed", **bad)


# ----- on a model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["pooled", "masked"])
def test_the_event_gives_the_hand_counted_ranks_and_keeps_the_function(tiny_models, layout):
    frequency = np.array([[0.02, 0.30, 0.08, 0.10, 0.25, 0.05, 0.15, 0.05],
                          [0.40, 0.05, 0.05, 0.10, 0.05, 0.05, 0.10, 0.20],
                          [0.10, 0.10, 0.10, 0.30, 0.10, 0.10, 0.10, 0.10]])
    model, _, drlora = attached(tiny_models, "qwen3_moe", method="routed", r_target=4, r_max=16,
                                lora_layout=layout)
    assert not drlora.ranks().any()  # LoRA off while routing is profiled
    drlora.routing.frequency = mx.array(frequency, dtype=mx.float32)
    x = padded_batch(SHAPE.vocab, seed=3)[0]
    before = model(x)
    schedule = drlora.schedule(40)
    assert grow(drlora, schedule.warmup_steps - 1, schedule) is None
    event = grow(drlora, schedule.warmup_steps, schedule)
    # 8 experts x 4 = 32 ranks per projection on ceil(0.25 x 8) = 2 experts: 16 each.
    want = np.zeros((3, 8), int)
    want[0, [1, 4]] = 16
    want[1, [0, 7]] = 16
    want[2, [3, 0]] = 16  # a seven-way tie for second place: the lowest index
    assert drlora.ranks().tolist() == np.tile(want, (1, 2)).tolist()
    assert event.routed.unspent.tolist() == [0, 0, 0]
    assert (drlora.ranks().sum(axis=1) == drlora.n_modules * 4).all()
    assert mx.array_equal(model(x), before).item()  # new ranks start at B = 0
    assert grow(drlora, schedule.warmup_steps + 1, schedule) is None  # and never change


def test_the_share_threshold_on_a_model_spends_the_budget_on_unequal_counts(tiny_models):
    frequency = np.array([[0.02, 0.30, 0.08, 0.10, 0.25, 0.05, 0.15, 0.05],   # 0.30 + 0.25 + 0.15 = 0.70: 3
                          [0.75, 0.05, 0.05, 0.05, 0.02, 0.03, 0.03, 0.02],   # 0.75 alone: 1
                          [0.35, 0.05, 0.05, 0.35, 0.05, 0.05, 0.05, 0.05]])  # 0.35 + 0.35: 2
    _, _, drlora = attached(tiny_models, "qwen3_moe", method="routed", r_target=4, r_max=16, routed_share=0.7)
    drlora.routing.frequency = mx.array(frequency, dtype=mx.float32)
    schedule = drlora.schedule(40)
    assert "whose routing shares reach 0.7" in routed_plan(drlora, schedule)
    event = grow(drlora, schedule.warmup_steps, schedule)
    # 32 ranks per projection: 11, 11, 10 over three (the two most routed take the remainder); 16 (the cap)
    # for one, leaving 16 per projection; 16 and 16 for two.
    want = np.zeros((3, 8), int)
    want[0, [1, 4, 6]] = [11, 11, 10]
    want[1, 0] = 16
    want[2, [0, 3]] = 16
    assert drlora.ranks().tolist() == np.tile(want, (1, 2)).tolist()
    assert event.routed.unspent.tolist() == [0, 32, 0]
    assert "left 32 budget ranks unspent (--r-max 32 spends them)" in event_summary(drlora, event)


def test_an_adapter_file_start_is_refused(tiny_models, tmp_path):
    _, _, drlora = attached(tiny_models, "qwen3_moe", method="routed", r_target=4, r_max=16)
    with pytest.raises(AdapterFileError, match="--method routed starts with LoRA off"):
        start_from_adapter_file(drlora, tmp_path / "adapters.safetensors")


TRAIN = ["--iters", "40", "--batch-size", "4", "--learning-rate", "5e-3", "--steps-per-report", "10",
         "--steps-per-eval", "1000", "--val-batches", "1", "--method", "routed", "--r-target", "4",
         "--warmup-ratio", "0.1", "--mask-prompt"]


@pytest.fixture(scope="module")
def routed_run(tiny_models, tmp_path_factory):
    """A routed CLI run on a tiny Qwen3-MoE in the Hugging Face layout, whole budget spent (r_max 16)."""
    model = tiny_models("qwen3_moe", shape=SHAPE, weights_format="hf")
    out = tmp_path_factory.mktemp("routed") / "adapters"
    from drlora_mlx.cli import main

    main(["train", "--model", str(model), "--adapter-path", str(out), *TRAIN, "--r-max", "16"])
    return model, out


def test_a_routed_run_reports_its_choice_and_spends_the_budget(routed_run, capsys):
    _, out = routed_run
    growth = [r for r in read_metrics(out) if r["kind"] == "growth"]
    assert [(r["optimizer_step"], r["unspent"]) for r in growth] == [(4, [0] * SHAPE.layers)]
    info = read_ranks(out)
    assert (info["r_init"], info["r_target"], info["r_max"]) == (0, 4, 16)
    for layer, chosen in zip(info["layers"], growth[0]["chosen"]):
        for t in info["targets"]:
            assert sum(layer[t]) == 8 * 4  # uniform LoRA's budget, per projection
            assert [e for e, r in enumerate(layer[t]) if r] == chosen and len(chosen) == 2
            assert {layer[t][e] for e in chosen} == {16}
    png = out.parent / "ranks.png"
    code, text, _ = run_cli(["ranks", "--adapter-path", str(out), "--png", str(png)], capsys)
    assert code == 0 and "chosen experts" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for layer, chosen in zip(info["layers"], growth[0]["chosen"]):
        assert f"L{layer['layer']}: experts {','.join(map(str, chosen))}" in text


def test_a_routed_adapter_loads_in_stock_mlx_lm_and_exports_to_peft(routed_run, tmp_path):
    model, out = routed_run
    stock, _ = mlx_lm_load(str(model), adapter_path=str(out))
    want = ours(model, out)
    assert np.abs(np.array(stock(mx.array(TOKENS))) - want).max() < TOL
    assert np.abs(np.array(mlx_lm_load(str(model))[0](mx.array(TOKENS))) - want).max() > 1000 * TOL
    layout = next(l for l in ("fused", "per-expert") if not refusal(l, transformers.__version__))
    export_peft(out, tmp_path / "peft", layout)
    assert np.abs(theirs(model, tmp_path / "peft") - want).max() < TOL


def test_a_warm_start_from_a_routed_export_keeps_its_experts(routed_run, tmp_path, capsys):
    model, out = routed_run
    layout = next(l for l in ("fused", "per-expert") if not refusal(l, transformers.__version__))
    export_peft(out, tmp_path / "peft", layout)
    code, text, err = run_cli(["train", "--model", str(model), "--resume-from", str(tmp_path / "peft"),
                               "--adapter-path", str(tmp_path / "continued"), *TRAIN], capsys)
    assert code == 0, err
    assert "starting from the PEFT export" in text
    # The event at the end of the warm-up finds the export's ranks and leaves them: other routing, same experts.
    assert read_ranks(tmp_path / "continued")["layers"] == read_ranks(out)["layers"]
    assert not [r for r in read_metrics(tmp_path / "continued") if r["kind"] == "growth"]  # nothing grew


def test_a_routed_adapter_fuses_into_its_base(routed_run, tmp_path, capsys):
    model, out = routed_run
    code, _, err = run_cli(["fuse", "--adapter-path", str(out), "--save-path", str(tmp_path / "fused")], capsys)
    assert code == 0, err
    want = ours(model, out)
    assert np.abs(ours(tmp_path / "fused") - want).max() < TOL
    assert np.abs(theirs(tmp_path / "fused") - want).max() < TOL


def test_a_capped_run_says_what_it_leaves_unspent(tiny_models, tmp_path, capsys):
    model = tiny_models("qwen3_moe", shape=SHAPE)
    code, text, err = run_cli(["train", "--model", str(model), "--adapter-path", str(tmp_path / "a"), *TRAIN,
                               "--iters", "10", "--r-max", "8"], capsys)
    assert code == 0, err
    # 32 ranks per projection on 2 experts want 16 each; r_max 8 leaves 2 x (32 - 16) per layer.
    assert "capped at r_max 8, 32 ranks per layer stay unspent (--r-max 16 spends them)" in text
    growth = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "growth"]
    assert growth[0]["unspent"] == [32] * SHAPE.layers
    assert "left 96 budget ranks unspent" in text  # 3 layers


# ----- exact resume -------------------------------------------------------------------------------

ARGS = {"iters": 48, "batch_size": 4, "learning_rate": 5e-3, "grad_accumulation_steps": 2, "steps_per_report": 1000,
        "steps_per_eval": 1000, "mask_prompt": True, "weight_decay": 0.01}


def _trainer(model_path, **overrides):
    model, tokenizer = mlx_lm_load(str(model_path))
    drlora = attach(model, DRLoRAConfig(method="routed", r_target=4, r_max=16, warmup_ratio=0.25), seed=0)
    train, _, _ = load_datasets(bundled_data_dir(), tokenizer, mask_prompt=True)
    return Trainer(model, drlora, TrainingArgs(**{**ARGS, **overrides})), train


def _state(trainer):
    arrays, _ = trainer.checkpoint_state()
    return {k: np.asarray(v) for k, v in arrays.items() if k.startswith(("param.", "state.", "optimizer."))}


@pytest.mark.parametrize("cut", [7, 21])  # before the event (optimizer step 6, iteration 12) and after it
def test_a_routed_run_resumes_bitwise(tiny_models, tmp_path, cut):
    path = tiny_models("qwen3_moe", shape=SHAPE)
    straight, train = _trainer(path)
    full = straight.run(train)
    assert [e.step for e in full.events] == [6] and full.events[0].routed is not None

    first, train = _trainer(path, save_every=1)
    first.run(train, on_save=lambda it: setattr(first, "stop_requested", it >= cut))
    assert first.iteration == cut
    saved = checkpoint.save(tmp_path, first.iteration, *first.checkpoint_state())

    second, train = _trainer(path)
    second.restore(*checkpoint.read(saved))
    rest = second.run(train)
    assert rest.iteration_losses == full.iteration_losses[cut:]
    assert [e.step for e in rest.events] == ([6] if cut < 12 else [])
    want, got = _state(straight), _state(second)
    assert_same_arrays(want, got)


def test_ranks_json_names_the_method(routed_run, capsys):
    _, out = routed_run
    info = json.loads(run_cli(["ranks", "--adapter-path", str(out), "--json"], capsys)[1])
    assert info["method"] == "routed" and len(info["chosen"]) == SHAPE.layers
