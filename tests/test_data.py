"""Training data from every source: jsonl folders, save_to_disk folders, hf_dataset
entries, and prompt/completion data on tokenizers without a chat template."""

import json
import sys

import datasets
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tokenizers import Tokenizer, processors

from drlora_mlx.data.loading import (
    DataError,
    bundled_data_dir,
    fingerprint,
    load_datasets,
    read_jsonl,
)
from drlora_mlx.formats.tiny import SPECIAL_TOKENS, build_tokenizer, builtin_model_path

from .helpers import read_metrics, run_cli

ROWS = read_jsonl(bundled_data_dir() / "train.jsonl")[:10]
VALID = read_jsonl(bundled_data_dir() / "valid.jsonl")[:3]
EOS = "<|im_end|>"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets.load_dataset caches what it prepares: here, not in the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{"chat": ChatML template, "plain": no template, "bos": no template and a BOS on every encode}."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = [f"{r['prompt']}\n{r['completion']}" for r in ROWS + VALID]
    build_tokenizer(texts, 320, root / "chat")
    build_tokenizer(texts, 320, root / "plain", chat_template=None)
    (root / "bos").mkdir()
    raw = Tokenizer.from_file(str(root / "plain" / "tokenizer.json"))
    bos = SPECIAL_TOKENS[0]
    raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, raw.token_to_id(bos))])
    raw.save(str(root / "bos" / "tokenizer.json"))
    config = json.loads((root / "plain" / "tokenizer_config.json").read_text())
    (root / "bos" / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos}))
    return {name: (load_tokenizer(root / name), Tokenizer.from_file(str(root / name / "tokenizer.json")))
            for name in ("chat", "plain", "bos")}


def write_jsonl(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def renamed(rows, prompt="question", completion="answer"):
    return [{prompt: r["prompt"], completion: r["completion"]} for r in rows]


def examples(dataset):
    return [(list(dataset[i][0]), dataset[i][1]) for i in range(len(dataset))]


def reference(tmp_path, tokenizer, train, valid, mask_prompt=True):
    """(train, valid) examples of the same rows from a jsonl folder under mlx-lm's default keys."""
    folder = write_jsonl(tmp_path / "reference", {"train": train, "valid": valid})
    tr, va, _ = load_datasets(folder, tokenizer, mask_prompt=mask_prompt)
    return examples(tr), examples(va)


QA = {"prompt_feature": "question", "completion_feature": "answer"}


def test_save_to_disk_folder_with_custom_columns_matches_jsonl(tokenizers, tmp_path):
    tok = tokenizers["chat"][0]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed(ROWS)),
                          "validation": datasets.Dataset.from_list(renamed(VALID))}).save_to_disk(str(saved))
    # As the command line passes them: every feature key, those not set at mlx-lm's defaults.
    features = {**QA, "chat_feature": "messages", "text_feature": "text"}
    tr, va, te = load_datasets(saved, tok, mask_prompt=True, features=features)
    want_train, want_valid = reference(tmp_path, tok, ROWS, VALID)
    assert (examples(tr), examples(va), te) == (want_train, want_valid, None)
    # mlx-lm's completions format, by hand: the chat template over a user and an assistant turn,
    # the prompt masked up to the assistant's turn.
    turns = [{"role": "user", "content": ROWS[0]["prompt"]}, {"role": "assistant", "content": ROWS[0]["completion"]}]
    tokens = tok.apply_chat_template(turns, return_dict=False)
    offset = len(tok.apply_chat_template(turns[:1], add_generation_prompt=True, return_dict=False))
    assert examples(tr)[0] == (tokens, offset) and 0 < offset < len(tokens)


def test_hf_dataset_entries_match_jsonl_and_concatenate(tokenizers, tmp_path):
    tok = tokenizers["chat"][0]
    first = write_jsonl(tmp_path / "first", {"train": renamed(ROWS), "validation": renamed(VALID)})
    second_rows, second_valid = read_jsonl(bundled_data_dir() / "test.jsonl")[:4], ROWS[:2]
    second = write_jsonl(tmp_path / "second", {"train": renamed(second_rows, "q", "a"),
                                               "validation": renamed(second_valid, "q", "a")})
    entry = {"path": str(first), "train_split": "train", "valid_split": "validation", **QA}
    want_train, want_valid = reference(tmp_path / "one", tok, ROWS, VALID)
    tr, va, te = load_datasets(None, tok, mask_prompt=True, hf_dataset=entry)
    assert (examples(tr), examples(va), te) == (want_train, want_valid, None)

    # The run's feature keys apply to entries without their own; an entry's own keys win.
    first_entry = {k: v for k, v in entry.items() if k not in QA}
    other = {"path": str(second), "train_split": "train", "valid_split": "validation",
             "prompt_feature": "q", "completion_feature": "a"}
    tr, va, _ = load_datasets(None, tok, mask_prompt=True, features=QA, hf_dataset=[first_entry, other])
    more_train, more_valid = reference(tmp_path / "two", tok, second_rows, second_valid)
    assert len(tr) == len(ROWS) + len(second_rows) and len(va) == len(VALID) + len(second_valid)
    assert examples(tr) == want_train + more_train and examples(va) == want_valid + more_valid


