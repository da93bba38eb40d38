"""The routing weight an MoE block really applies, measured by running it.

The experts of the block are replaced by a probe that returns one-hot rows
(slot j of every token gets the unit vector e_j) and the block is run on a
few random hidden states: where the block sums its experts' outputs weighted
by the routing weights, coordinate j of the sum *is* the weight of slot j.
The same run with an all-zero probe removes whatever does not come from the
routed experts (shared experts, a parallel dense MLP). ``attach`` compares
this with the family's routing-weight rule, so a rule that no longer matches
mlx-lm's code never trains on wrong statistics.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from .tree import module_at, replace_module

SAMPLE_TOKENS = 16


class _Probe(nn.Module):
    """Stands in for a bank of experts: unit rows (or zeros), optionally scaled
    by how much the block scaled the experts' input (Llama 4)."""

    def __init__(self, out_dims: int, one_hot: bool, block_input=None):
        super().__init__()
        self.out_dims = out_dims
        self.one_hot = one_hot
        self.block_input = block_input
        self.indices = self.inputs = None

    def __call__(self, x, indices, *args, **kwargs):
        self.indices, self.inputs = indices, x
        k = indices.shape[-1]
        rows = mx.eye(k, self.out_dims) if self.one_hot else mx.zeros((k, self.out_dims))
        out = mx.broadcast_to(rows, indices.shape + (self.out_dims,))
        if self.block_input is not None:
            ref = self.block_input.reshape(x.shape).astype(mx.float32)
            scale = (x.astype(mx.float32) * ref).sum(-1) / (ref * ref).sum(-1)
            out = out * scale[..., None, None]
        return out.astype(x.dtype)


@contextmanager
def _capture(module: nn.Module, what: str, into: dict, key: str):
    """Record ``module``'s first input or its output (``what``) in ``into[key]`` while the body runs."""
    cls = type(module)

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        into[key] = args[0] if what == "input" else out
        return out

    module.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    try:
        yield
    finally:
        module.__class__ = cls


def _run(block, experts_path: str, probe: _Probe, x, readout, router: nn.Module):
    """(what the readout saw, the router's output, the experts' input) with ``probe`` as the experts."""
    seen: dict = {}
    experts = module_at(block, experts_path)
    replace_module(block, experts_path, probe)
    target = module_at(block, readout[0]) if readout else None
    try:
        with _capture(router, "output", seen, "router"):
            if target is None:
                out = block(x)
            else:
                with _capture(target, readout[1], seen, "readout"):
                    block(x)
                out = seen["readout"]
    finally:
        replace_module(block, experts_path, experts)
    out = out[0] if isinstance(out, tuple) else out
    return out, seen["router"]


def applied_weights(block, experts_path: str, out_dims: int, hidden: int, dtype, readout=None, router=None,
                    input_scaled: bool = False, seed: int = 0):
    """(indices, measured weights, router output, experts' input) of one run of
    ``block`` on random hidden states: the weight each chosen expert's output
    (or input, ``input_scaled``) was multiplied by."""
    x = (mx.random.normal((1, SAMPLE_TOKENS, hidden), key=mx.random.key(seed))).astype(dtype)
    probe = _Probe(out_dims, one_hot=True, block_input=x if input_scaled else None)
    with_rows, router_out = _run(block, experts_path, probe, x, readout, router)
    without, _ = _run(block, experts_path, _Probe(out_dims, one_hot=False), x, readout, router)
    indices = probe.indices
    k = indices.shape[-1]
    diff = (with_rows.astype(mx.float32) - without.astype(mx.float32))
    measured = diff.reshape(-1, diff.shape[-1])[:, :k].reshape(indices.shape)
    return indices, measured, router_out, probe.inputs
