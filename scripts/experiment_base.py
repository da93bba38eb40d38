"""The experiment's base model: a tiny Qwen3-MoE, pretrained on four text domains.

``pretrained_base`` builds the checkpoint with ``drlora_mlx.formats.tiny.build_tiny``,
replaces its tokenizer by one trained on the corpus, trains every weight of it
(AdamW, a compiled step, next-token loss plus the usual small load-balancing
loss of MoE pretraining) and saves it, once per setting: reruns find it in the
cache. ``routing_counts`` measures where tokens go, for the specialisation
report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from experiment_data import DOMAINS, corpus
from mlx.utils import tree_flatten

from drlora_mlx.formats.tiny import TinyShape, build_tiny, build_tokenizer

RECIPE_VERSION = 2  # bump when the recipe changes, so cached bases rebuild

# The base never sees chat: a prompt is its text and a newline, the answer ends with <|im_end|>.
PROMPT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] + '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Pretraining:
    """How the base is made; every field is part of its cache key."""

    shape: TinyShape
    steps: int
    batch_size: int = 16
    seq_length: int = 64
    learning_rate: float = 3e-3
    balance_coef: float = 0.01  # Switch-Transformer load-balancing loss, as MoE pretraining uses
    seed: int = 0


class _RecordingGate(nn.Linear):
    """The router's linear layer, also keeping its logits for the loss and the report."""

    logits: list = []

    def __call__(self, x):
        out = super().__call__(x)
        _RecordingGate.logits.append(out)
        return out


def _record_gates(model, on: bool) -> None:
    for layer in model.layers:
        layer.mlp.gate.__class__ = _RecordingGate if on else nn.Linear


def balance_loss(logits: mx.array, top_k: int) -> mx.array:
    """E * sum_e (share of top-k slots routed to e) * (mean router probability of e)."""
    n_experts = logits.shape[-1]
    probs = mx.softmax(logits.reshape(-1, n_experts).astype(mx.float32), axis=-1)
    chosen = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[:, :top_k])
    share = mx.zeros((n_experts,)).at[chosen.reshape(-1)].add(1.0) / chosen.size
    return n_experts * (share * probs.mean(axis=0)).sum()


def tokenize_domains(tokenizer, texts: dict[str, str]) -> dict[str, np.ndarray]:
    """Every domain's text as one token array."""
    return {d: np.array(tokenizer.encode(t), dtype=np.int32) for d, t in texts.items()}


