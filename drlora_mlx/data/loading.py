"""Training data: mlx-lm's formats from local folders or Hugging Face datasets.

``load_datasets`` reads the train, valid and test splits from one of:

- a folder with ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (mlx-lm's
  layout; errors name the file and line);
- a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict with the
  splits train, valid or validation, test);
- a Hugging Face dataset id (org/name) with those splits;
- ``hf_dataset`` entries as in mlx-lm's YAML (path, config, train_split,
  valid_split, test_split, feature keys), concatenated split by split.

Every example is in one of mlx-lm's formats, text, prompt/completion or chat
messages, under the default keys or the feature keys given, and is tokenised by
mlx-lm's own datasets (``mlx_lm.tuner.datasets``). The one addition:
prompt/completion data on a tokenizer without a chat template is joined as plain
text (``PlainCompletions``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import InputError

BUNDLED = Path(__file__).resolve().parent / "tasks"

# mlx-lm's feature keys and their defaults.
FEATURES = {"prompt_feature": "prompt", "completion_feature": "completion", "chat_feature": "messages",
            "text_feature": "text"}
# The feature keys each format reads, in mlx-lm's order of precedence.
FORMATS = {"completions": ("prompt_feature", "completion_feature"), "chat": ("chat_feature",),
           "text": ("text_feature",)}
# The keys of an hf_dataset entry mlx-lm reads, and its default splits.
SPLIT_KEYS = ("train_split", "valid_split", "test_split")
BLOCK_KEYS = ("path", "config", *SPLIT_KEYS, *FEATURES, "mask_prompt")
DEFAULT_SPLITS = {"train_split": "train[:80%]", "valid_split": "train[-10%:]"}
INSTALL_DATASETS = "pip install 'drlora-mlx[datasets]'"


class DataError(InputError):
    """Bad training data; the message names the file (and line) or the dataset and split."""


def bundled_data_dir() -> Path:
    """The small task dataset that ships with the package."""
    return BUNDLED


def bundled_texts() -> list[str]:
    """Every text of the bundled dataset (the tiny tokenizer is trained on them)."""
    texts = []
    for split in ("train", "valid", "test"):
        for row in read_jsonl(BUNDLED / f"{split}.jsonl"):
            texts.append(f"{row['prompt']}\n{row['completion']}")
    return texts


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file; a malformed line is a ``DataError``."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}, line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_datasets(data: str | Path | None, tokenizer, mask_prompt: bool = False, need_test: bool = False,
                  features: dict | None = None, hf_dataset: dict | list | None = None, notes: list | None = None,
                  need_train: bool = True):
    """(train, valid, test) as mlx-lm's cached datasets (``ds[i] -> (tokens, prompt offset)``);
    valid and test may be None.

    ``data`` is a jsonl folder, a ``save_to_disk`` folder or a Hugging Face id;
    ``hf_dataset`` (mlx-lm's YAML value: one entry or a list) takes its place
    when given, as in mlx-lm. ``features`` maps prompt_feature,
    completion_feature, chat_feature and text_feature to column names (None:
    mlx-lm's default); an hf_dataset entry's own keys win over them. A key set
    to another column than the default must name a column of the data.
    One-line notes for the caller to print are appended to ``notes``.
    Without ``need_train`` (an evaluation) the train split may be missing.
    """
    features = _checked_features(features)
    notes = [] if notes is None else notes
    plain: list[str] = []  # the splits whose prompt/completion pairs are joined as plain text
    if hf_dataset is not None:
        splits = _from_entries(hf_dataset, tokenizer, mask_prompt, need_test, features, notes, plain, need_train)
    else:
        splits = _from_data(data, tokenizer, mask_prompt, need_test, features, plain, need_train)
    if plain:
        masked = ", the prompt masked by its token length" if mask_prompt else ""
        notes.append(f"note: {', '.join(plain)} {'has' if len(plain) == 1 else 'have'} prompt/completion data and "
                     "the tokenizer has no chat template: prompt and completion are joined as plain text (prompt, "
                     f"completion, EOS){masked}")
    from mlx_lm.tuner.datasets import CacheDataset

    return tuple(None if split is None else CacheDataset(split) for split in splits)


class PlainCompletions:
    """Prompt/completion examples for a tokenizer without a chat template, as
    TRL takes non-conversational data: the prompt encoded as the tokenizer
    encodes any text (with its BOS, if it adds one), then the completion
    without special tokens, then EOS. The prompt offset is the prompt's token
    count (0 without ``mask_prompt``). The interface is mlx-lm's
    (``process(row)``), so its CacheDataset and ConcatenatedDataset take it.
    """

    def __init__(self, rows: list[dict], tokenizer, prompt_key: str, completion_key: str, mask_prompt: bool):
        self._rows = rows
        self.tokenizer = tokenizer
        self.prompt_key, self.completion_key = prompt_key, completion_key
        self.mask_prompt = mask_prompt

    def process(self, row: dict):
        # Encoded apart, so the prompt's tokens are exactly the masked prefix.
        prompt = self.tokenizer.encode(row[self.prompt_key])
        tokens = prompt + self.tokenizer.encode(row[self.completion_key], add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return tokens, len(prompt) if self.mask_prompt else 0

    def __getitem__(self, idx: int) -> dict:
        return self._rows[idx]

    def __len__(self) -> int:
        return len(self._rows)


def _checked_features(features: dict | None) -> dict:
    """The feature keys that were given (None means mlx-lm's default)."""
    features = features or {}
    for name, column in features.items():
        if name not in FEATURES:
            raise DataError(f"unknown feature key {name!r}; the feature keys are {', '.join(FEATURES)}")
        if column is not None and not (isinstance(column, str) and column):
            raise DataError(f"{name} must be a column name, got {column!r}")
    return {name: column for name, column in features.items() if column is not None}


def _format_of(row: dict, keys: dict) -> str | None:
    # A column holding None counts as absent: Arrow tables give every row every column.
    for fmt, needed in FORMATS.items():
        if all(row.get(keys[name]) is not None for name in needed):
            return fmt
    return None


def _examples(rows: list[dict], where: str, tokenizer, given: dict, mask_prompt: bool, plain: list):
    """One split's rows (dicts, whatever their source) as an mlx-lm dataset, not yet
    tokenised; ``where`` names the split in errors. ``given``: the feature keys set; one
    naming another column than mlx-lm's default must name a column of the data."""
    from mlx_lm.tuner.datasets import create_dataset

    if not rows:
        raise DataError(f"{where} is empty; it needs at least one example")
    for name, column in given.items():
        # A key left at mlx-lm's default may be absent: the data can be in another format.
        if column != FEATURES[name] and column not in rows[0]:
            raise DataError(f"{where}: {name} {column!r} names no column (it has: {', '.join(map(str, rows[0]))}); "
                            f"set {name} to one of them")
    keys = {**FEATURES, **given}
    fmt = _format_of(rows[0], keys)
    for n, row in enumerate(rows, start=1):
        if fmt is None or _format_of(row, keys) != fmt:
            present = ", ".join(sorted(str(k) for k, v in row.items() if v is not None)) or "none"
            raise DataError(
                f"{where}, example {n}: unknown or mixed format (keys: {present}); use "
                f'{{"{keys["text_feature"]}": ...}}, {{"{keys["prompt_feature"]}": ..., '
                f'"{keys["completion_feature"]}": ...}} or {{"{keys["chat_feature"]}": [...]}} throughout'
            )
    if mask_prompt and fmt == "text":
        raise DataError(f"{where}: --mask-prompt needs completions or chat data, not plain text")
    if fmt == "chat" and not tokenizer.has_chat_template:
        raise DataError(
            f"{where} holds chat data, which is formatted with the tokenizer's chat template, but this model's "
            'tokenizer has none; use {"text": ...} or {"prompt": ..., "completion": ...} data'
        )
    # Only the format's own columns (and mlx-lm's "tools"): mlx-lm picks the format from the keys of row 1.
    columns = [keys[name] for name in FORMATS[fmt]] + ([] if fmt == "text" else ["tools"])
    rows = [{c: row[c] for c in columns if row.get(c) is not None} for row in rows]
    if fmt == "completions" and not tokenizer.has_chat_template:
        plain.append(where)
        return PlainCompletions(rows, tokenizer, keys["prompt_feature"], keys["completion_feature"], mask_prompt)
    return create_dataset(rows, tokenizer, SimpleNamespace(mask_prompt=mask_prompt, **keys))


def _from_data(data, tokenizer, mask_prompt: bool, need_test: bool, given: dict, plain: list, need_train: bool):
    """(train, valid, test) from ``data``: a jsonl folder, a save_to_disk folder or a Hub id."""
    if data is None:
        raise DataError("no training data: give --data (a folder or a Hugging Face dataset id) or hf_dataset")
    path = Path(data).expanduser()
    if not path.exists():
        name = str(data)
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise DataError(f"data folder {data} does not exist; give --data a folder with train.jsonl or a "
                            "Hugging Face dataset id (org/name)")
        datasets = _datasets(f"data {name!r} is not a local folder; loading it as a Hugging Face dataset")
        found = _load_dataset(datasets, name, f"data {name!r} (not a local folder)")
        return _dict_splits(found, f"Hugging Face dataset {name}", tokenizer, mask_prompt, need_test, given, plain,
                            need_train)
    if not path.is_dir():
        raise DataError(f"data {path} is a file; give --data a folder with train.jsonl (valid.jsonl, test.jsonl)")
    has_train = (path / "train.jsonl").exists() or not need_train and (path / "test.jsonl").exists()
    if not has_train and (path / "dataset_dict.json").exists():
        datasets = _datasets(f"{path} holds a dataset saved with save_to_disk; reading it")
        try:
            found = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"{path} could not be read by datasets.load_from_disk: {_first_line(e)}") from None
        return _dict_splits(found, str(path), tokenizer, mask_prompt, need_test, given, plain, need_train)
    if not has_train:
        single = (path / "state.json").exists()
        raise DataError(
            f"{path / 'train.jsonl'} is missing; a data folder needs train.jsonl (valid.jsonl, test.jsonl optional) "
            + ("and this one holds a single Dataset: save a DatasetDict({'train': ...}) with save_to_disk instead"
               if single else "or is a DatasetDict saved with datasets' save_to_disk")
        )
    splits = []
    for split in ("train", "valid", "test"):
        file = path / f"{split}.jsonl"
        splits.append(_examples(read_jsonl(file), str(file), tokenizer, given, mask_prompt, plain)
                      if file.exists() else None)
    if need_test and splits[2] is None:
        raise DataError(f"--test needs {path / 'test.jsonl'}, which is missing")
    return splits


def _dict_splits(found, where: str, tokenizer, mask_prompt: bool, need_test: bool, given: dict, plain: list,
                 need_train: bool):
    """(train, valid, test) from a DatasetDict's splits train, valid or validation, and test."""
    names = list(found.keys())
    if "train" not in names and need_train:
        raise DataError(f"{where} has no train split (its splits: {', '.join(names)}); it needs train, and "
                        "optionally valid (or validation) and test")
    if need_test and "test" not in names:
        raise DataError(f"--test needs a test split, which {where} lacks (its splits: {', '.join(names)})")
    valid = next((n for n in ("valid", "validation") if n in names), None)
    chosen = ["train" if "train" in names else None, valid, "test" if "test" in names else None]
    return [None if n is None else
            _examples(found[n].to_list(), f"{where} (split {n})", tokenizer, given, mask_prompt, plain)
            for n in chosen]


def _checked_entries(hf_dataset, need_test: bool) -> list[tuple[str, dict]]:
    """(name, entry) for each hf_dataset entry, each a mapping of mlx-lm's keys with a path."""
    if isinstance(hf_dataset, dict):
        named = [("hf_dataset", hf_dataset)]
    elif isinstance(hf_dataset, list) and hf_dataset:
        named = [(f"hf_dataset[{i}]", entry) for i, entry in enumerate(hf_dataset)]
    else:
        raise DataError(f"hf_dataset must be a mapping (path: ..., train_split: ...) or a non-empty list of them, "
                        f"got {hf_dataset!r}")
    for name, entry in named:
        if not isinstance(entry, dict):
            raise DataError(f"{name} must be a mapping with at least path: <dataset id or folder>, got {entry!r}")
        for key in entry:
            if key not in BLOCK_KEYS:
                close = difflib.get_close_matches(str(key), BLOCK_KEYS, n=1)
                hint = (f"did you mean {close[0]}?" if close else
                        "keyword arguments of datasets.load_dataset, such as name or data_files, go under config:")
                raise DataError(f"{name}: unknown key {key!r} ({hint})")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DataError(f"{name} has no path; set path: to a Hugging Face dataset id or a folder of data files")
        for key in (*SPLIT_KEYS, *FEATURES):
            if entry.get(key) is not None and not (isinstance(entry[key], str) and entry[key]):
                what = "a split such as train[:80%]" if key in SPLIT_KEYS else "a column name"
                raise DataError(f"{name}: {key} must be {what}, got {entry[key]!r}")
        if entry.get("config") is not None and not isinstance(entry["config"], dict):
            raise DataError(f"{name}: config must be a mapping of datasets.load_dataset keyword arguments, "
                            f"got {entry['config']!r}")
        if entry.get("mask_prompt") is not None and not isinstance(entry["mask_prompt"], bool):
            raise DataError(f"{name}: mask_prompt must be true or false, got {entry['mask_prompt']!r}")
        if need_test and entry.get("test_split") is None:
            raise DataError(f"{name} ({entry['path']}) has no test_split, which --test needs; set test_split "
                            "(for example test_split: test)")
    return named


def _from_entries(hf_dataset, tokenizer, mask_prompt: bool, need_test: bool, features: dict, notes: list,
                  plain: list, need_train: bool):
    """(train, valid, test) from mlx-lm's hf_dataset entries, concatenated split by split."""
    from mlx_lm.tuner.datasets import ConcatenatedDataset

    named = _checked_entries(hf_dataset, need_test)
    datasets = _datasets("hf_dataset")
    per_split = {"train_split": [], "valid_split": [], "test_split": []}
    for name, entry in named:
        path = entry["path"]
        unset = [key for key in DEFAULT_SPLITS if entry.get(key) is None]
        if unset:
            notes.append(f"note: {name} ({path}) sets no {' or '.join(unset)}; using mlx-lm's "
                         f"default{'s' if len(unset) > 1 else ''} "
                         f"{', '.join(f'{key} {DEFAULT_SPLITS[key]}' for key in unset)}")
        if entry.get("mask_prompt") is not None and entry["mask_prompt"] != mask_prompt:
            notes.append(f"note: {name} sets mask_prompt: {str(entry['mask_prompt']).lower()}, which is not read: "
                         f"the run's mask_prompt ({'on' if mask_prompt else 'off'}) applies to every dataset, as in "
                         "mlx-lm")
        given = {**features, **{key: entry[key] for key in FEATURES if entry.get(key) is not None}}
        for key in per_split:
            split = entry.get(key) or DEFAULT_SPLITS.get(key)
            if split is None or key == "train_split" and not need_train:  # test_split without --test; evaluations
                continue
            found = _load_dataset(datasets, path, f"{name} {key} {split!r}", split=split, **(entry.get("config") or {}))
            where = f"{name} ({path}, split {split})"
            per_split[key].append(_examples(found.to_list(), where, tokenizer, given, mask_prompt, plain))
    return [None if not parts else parts[0] if len(parts) == 1 else ConcatenatedDataset(parts)
            for parts in per_split.values()]


def _datasets(purpose: str):
    """The datasets package, imported only when a source needs it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{purpose} needs the datasets package: {INSTALL_DATASETS}") from None
    return datasets


def _load_dataset(datasets, path: str, where: str, **kwargs):
    """``datasets.load_dataset(path, **kwargs)``, its failures as one line that starts with ``where``."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(path, **kwargs)
    except ConnectionError:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{where}: the Hugging Face dataset {path!r} is not in the local cache and HF_HUB_OFFLINE "
                            "is set; download it first or unset HF_HUB_OFFLINE") from None
        raise DataError(f"{where}: the Hugging Face Hub could not be reached to load {path!r}") from None
    except (DatasetNotFoundError, FileNotFoundError):
        raise DataError(f"{where}: {path!r} is neither a Hugging Face dataset nor a folder of data files") from None
    except (ValueError, TypeError) as e:  # an unknown split or configuration: datasets' message says which
        raise DataError(f"{where}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_lengths(dataset, max_seq_length: int, name: str = "training") -> int:
    """How many examples exceed ``max_seq_length`` (they are truncated); an
    error if all of them do."""
    lengths = []
    for i in range(len(dataset)):
        try:
            lengths.append(len(dataset[i][0]))
        except Exception as e:  # the tokenizer's own message, on one line
            raise DataError(f"{name} example {i + 1} could not be tokenized: {_first_line(e)}") from None
    longer = sum(n > max_seq_length for n in lengths)
    if longer == len(lengths):
        raise DataError(
            f"every {name} example is longer than --max-seq-length {max_seq_length} tokens "
            f"(the shortest has {min(lengths)}); raise --max-seq-length"
        )
    return longer


def fingerprint(dataset) -> str:
    """sha256 of every example's tokens and prompt offset: the data a run trains on, whatever its source."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        tokens, offset = dataset[i]
        digest.update(np.asarray(tokens, np.int64).tobytes())
        digest.update(np.int64(offset).tobytes())
    return digest.hexdigest()
