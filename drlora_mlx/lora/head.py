"""A model as its decoder and its head, so that the loss need not hold every token's logits.

The decoder ("body") is the module that holds the model's decoder layers
(``model.model``, Nemotron-H's ``backbone``, a wrapper's
``language_model.model``), unless the family's entry names another. Its output
is the last hidden state. The head is whatever the model's own ``__call__``
does after it: the final projection or the tied embeddings, quantized or not,
Granite's logit scaling, Gemma's soft-capping. drlora-mlx does not rewrite
that code: it runs the model's ``__call__`` with the body's class swapped for
a subclass that returns given hidden states (or records the ones it computes),
the same kind of swap that observes the routers without changing any
parameter path. ``attach`` checks on a few random tokens that the head applied
to the body's output gives the model's own logits, as it checks the routing
rule, and falls back to the plain loss with one line when it does not.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .tree import module_at


class _Slot:
    """Holds an array outside the module tree (an array attribute of a module would be a parameter)."""

    value = None


def body_path(model: nn.Module, named: str = "") -> str:
    """The path of the module whose output is the last hidden state: ``named``, or the
    module that holds the model's decoder layers (the list ``model.layers`` returns)."""
    if named:
        return named
    layers = list(model.layers)

    def holds(module: nn.Module) -> bool:  # the list itself (Phixtral's transformer.h), not a property reaching it
        return any(isinstance(v, list) and len(v) == len(layers) and all(a is b for a, b in zip(v, layers))
                   for v in module.values())

    for path, module in model.named_modules():
        if path and holds(module):
            return path
    raise ValueError("no module below the model holds its decoder layers")


class Head:
    """``hidden(inputs)``: the last hidden state of the model's own forward pass;
    ``logits(hidden)``: what the model's ``__call__`` makes of it."""

    vocab = 0  # the logits' width, known once the split is checked

    def __init__(self, model: nn.Module, path: str):
        self.model, self.path = model, path
        self.body = module_at(model, path)
        self._class = type(self.body)
        given, taken = _Slot(), _Slot()
        base = self._class

        def give(body, *args, **kwargs):
            return given.value

        def take(body, *args, **kwargs):
            taken.value = base.__call__(body, *args, **kwargs)
            # The head then works on one position, whose logits nobody reads (so nobody computes them).
            return taken.value[..., -1:, :]

        self._given, self._taken = given, taken
        self._giving = type(f"Given{base.__name__}", (base,), {"__call__": give})
        self._taking = type(f"Taking{base.__name__}", (base,), {"__call__": take})

    @contextmanager
    def _as(self, cls):
        self.body.__class__ = cls
        try:
            yield
        finally:
            self.body.__class__ = self._class

    def hidden(self, inputs: mx.array) -> mx.array:
        """The body's output for ``inputs`` (B, L): (B, L, hidden)."""
        try:
            with self._as(self._taking):
                self.model(inputs)
            return self._taken.value
        finally:
            self._taken.value = None

    def logits(self, hidden: mx.array) -> mx.array:
        """The model's logits for hidden states (B, L, hidden) of its body."""
        self._given.value = hidden
        try:
            with self._as(self._giving):
                return self.model(mx.zeros(hidden.shape[:2], dtype=mx.int32))
        finally:
            self._given.value = None


def split_head(model: nn.Module, named: str = "") -> tuple[Head | None, str]:
    """(the model's head, "") when it checks out on a few random tokens, else (None, why)."""
    try:
        head = Head(model, body_path(model, named))
        tokens = mx.random.randint(0, 64, (2, 8), key=mx.random.key(0)).astype(mx.int32)
        want = model(tokens)
        got = head.logits(head.hidden(tokens))
        mx.eval(want, got)
    except Exception as e:  # a model this split cannot run is a model whose head is unverified
        return None, f"the split could not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    outside = [k for k, _ in tree_flatten(model.trainable_parameters()) if not k.startswith(head.path + ".")]
    if outside:  # the chunked loss takes gradients through the head for its input only
        return None, f"trained parameters lie outside its decoder ({outside[0]})"
    scale = max(1.0, mx.abs(want).max().item())
    if got.shape != want.shape or not mx.allclose(got, want, rtol=0.0, atol=1e-5 * scale).item():
        return None, "its head applied to its decoder's output does not give its logits"
    head.vocab = want.shape[-1]
    return head, ""