def domain_windows(tokens: dict[str, np.ndarray], n_per_domain: int, length: int, seed: int, part: str):
    """(windows (domains * n, length), domain index per window): random windows
    from the first 90% ("train") or the last 10% ("held-out") of each domain."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for i, d in enumerate(DOMAINS):
        t = tokens[d]
        cut = int(len(t) * 0.9)
        lo, hi = (0, cut - length) if part == "train" else (cut, len(t) - length)
        for s in rng.integers(lo, hi, size=n_per_domain):
            rows.append(t[s : s + length])
            labels.append(i)
    return np.stack(rows), np.array(labels)


def pretrain(model, tokens: dict[str, np.ndarray], p: Pretraining, log=print) -> list[float]:
    """Train every weight of ``model`` for ``p.steps`` steps; each batch holds
    the same number of windows from every domain. Returns the loss per step."""
    top_k = model.layers[0].mlp.top_k
    _record_gates(model, True)

    def loss_fn(model, batch):
        _RecordingGate.logits.clear()
        logits = model(batch[:, :-1])
        ce = nn.losses.cross_entropy(logits, batch[:, 1:]).mean()
        balance = sum(balance_loss(g, top_k) for g in _RecordingGate.logits) / len(_RecordingGate.logits)
        return ce + p.balance_coef * balance, ce

    warmup = max(1, p.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(p.learning_rate / warmup, p.learning_rate, warmup),
         optim.cosine_decay(p.learning_rate, p.steps - warmup, p.learning_rate / 10)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (_, ce), grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        return ce

    per_domain = p.batch_size // len(DOMAINS)
    losses = []
    model.train()
    tic = time.perf_counter()
    for i in range(p.steps):
        batch, _ = domain_windows(tokens, per_domain, p.seq_length + 1, seed=p.seed * 1_000_003 + i, part="train")
        ce = step(mx.array(batch))
        mx.eval(state, ce)
        losses.append(ce.item())
        if (i + 1) % max(1, p.steps // 10) == 0:
            log(f"  pretraining step {i + 1}/{p.steps}: loss {np.mean(losses[-20:]):.3f} "
                f"({time.perf_counter() - tic:.0f} s)")
    _record_gates(model, False)
    model.eval()
    return losses


def routing_counts(model, windows: np.ndarray, labels: np.ndarray, n_groups: int, batch_size: int = 32):
    """(groups, layers, experts) top-k counts and (groups, layers) summed
    per-token router entropy (nats) of the windows of each group."""
    top_k = model.layers[0].mlp.top_k
    n_experts = model.layers[0].mlp.gate.weight.shape[0]
    counts = np.zeros((n_groups, len(model.layers), n_experts))
    entropy = np.zeros((n_groups, len(model.layers)))
    _record_gates(model, True)
    try:
        for s in range(0, len(windows), batch_size):
            _RecordingGate.logits.clear()
            mx.eval(model(mx.array(windows[s : s + batch_size])))
            group = labels[s : s + batch_size]
            for l, logits in enumerate(_RecordingGate.logits):
                probs = np.asarray(mx.softmax(logits.astype(mx.float32), axis=-1))
                top = np.argsort(-probs, axis=-1)[..., :top_k]
                h = -(probs * np.log(np.maximum(probs, 1e-12))).sum(-1)
                for g in np.unique(group):
                    rows = group == g
                    counts[g, l] += np.bincount(top[rows].ravel(), minlength=n_experts)
                    entropy[g, l] += h[rows].sum()
    finally:
        _RecordingGate.logits.clear()
        _record_gates(model, False)
    return counts, entropy


def specialisation(model, tokens: dict[str, np.ndarray], windows: int = 48, length: int = 64) -> dict:
    """How the experts divide the domains, on held-out text, per MoE layer:

    - ``domain_information``: mutual information between a token's domain and
      the experts it is routed to, over the entropy of the domain (0: routing
      ignores the domain, 1: the experts tell the domain);
    - ``router_entropy``: mean entropy of a token's routing distribution over
      log(experts) (1: uniform, low: confident);
    - ``load_entropy``: entropy of the experts' share of all routed tokens over
      log(experts) (1: balanced; low would mean collapse onto few experts);
    - ``shares``: (domains, layers, experts) share of each domain's routed slots.
    """
    rows, labels = domain_windows(tokens, windows, length, seed=12345, part="held-out")
    counts, entropy = routing_counts(model, rows, labels, len(DOMAINS))
    n_experts = counts.shape[-1]
    joint = counts / counts.sum(axis=(0, 2), keepdims=True)  # per layer: P(domain, expert)
    p_domain = joint.sum(-1, keepdims=True)
    p_expert = joint.sum(0, keepdims=True)
    ratio = np.where(joint > 0, joint / np.maximum(p_domain * p_expert, 1e-300), 1.0)
    information = (joint * np.log(ratio)).sum(axis=(0, 2))
    h_domain = -(p_domain * np.log(p_domain)).sum(axis=(0, 2))
    load = p_expert[0]
    return {
        "domain_information": (information / h_domain).tolist(),
        "router_entropy": (entropy.sum(0) / (len(rows) * length) / np.log(n_experts)).tolist(),
        "load_entropy": (-(load * np.log(np.maximum(load, 1e-300))).sum(-1) / np.log(n_experts)).tolist(),
        "shares": (counts / counts.sum(-1, keepdims=True)).tolist(),
    }


def _cache_dir() -> Path:
    from drlora_mlx.formats.tiny import cache_dir

    return cache_dir()


def base_key(p: Pretraining, vocab_texts_digest: str) -> str:
    settings = {"v": RECIPE_VERSION, **asdict(p), "corpus": vocab_texts_digest}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_base(p: Pretraining, log=print) -> tuple[Path, dict]:
    """The pretrained checkpoint folder for ``p`` (built on first use, then
    cached) and its pretraining record (losses, seconds)."""
    texts = corpus()
    digest = hashlib.sha256("".join(texts[d] for d in DOMAINS).encode()).hexdigest()[:12]
    path = _cache_dir() / f"experiment-base-{base_key(p, digest)}"
    if (path / "pretraining.json").exists():
        return path, json.loads((path / "pretraining.json").read_text())
    from mlx_lm import load

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        tic = time.perf_counter()
        build_tiny("qwen3_moe", tmp, p.shape, seed=p.seed)
        for f in tmp.glob("tokenizer*"):
            f.unlink()
        # A tokenizer of the base's own text, as a real base model has.
        build_tokenizer([texts[d] for d in DOMAINS], p.shape.vocab, tmp, PROMPT_TEMPLATE)
        model, tokenizer = load(str(tmp))
        tokens = tokenize_domains(tokenizer, texts)
        log("  corpus tokens: " + ", ".join(f"{d} {len(tokens[d]):,}" for d in DOMAINS))
        mx.random.seed(p.seed)
        before = specialisation(model, tokens)
        losses = pretrain(model, tokens, p, log)
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        record = {"losses": losses, "seconds": time.perf_counter() - tic, "settings": asdict(p),
                  "tokens": {d: int(len(tokens[d])) for d in DOMAINS},
                  "specialisation": {"initial": before, "pretrained": specialisation(model, tokens)}}
        (tmp / "pretraining.json").write_text(json.dumps(record))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, record
