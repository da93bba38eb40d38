"""An independent float64 reference for the loss, its gradients and the method's statistics.

The reference is a second copy of the checkpoint, loaded by mlx-lm, in which
every expert projection is replaced by a plain float64 layer written here
(``W[e] x + scale * B[e] (m[e] * (A[e] x))`` with the factors copied from the
adapter under test, computed with ``take`` and matmul rather than
``gather_mm``) and whose loss is a hand-written float64 cross-entropy over
the real targets only. Nothing of drlora-mlx's loss, masking or LoRA layer is
used.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from drlora_mlx.lora.tree import module_at, replace_module

F64 = mx.float64


class Expert64(nn.Module):
    """One bank of experts in float64, with the adapter's LoRA factors when given."""

    def __init__(self, weight, lora=None):
        super().__init__()
        self.weight = weight
        if lora is not None:
            self.lora_a, self.lora_b, self.mask, self.scale = lora

    def __call__(self, x, indices, sorted_indices=False):
        y = x @ mx.swapaxes(self.weight[indices], -1, -2)
        if "lora_a" not in self:
            return y
        z = x @ mx.swapaxes(self.lora_a[indices], -1, -2)
        z = z * mx.expand_dims(self.mask[indices], -2)
        return y + self.scale * (z @ mx.swapaxes(self.lora_b[indices], -1, -2))


def real_target_mask(lengths, width: int) -> np.ndarray:
    """(rows, width - 1): target t counts when token t + 1 is a real token after the prompt."""
    lengths = np.asarray(lengths)
    predicted = np.arange(1, width)[None, :]
    return (predicted >= lengths[:, :1]) & (predicted < lengths[:, 1:])


class Reference:
    """The float64 copy of ``model_path`` for the adapter ``drlora`` (attached to another copy)."""

    def __init__(self, model_path, drlora):
        self.model, _ = mlx_lm_load(str(model_path))
        self.drlora = drlora
        self.paths = [path for path, _ in drlora.expert_modules()]
        for path, m in list(self.model.named_modules()):
            if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
                assert "scales" not in m, "the reference is for float bases"
                replace_module(self.model, path, Expert64(m.weight))
        self.model.update(tree_map(lambda p: p.astype(F64), self.model.parameters()))
        self.model.freeze()
        self.model.train()

    def sync(self) -> None:
        """Copy the adapter's current factors and masks into the reference."""
        for path, m in self.drlora.expert_modules():
            a, b = m.masked_factors()  # in either layout: the active ranks, zero elsewhere
            lora = (a.astype(F64), b.astype(F64), m.active_mask().astype(F64), float(m.scale))
            expert = Expert64(module_at(self.model, path).weight, lora)
            expert.freeze(keys=["weight", "mask"])  # only A and B have gradients
            replace_module(self.model, path, expert)

    def loss_and_grads(self, batch, lengths):
        """(loss sum, real targets, {path: (dL/dA, dL/dB)}) in float64 numpy."""
        batch = mx.array(batch)
        mask = mx.array(real_target_mask(lengths, batch.shape[1]).astype(np.float64))
        inputs, targets = batch[:, :-1], batch[:, 1:]

        def loss(model):
            logits = model(inputs).astype(F64)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll = -mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return (nll * mask).sum()

        value, grads = nn.value_and_grad(self.model, loss)(self.model)
        flat = dict(tree_flatten(grads))
        out = {p: (np.asarray(flat[f"{p}.lora_a"]), np.asarray(flat[f"{p}.lora_b"])) for p in self.paths}
        return float(value.item()), int(np.asarray(mask).sum()), out


def rank_scores(a, b, ga, gb) -> np.ndarray:
    """s_j = ||dL/da_j * a_j||_1 x ||dL/db_j * b_j||_1 per expert and rank (Eq. 6), float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(ga * a).sum(-1) * np.abs(gb * b).sum(-2)