def test_hf_dataset_default_splits_and_mask_prompt(tokenizers, tmp_path):
    tok = tokenizers["chat"][0]
    folder = write_jsonl(tmp_path / "files", {"train": renamed(ROWS)})
    notes = []
    tr, va, _ = load_datasets(None, tok, hf_dataset={"path": str(folder), "mask_prompt": True, **QA}, notes=notes)
    # mlx-lm's defaults: train[:80%] and train[-10%:] of the 10 rows; the run's mask_prompt (off), not the entry's.
    want_train, want_valid = reference(tmp_path, tok, ROWS[:8], ROWS[-1:], mask_prompt=False)
    assert (examples(tr), examples(va)) == (want_train, want_valid)
    assert notes == [f"note: hf_dataset ({folder}) sets no train_split or valid_split; using mlx-lm's defaults "
                     "train_split train[:80%], valid_split train[-10%:]",
                     "note: hf_dataset sets mask_prompt: true, which is not read: the run's mask_prompt (off) "
                     "applies to every dataset, as in mlx-lm"]


def test_test_split_is_loaded_with_need_test(tokenizers, tmp_path):
    tok = tokenizers["chat"][0]
    test_rows = read_jsonl(bundled_data_dir() / "test.jsonl")[:3]
    folder = write_jsonl(tmp_path / "files", {"train": ROWS, "validation": VALID, "test": test_rows})
    entry = {"path": str(folder), "train_split": "train", "valid_split": "validation", "test_split": "test"}
    _, _, te = load_datasets(None, tok, need_test=True, hf_dataset=entry)
    reference_folder = write_jsonl(tmp_path / "reference", {"train": ROWS, "test": test_rows})
    assert fingerprint(te) == fingerprint(load_datasets(reference_folder, tok, need_test=True)[2])


@pytest.mark.parametrize("name", ["plain", "bos"])
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_completions_without_chat_template_are_plain_text(tokenizers, tmp_path, name, mask_prompt):
    tok, raw = tokenizers[name]
    rows = ROWS[:4] + [{"prompt": "Echo: ab", "completion": f"ab{EOS}"}]  # EOS already at the end: not added twice
    folder = write_jsonl(tmp_path / "data", {"train": rows})
    notes = []
    tr, va, te = load_datasets(folder, tok, mask_prompt=mask_prompt, notes=notes)
    assert va is None and te is None
    eos = raw.token_to_id(EOS)
    for i, row in enumerate(rows):
        prompt = raw.encode(row["prompt"]).ids
        completion = raw.encode(row["completion"], add_special_tokens=False).ids
        want = prompt + completion + ([] if completion[-1] == eos else [eos])
        assert examples(tr)[i] == (want, len(prompt) if mask_prompt else 0)
        assert (prompt[0] == raw.token_to_id(SPECIAL_TOKENS[0])) == (name == "bos")
    assert examples(tr)[-1][0].count(eos) == 1
    masked = ", the prompt masked by its token length" if mask_prompt else ""
    assert notes == [f"note: {folder / 'train.jsonl'} has prompt/completion data and the tokenizer has no chat "
                     f"template: prompt and completion are joined as plain text (prompt, completion, EOS){masked}"]


def test_chat_without_chat_template_is_refused(tokenizers, tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    folder = write_jsonl(tmp_path / "chat", {"train": [{"messages": messages}] * 2})
    with pytest.raises(DataError, match="holds chat data, which is formatted with the tokenizer's chat template, but "
                                        "this model's tokenizer has none"):
        load_datasets(folder, tokenizers["plain"][0])


def test_train_on_a_save_to_disk_folder(tmp_path, capsys):
    """`drlora-mlx train --data <save_to_disk folder>` trains on exactly the examples of the same jsonl rows."""
    splits = {"train": read_jsonl(bundled_data_dir() / "train.jsonl"),
              "validation": read_jsonl(bundled_data_dir() / "valid.jsonl")}
    saved = tmp_path / "saved"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(saved))
    out = tmp_path / "adapters"
    code, _, err = run_cli(["train", "--data", str(saved), "--adapter-path", str(out), "--iters", "4",
                            "--batch-size", "4", "--steps-per-report", "2", "--steps-per-eval", "4",
                            "--val-batches", "1", "--mask-prompt", "--r-init", "2", "--r-target", "4",
                            "--r-max", "8"], capsys)
    assert code == 0, err
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert any(r["kind"] == "val" for r in records)
    meta = json.loads(next((out / "checkpoints").glob("step-*/trainer.json")).read_text())
    tok = load_tokenizer(builtin_model_path())
    train, _, _ = load_datasets(bundled_data_dir(), tok, mask_prompt=True)
    assert meta["data_sha256"] == fingerprint(train)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("hf_dataset,message", [
    ("some/dataset", "hf_dataset must be a mapping (path: ..., train_split: ...) or a non-empty list of them, got "
                     "'some/dataset'"),
    ([], "hf_dataset must be a mapping"),
    (["some/dataset"], "hf_dataset[0] must be a mapping with at least path: <dataset id or folder>"),
    ({"train_split": "train"}, "hf_dataset has no path; set path: to a Hugging Face dataset id or a folder"),
    ({"path": "x", "train_splt": "train"}, "hf_dataset: unknown key 'train_splt' (did you mean train_split?)"),
    ({"path": "x", "name": "main"}, "hf_dataset: unknown key 'name' (keyword arguments of datasets.load_dataset, "
                                    "such as name or data_files, go under config:)"),
    ([{"path": "x"}, {"path": "y", "prompt_feature": 3}], "hf_dataset[1]: prompt_feature must be a column name, "
                                                          "got 3"),
    ({"path": "x", "config": "main"}, "hf_dataset: config must be a mapping of datasets.load_dataset keyword"),
])
def test_bad_hf_dataset_entries(tokenizers, hf_dataset, message):
    with pytest.raises(DataError) as excinfo:
        load_datasets(None, tokenizers["chat"][0], hf_dataset=hf_dataset)
    assert message in one_line(excinfo)


