"""Training data: mlx-lm's folder layout and formats, and resumable batches.

A data folder holds ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl``, each
line one example in one of mlx-lm's formats: ``{"text"}``, ``{"prompt",
"completion"}`` or ``{"messages"}`` (chat). Tokenisation is mlx-lm's own
(``mlx_lm.tuner.datasets``); this module adds line-precise errors and a batch
iterator whose position can be saved and restored exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import InputError

BUNDLED = Path(__file__).resolve().parent / "data" / "tasks"
PAD_TO = 32  # batch lengths are padded to a multiple of this: few compiled shapes


class DataError(InputError):
    """Bad training data; the message names the file (and line)."""


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


def _format_of(row: dict) -> str | None:
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


def load_split(path: Path, tokenizer, mask_prompt: bool):
    """One split as mlx-lm's tokenising dataset (cached), or None if the file is absent."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    if not path.exists():
        return None
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} is empty; it needs at least one example per line")
    fmt = _format_of(rows[0])
    for n, row in enumerate(rows, start=1):
        if _format_of(row) != fmt or fmt is None:
            raise DataError(
                f"{path}, example {n}: unknown or mixed format (keys: {', '.join(sorted(row)) or 'none'}); "
                'use {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]} throughout'
            )
    if mask_prompt and fmt == "text":
        raise DataError(f"{path}: --mask-prompt needs completions or chat data, not plain text")
    if fmt != "text" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{path} holds {fmt} data, which is formatted with the tokenizer's chat template, "
            'but this model\'s tokenizer has none; use {"text": ...} data'
        )
    return CacheDataset(create_dataset(rows, tokenizer, SimpleNamespace(mask_prompt=mask_prompt)))


def load_datasets(data: str | Path, tokenizer, mask_prompt: bool = False, need_test: bool = False):
    """(train, valid, test) from a data folder; valid and test may be None."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist; give --data a folder with train.jsonl")
    train = load_split(data / "train.jsonl", tokenizer, mask_prompt)
    if train is None:
        raise DataError(f"{data / 'train.jsonl'} is missing; a data folder needs train.jsonl (valid.jsonl, test.jsonl optional)")
    valid = load_split(data / "valid.jsonl", tokenizer, mask_prompt)
    test = load_split(data / "test.jsonl", tokenizer, mask_prompt)
    if need_test and test is None:
        raise DataError(f"--test needs {data / 'test.jsonl'}, which is missing")
    return train, valid, test


def check_lengths(dataset, max_seq_length: int, name: str = "training") -> int:
    """How many examples exceed ``max_seq_length`` (they are truncated); an
    error if all of them do."""
    lengths = []
    for i in range(len(dataset)):
        try:
            lengths.append(len(dataset[i][0]))
        except Exception as e:  # the tokenizer's own message, on one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{name} example {i + 1} could not be tokenized: {first}") from None
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


class Batches:
    """Endless batches of similar-length examples, shuffled per epoch.

    The position (epoch, batch) is all the state there is: ``state()`` and
    ``restore()`` make resuming exact. ``rank``/``world`` split every batch
    between data-parallel processes.
    """

    def __init__(self, dataset, batch_size: int, max_seq_length: int, seed: int = 0, rank: int = 0, world: int = 1):
        if len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} examples, fewer than --batch-size {batch_size}")
        if batch_size % world:
            raise DataError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.rank, self.world = rank, world
        order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
        self.groups = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.epoch = 0
        self.position = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.groups):
            self.epoch, self.position = self.epoch + 1, 0
        group = self.groups[self._permutation()[self.position]]
        self.position += 1
        return collate([self.dataset[i] for i in group[self.rank :: self.world]], self.max_seq_length)


def collate(examples, max_seq_length: int):
    """(tokens (B, T) int32, lengths (B, 2) [prompt offset, length]) as numpy."""
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in examples]
    width = min(1 + PAD_TO * -(-max(lengths) // PAD_TO), max_seq_length)
    batch = np.zeros((len(examples), width), np.int32)
    for j, (tokens, _) in enumerate(examples):
        batch[j, : lengths[j]] = tokens[: lengths[j]]
    offsets = [offset for _, offset in examples]
    return batch, np.array(list(zip(offsets, lengths)), np.int32)


def eval_batches(dataset, batch_size: int, max_seq_length: int, limit: int = -1, rank: int = 0, world: int = 1):
    """The first ``limit`` batches (all with -1) of a dataset, in order, for evaluation."""
    batch_size = min(batch_size, len(dataset))
    n = len(dataset) // batch_size if limit == -1 else min(limit, len(dataset) // batch_size)
    for b in range(n):
        idx = range(b * batch_size, (b + 1) * batch_size)
        yield collate([dataset[i] for i in list(idx)[rank::world]], max_seq_length)
