"""The rank-masked expert LoRA against mlx-lm's own LoRASwitchLinear, and its masking."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear

from drlora_mlx.lora.masked import MaskedLoRASwitchLinear

E, IN, OUT, R = 8, 64, 48, 6


def _base(quantized: bool, bias: bool = False):
    mx.random.seed(1)
    base = SwitchLinear(IN, OUT, E, bias=bias)
    if bias:
        base.bias = mx.random.normal((E, OUT))
    return base.to_quantized(group_size=32, bits=4) if quantized else base


def _pair(quantized: bool, bias: bool = False):
    """mlx-lm's LoRASwitchLinear and ours over one base, with the same A and B."""
    base = _base(quantized, bias)
    theirs = LoRASwitchLinear.from_base(base, r=R, scale=3.0)
    theirs.lora_b = mx.random.normal((E, OUT, R)) * 0.1
    ours = MaskedLoRASwitchLinear.from_base(base, r_max=R, rank=R, scale=3.0)
    ours.lora_a, ours.lora_b = theirs.lora_a, theirs.lora_b
    return theirs, ours


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
def test_unsorted_path_equals_mlx_lm(quantized):
    theirs, ours = _pair(quantized, bias=True)
    x = mx.random.normal((2, 5, 1, 1, IN))
    idx = mx.random.randint(0, E, (2, 5, 3))
    want, got = theirs(x, idx), ours(x, idx)
    assert got.shape == want.shape == (2, 5, 3, 1, OUT)
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
def test_sorted_path_equals_mlx_lm(quantized):
    theirs, ours = _pair(quantized)
    idx = mx.sort(mx.random.randint(0, E, (40,)))
    x = mx.random.normal((40, 1, IN))
    want, got = theirs(x, idx, sorted_indices=True), ours(x, idx, sorted_indices=True)
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
def test_inside_switch_glu_both_paths(quantized):
    # SwitchGLU sorts when it sees 64 or more (token, expert) pairs.
    for tokens in (4, 40):
        glus = []
        for _ in range(2):  # two identical experts banks: ours and mlx-lm's
            mx.random.seed(2)
            glus.append(SwitchGLU(IN, 32, E))
            if quantized:
                nn.quantize(glus[-1], group_size=32, bits=4)
        glu, ref = glus
        for name in ("up_proj", "down_proj"):
            theirs = LoRASwitchLinear.from_base(ref[name], r=R, scale=2.0)
            theirs.lora_b = mx.random.normal(theirs.lora_b.shape) * 0.1
            ours = MaskedLoRASwitchLinear.from_base(glu[name], r_max=R, rank=R, scale=2.0)
            ours.lora_a, ours.lora_b = theirs.lora_a, theirs.lora_b
            setattr(ref, name, theirs)
            setattr(glu, name, ours)
        x = mx.random.normal((1, tokens, IN))
        idx = mx.random.randint(0, E, (1, tokens, 2))
        assert mx.allclose(glu(x, idx), ref(x, idx), atol=1e-5, rtol=1e-5)


def _partial():
    theirs, ours = _pair(False)
    ranks = np.array([0, 1, 2, 3, 6, 6, 4, 5])
    ours.set_ranks(ranks)
    return ours, ranks


def test_masked_ranks_get_exactly_zero_gradient():
    ours, ranks = _partial()
    x = mx.random.normal((3, 7, 1, 1, IN))
    idx = mx.random.randint(0, E, (3, 7, 4))

    def loss(params):
        ours.update(params)
        return (ours(x, idx) ** 2).sum()

    params = {"lora_a": ours.lora_a, "lora_b": ours.lora_b}
    grads = mx.grad(loss)(params)
    ga, gb = np.asarray(grads["lora_a"]), np.asarray(grads["lora_b"])
    used = np.unique(np.asarray(idx))
    for e in range(E):
        assert (ga[e, ranks[e]:] == 0).all() and (gb[e, :, ranks[e]:] == 0).all()
        if e in used and ranks[e] > 0:
            assert np.abs(ga[e, : ranks[e]]).sum() > 0 and np.abs(gb[e, :, : ranks[e]]).sum() > 0


def test_masked_equals_truncated_lora():
    # Rank r of r_max with a mask is LoRA at rank r.
    ours, ranks = _partial()
    x = mx.random.normal((1, 6, 1, 1, IN))
    idx = mx.random.randint(0, E, (1, 6, 2))
    got = ours(x, idx)
    base = ours.linear(x, idx)
    xs, ids = np.asarray(x)[0, :, 0, 0], np.asarray(idx)[0]
    a, b = np.asarray(ours.lora_a, np.float64), np.asarray(ours.lora_b, np.float64)
    want = np.asarray(base, np.float64).copy()
    for t in range(6):
        for k in range(2):
            e = ids[t, k]
            r = ranks[e]
            want[0, t, k, 0] += 3.0 * b[e, :, :r] @ (a[e, :r] @ xs[t])
    assert np.allclose(np.asarray(got), want, atol=1e-4)


def test_width_limits_the_product_without_changing_it():
    ours, ranks = _partial()
    x = mx.random.normal((2, 3, 1, 1, IN))
    idx = mx.random.randint(0, E, (2, 3, 2))
    full = ours(x, idx)
    ours.width = int(ranks.max())
    assert mx.allclose(ours(x, idx), full, atol=1e-6)


def test_fuse_equals_forward():
    ours, _ = _partial()
    x = mx.random.normal((2, 3, 1, 1, IN))
    idx = mx.random.randint(0, E, (2, 3, 2))
    fused = ours.fuse()
    assert isinstance(fused, SwitchLinear)
    assert mx.allclose(fused(x, idx), ours(x, idx), atol=1e-5)


def test_ranks_beyond_the_width_widen_it():
    ours, ranks = _partial()
    x = mx.random.normal((2, 3, 1, 1, IN))
    idx = mx.random.randint(0, E, (2, 3, 2))
    ours.width = 2
    narrow = ours(x, idx)
    ours.set_ranks(ranks)  # ranks up to 6 do not fit in width 2
    assert ours.width == R
    full = ours(x, idx)
    assert not mx.allclose(narrow, full)
    ours.width = int(ranks.max())
    assert mx.allclose(ours(x, idx), full, atol=1e-6)