def test_hf_dataset_errors_name_the_split_and_the_column(tokenizers, tmp_path):
    tok = tokenizers["chat"][0]
    folder = write_jsonl(tmp_path / "files", {"train": renamed(ROWS)})
    cases = [
        ({"path": str(folder), "valid_split": "validation", **QA}, False,
         "hf_dataset valid_split 'validation': Unknown split \"validation\". Should be one of ['train']."),
        ({"path": str(folder), "prompt_feature": "question", "completion_feature": "answr"}, False,
         f"hf_dataset ({folder}, split train[:80%]): completion_feature 'answr' names no column (it has: question, "
         "answer); set completion_feature to one of them"),
        ({"path": str(folder), **QA}, True, f"hf_dataset ({folder}) has no test_split, which --test needs"),
        ({"path": "some-org/not-cached", **QA}, False, "hf_dataset train_split 'train[:80%]': the Hugging Face "
         "dataset 'some-org/not-cached' is not in the local cache and HF_HUB_OFFLINE is set"),
        ({"path": str(tmp_path / "absent")}, False, f"'{tmp_path / 'absent'}' is neither a Hugging Face dataset nor "
         "a folder of data files"),
    ]
    for entry, need_test, message in cases:
        with pytest.raises(DataError) as excinfo:
            load_datasets(None, tok, need_test=need_test, hf_dataset=entry)
        assert message in one_line(excinfo), entry


def test_data_feature_naming_a_missing_column(tokenizers, tmp_path):
    folder = write_jsonl(tmp_path / "data", {"train": renamed(ROWS)})
    with pytest.raises(DataError) as excinfo:
        load_datasets(folder, tokenizers["chat"][0], features={"prompt_feature": "query", "completion_feature": None})
    assert one_line(excinfo) == (f"{folder / 'train.jsonl'}: prompt_feature 'query' names no column (it has: "
                                 "question, answer); set prompt_feature to one of them")


def test_datasets_package_missing(tokenizers, tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    tok = tokenizers["chat"][0]
    for kwargs, start in [({"data": saved}, f"{saved} holds a dataset saved with save_to_disk; reading it"),
                          ({"data": "some-org/data"}, "data 'some-org/data' is not a local folder; loading it as a "
                                                      "Hugging Face dataset"),
                          ({"data": None, "hf_dataset": {"path": "x"}}, "hf_dataset")]:
        with pytest.raises(DataError) as excinfo:
            load_datasets(tokenizer=tok, **kwargs)
        assert one_line(excinfo) == f"{start} needs the datasets package: pip install 'drlora-mlx[datasets]'"


def test_bad_data_sources_end_the_cli_with_one_line(tmp_path, capsys):
    no_train = tmp_path / "no_train"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(no_train))
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    only_train = tmp_path / "only_train"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(only_train))
    capsys.readouterr()  # save_to_disk's progress bars
    cases = [
        (["--data", str(no_train)], f"{no_train} has no train split (its splits: validation); it needs train"),
        (["--data", str(single)], "this one holds a single Dataset: save a DatasetDict({'train': ...})"),
        (["--data", str(only_train), "--test"], f"--test needs a test split, which {only_train} lacks"),
        (["--data", "some-org/not-cached"], "data 'some-org/not-cached' (not a local folder): the Hugging Face "
                                            "dataset 'some-org/not-cached' is not in the local cache and "
                                            "HF_HUB_OFFLINE is set"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["train", "--adapter-path", str(tmp_path / "out"), "--iters", "40", *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("drlora-mlx: error: "), (extra, err)
        assert message in lines[0], (extra, lines[0])
